"""evaluation.run_report on a hand-written TFMA output (candidate vs baseline, slices) and on
bad input; the real pipeline root is covered by tests/test_reports.py (e2e)."""

import pandas as pd
import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
from google.protobuf import json_format
from tensorflow_model_analysis.proto import config_pb2
from tensorflow_model_analysis.proto import metrics_for_slice_pb2
from tensorflow_model_analysis.proto import validation_result_pb2

import pipeline
from evaluation import run_report
from trainers import metrics

# (slice, model) -> recall@10; the candidate (compressed) loses 5% Overall against the
# baseline (trained), more than the 2% its change threshold allows.
RECALL = {
    ((), 'trained'): 0.20, ((), 'compressed'): 0.19,
    ((('user_activity_bucket', 'high'),), 'trained'): 0.30,
    ((('user_activity_bucket', 'high'),), 'compressed'): 0.30,
    ((('user_activity_bucket', 'low'),), 'trained'): 0.10,
    ((('user_activity_bucket', 'low'),), 'compressed'): 0.08,
}


def _eval_config():
  configs = metrics.metric_configs(recall_floor=0.05)
  recall = configs[0]
  recall.threshold.change_threshold.direction = tfma.MetricDirection.HIGHER_IS_BETTER
  recall.threshold.change_threshold.relative.value = -0.02
  return tfma.EvalConfig(
      model_specs=[tfma.ModelSpec(name='compressed', signature_name='eval_ranks'),
                   tfma.ModelSpec(name='trained', signature_name='eval_ranks',
                                  is_baseline=True)],
      slicing_specs=[tfma.SlicingSpec(),
                     tfma.SlicingSpec(feature_keys=['user_activity_bucket'])],
      metrics_specs=[tfma.MetricsSpec(metrics=configs, model_names=['compressed', 'trained'])])


def _slice_proto(slice_key):
  proto = metrics_for_slice_pb2.SliceKey()
  for column, value in slice_key:
    proto.single_slice_keys.add(column=column, bytes_value=value.encode())
  return proto


@pytest.fixture
def eval_dir(tmp_path):
  """A two-model Evaluator output in TFMA's file layout."""
  config = _eval_config()
  (tmp_path / 'eval_config.json').write_text(json_format.MessageToJson(config_pb2.EvalRun(
      eval_config=config, version=tfma.__version__, data_location='test', file_format='',
      model_locations={'compressed': '/models/compressed', 'trained': '/models/trained'})))
  slices = sorted({key for key, _ in RECALL})
  with tf.io.TFRecordWriter(str(tmp_path / 'metrics-00000-of-00001.tfrecord')) as writer:
    for slice_key in slices:
      proto = metrics_for_slice_pb2.MetricsForSlice(slice_key=_slice_proto(slice_key))
      for model in ('compressed', 'trained'):
        value = RECALL[(slice_key, model)]
        entries = [('recall@10', value, False), ('ndcg@10', value / 2, False),
                   ('example_count', 50.0, False)]
        if model == 'compressed':
          entries.append(('recall@10', value - RECALL[(slice_key, 'trained')], True))
        for name, number, is_diff in entries:
          item = proto.metric_keys_and_values.add()
          item.key.name = name
          item.key.model_name = model
          item.key.is_diff = is_diff
          item.value.double_value.value = number
      writer.write(proto.SerializeToString())
  validation = validation_result_pb2.ValidationResult(validation_ok=False)
  for slice_key in slices:
    base, value = RECALL[(slice_key, 'trained')], RECALL[(slice_key, 'compressed')]
    if (value - base) / base >= -0.02:
      continue
    per_slice = validation.metric_validations_per_slice.add(slice_key=_slice_proto(slice_key))
    failure = per_slice.failures.add()
    failure.metric_key.name = 'recall@10'
    failure.metric_key.model_name = 'compressed'
    failure.metric_key.is_diff = True
    failure.metric_value.double_value.value = value - base
    failure.metric_threshold.change_threshold.CopyFrom(
        config.metrics_specs[0].metrics[0].threshold.change_threshold)
  with tf.io.TFRecordWriter(str(tmp_path / 'validations.tfrecord')) as writer:
    writer.write(validation.SerializeToString())
  return str(tmp_path)


def test_tables_per_model_and_slice(eval_dir):
  evaluation = run_report.load_evaluation_dir(eval_dir)
  assert (evaluation.candidate, evaluation.baseline) == ('compressed', 'trained')
  tables = run_report.metrics_tables(evaluation)
  assert list(tables) == ['compressed', 'trained']
  for model, table in tables.items():
    assert list(table.index) == ['Overall', 'user_activity_bucket:high',
                                 'user_activity_bucket:low']
    assert list(table.columns) == ['recall@10', 'ndcg@10', 'example_count']
    for label, key in zip(table.index, sorted({key for key, _ in RECALL})):
      assert table.at[label, 'recall@10'] == pytest.approx(RECALL[(key, model)])
  overall = run_report.overall_table(evaluation)
  assert overall.at['trained', 'recall@10'] == pytest.approx(0.20)


def test_candidate_against_baseline(eval_dir):
  evaluation = run_report.load_evaluation_dir(eval_dir)
  comparison = run_report.comparison_table(evaluation)
  row = comparison.loc[('Overall', 'recall@10')]
  assert row['candidate'] == pytest.approx(0.19) and row['baseline'] == pytest.approx(0.20)
  assert row['diff'] == pytest.approx(-0.01) and row['retention'] == pytest.approx(0.95)
  # The HTML report's pieces for it: tables and embedded plots.
  page = run_report.frame_html(comparison)
  assert '<td>Overall</td><td>recall@10</td><td>0.1900</td><td>0.2000</td>' in page
  for figure in (run_report.plot_comparison(comparison),
                 run_report.plot_slices(run_report.metrics_table(evaluation))):
    assert run_report.png_data_uri(figure).startswith('data:image/png;base64,')


def test_thresholds_say_why_not_blessed(eval_dir):
  evaluation = run_report.load_evaluation_dir(eval_dir)
  thresholds = run_report.threshold_table(evaluation)
  # As TFMA applies them: a MetricConfig's value threshold to the Overall slice, its change
  # threshold to every slice; the candidate's only (the baseline is not checked).
  assert set(thresholds['model']) == {'compressed'}
  floor = thresholds[thresholds['metric'] == 'recall@10']
  assert list(floor['slice']) == ['Overall'] and list(floor['result']) == ['pass']
  change = thresholds[thresholds['metric'] == 'recall@10 (change vs baseline)']
  assert len(change) == 3 and list(change['baseline']) == pytest.approx([0.2, 0.3, 0.1])
  failed = thresholds[thresholds['result'] == 'FAIL']
  assert sorted(failed['slice']) == ['Overall', 'user_activity_bucket:low']
  lines = run_report.explain_blessing(evaluation, thresholds)
  assert lines[0] == 'Not blessed: 2 of 4 threshold check(s) failed.'
  assert any('slice Overall' in line and '98% of baseline' in line for line in lines)
  assert any("baseline 'trained'" in line for line in lines)


def test_model_costs_from_compression_section():
  summary = {'metrics': {'trained': {'recall@10': 0.2}, 'compressed': {'recall@10': 0.196}},
             'compression': {'size_ratio': 4.0, 'speedup_batch1': 2.0,
                             'trained': {'latency': {'recommend': {'batch1': {'p50_ms': 8.0}}}}}}
  costs = run_report.model_costs(summary, trained_bytes=8_000_000)
  assert costs.at['trained', 'size_mb'] == pytest.approx(8.0)
  assert costs.at['compressed', 'size_mb'] == pytest.approx(2.0)
  assert costs.at['trained', 'latency'] == pytest.approx(8.0)
  assert costs.at['compressed', 'latency'] == pytest.approx(4.0)
  assert costs.at['compressed', 'recall@10'] == pytest.approx(0.196)
  only_trained = run_report.model_costs({'metrics': {'trained': {'recall@10': 0.2}}}, 1_000_000)
  assert list(only_trained.index) == ['trained'] and pd.isna(only_trained.at['trained',
                                                                            'latency'])


def test_json_is_rendered_generically():
  page = run_report.json_html({'a': {'b': 1.5, 'c': 'x<y'}, 'rows': [{'k': 1}, {'k': 2}]})
  assert '<td>a.b</td><td>1.5000</td>' in page and 'x&lt;y' in page
  assert '<h4>rows</h4>' in page


@pytest.mark.parametrize('make', ['missing', 'empty_dir', 'not_a_store'])
def test_report_on_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, make):
  root = tmp_path / 'root'
  if make != 'missing':
    root.mkdir()
  if make == 'not_a_store':
    (root / 'metadata.db').write_text('not sqlite')
  status = pipeline.main(['report', '--pipeline-root', str(root),
                          '--output', str(tmp_path / 'r.html')])
  err = capsys.readouterr().err
  assert status == 2
  assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
  assert str(root) in err
  assert not (tmp_path / 'r.html').exists()


def test_report_with_missing_summary_file_is_an_error(tmp_path, capsys):
  root = tmp_path / 'root'
  root.mkdir()
  (root / 'metadata.db').write_text('')
  status = pipeline.main(['report', '--pipeline-root', str(root), '--run-summary',
                          str(tmp_path / 'nope.json')])
  assert status == 2 and capsys.readouterr().err.startswith('error: ')
