"""Compressor: int8 quantization, pruning, distillation, the component and its executor.

Fast tests use synthetic tensors and a tiny TwoTowerModel. The `e2e` tests read what the
Compressor (run by the LocalDagRunner) wrote in the shared pipeline run (conftest's
`e2e_run`); set COMPRESSION_TEST_OUTPUT to the output directory of an earlier
`pipeline.py run` to reuse it instead while developing. The over-compressed model's gate is
tested at the pipeline level (test_e2e).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import conftest
from components import compressor
from compression import benchmark
from compression import export as export_lib
from compression import ladder
from compression import pruning
from compression import quantization
from compression import compress as compress_lib
from evaluation import artifacts
from trainers import features
from trainers import serving_model
from trainers import model as model_lib
from tiny_model import tiny_dataset as _tiny_dataset, tiny_model as _tiny_model

SPARSITY_TOLERANCE = 0.01
# int8 vs float32 scores of the same model on the eval split: query and candidate vectors are
# unit vectors, scores are cosines in [-1, 1]; per-row int8 costs at most ~1/254 of each
# row's largest value per coordinate, compounding through the tower to well under 0.05.
SCORE_TOLERANCE = 0.05
MIN_TOP10_OVERLAP = 0.8


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------

def test_quantize_per_row_error_is_at_most_half_a_step():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(40, 16)).astype(np.float32) * rng.uniform(0.01, 3, (40, 1))
  values[5] = 0.0
  q, scale = quantization.quantize(values, axis=0)
  assert q.dtype == np.int8 and scale.shape == (40,)
  error = np.abs(quantization.dequantize(q, scale, 0) - values)
  assert np.all(error <= scale[:, None] / 2 + 1e-7)
  assert np.all(quantization.dequantize(q, scale, 0)[5] == 0)
  assert np.abs(q).max() <= 127


def test_int8_modules_match_float_within_quantization_error():
  rng = np.random.default_rng(1)
  table = rng.normal(size=(30, 8)).astype(np.float32)
  int8_table = quantization.Int8Table(table, 'table')
  ids = np.array([[0, 3], [29, 7]])
  np.testing.assert_allclose(int8_table(ids).numpy(), table[ids],
                             atol=float(int8_table.scale.numpy().max()) / 2 + 1e-6)
  assert int8_table.q.dtype == tf.int8 and int8_table.scale.dtype == tf.float32

  dense = tf.keras.layers.Dense(6, activation='relu')
  x = rng.normal(size=(4, 5)).astype(np.float32)
  expected = dense(x).numpy()
  int8_dense = quantization.dense_from_keras(dense, 'query_mlp/layer_0')
  assert int8_dense.info.dtype == 'int8' and int8_dense.info.scale_shape == [6]
  assert int8_dense.info.name == 'query_mlp/layer_0/kernel'
  np.testing.assert_allclose(int8_dense(x).numpy(), expected, atol=0.05)

  candidates = rng.normal(size=(50, 8)).astype(np.float32)
  query = rng.normal(size=(3, 8)).astype(np.float32)
  for limit in (quantization.MAX_CONSTANT_BYTES, 0):  # graph constant, then variable
    quantization.MAX_CONSTANT_BYTES, saved = limit, quantization.MAX_CONSTANT_BYTES
    try:
      index = quantization.CandidateIndex(candidates)
      np.testing.assert_allclose(index.scores(query).numpy(), query @ candidates.T, atol=0.1)
      step = np.abs(candidates).max(axis=1) / 127
      assert index.info.max_abs_error <= step.max() / 2 + 1e-6
      layer = quantization.dense_from_keras(dense, 'query_mlp/layer_0')
      np.testing.assert_allclose(layer(x).numpy(), expected, atol=0.05)
      for stored in (index.matrix, layer.kernel):
        assert stored.info.storage.startswith('graph constant' if limit else 'variable')
        if not limit:
          assert stored.q.dtype == tf.int8 and stored.scale.dtype == tf.float32
    finally:
      quantization.MAX_CONSTANT_BYTES = saved


def test_int8_constants_are_stored_int8_and_folded(tmp_path):
  """A small int8 kernel is an int8 Const in the saved graph; it answers like the float layer."""
  dense = tf.keras.layers.Dense(32)
  x = np.random.default_rng(2).normal(size=(2, 64)).astype(np.float32)
  expected = dense(x).numpy()
  module = tf.Module()
  module.dense = quantization.dense_from_keras(dense, 'dense')
  module.call = tf.function(module.dense, input_signature=[tf.TensorSpec([None, 64])])
  tf.saved_model.save(module, str(tmp_path), signatures={'serving_default': module.call})
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel
  proto = saved_model_pb2.SavedModel()
  proto.ParseFromString((tmp_path / 'saved_model.pb').read_bytes())
  nodes = [n for f in proto.meta_graphs[0].graph_def.library.function for n in f.node_def]
  int8 = tf.int8.as_datatype_enum
  int8_consts = [n for n in nodes if n.op == 'Const' and n.attr['dtype'].type == int8]
  assert any(list(c.attr['value'].tensor.tensor_shape.dim) and
             [d.size for d in c.attr['value'].tensor.tensor_shape.dim] == [64, 32]
             for c in int8_consts)
  loaded = tf.saved_model.load(str(tmp_path))
  np.testing.assert_allclose(loaded.signatures['serving_default'](tf.constant(x))['output_0'],
                             expected, atol=0.05)


# ---------------------------------------------------------------------------------------------
# Pruning on a tiny model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('uses_text,target', [(False, 0.5), (True, 0.8)])
def test_pruning_reaches_target_sparsity_per_layer(uses_text, target):
  model = _tiny_model(uses_text)
  pruning.build(model)
  before = {name: pruning.layer_weight(layer).numpy().copy()
            for name, layer in pruning.prunable_layers(model).items()}
  pruning.fine_tune(model, _tiny_dataset(model), pruning.PruningConfig(target_sparsity=target),
                    steps=12)
  report = pruning.sparsity_report(model)
  assert set(report) == {'user_embedding', 'item_embedding', 'query_mlp/layer_0',
                         'query_mlp/layer_1'} | ({'text_projection'} if uses_text else set())
  for name, layer in report.items():
    assert abs(layer['sparsity'] - target) <= SPARSITY_TOLERANCE, (name, layer)
  # The originals are back in the model (no wrappers), and were fine-tuned, not only masked.
  for name, layer in pruning.prunable_layers(model).items():
    assert not isinstance(layer, pruning.pruning_wrapper.PruneLowMagnitude)
    assert not np.array_equal(pruning.layer_weight(layer).numpy(), before[name]), name


def test_pruning_2_by_4():
  model = _tiny_model(uses_text=False)
  pruning.build(model)
  pruning.fine_tune(model, _tiny_dataset(model),
                    pruning.PruningConfig(target_sparsity=0.3, sparsity_m_by_n=(2, 4)), steps=8)
  for name, layer in pruning.prunable_layers(model).items():
    kernel = pruning.layer_weight(layer).numpy()
    if isinstance(layer, tf.keras.layers.Dense):
      # 2:4 along the input channels: every group of 4 inputs of an output has 2 zeros.
      groups = kernel.T.reshape(kernel.shape[1], -1, 4)
      assert np.all((groups == 0).sum(-1) >= 2), name
      assert abs((kernel == 0).mean() - 0.5) <= SPARSITY_TOLERANCE, name
    else:  # embedding tables: the unstructured target
      assert abs((kernel == 0).mean() - 0.3) <= SPARSITY_TOLERANCE, name


# ---------------------------------------------------------------------------------------------
# The component
# ---------------------------------------------------------------------------------------------

def test_component_channels_and_parameters():
  from tfx import v1 as tfx  # pylint: disable=import-outside-toplevel
  model = tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model)
  graph = tfx.dsl.Channel(type=tfx.types.standard_artifacts.TransformGraph)
  examples = tfx.dsl.Channel(type=tfx.types.standard_artifacts.Examples)
  component = compressor.Compressor(trained_model=model, transform_graph=graph,
                                    examples=examples, raw_examples=examples,
                                    target_sparsity=0.7, distill=False)
  assert component.outputs['model'].type is tfx.types.standard_artifacts.Model
  assert component.outputs['report'].type_name == 'recommender.CompressionReport'
  assert component.exec_properties['target_sparsity'] == 0.7
  assert component.exec_properties['distill'] == 0
  assert component.exec_properties['quantize'] == 1
  with pytest.raises(ValueError, match='unknown Compressor parameters'):
    compressor.Compressor(trained_model=model, transform_graph=graph, examples=examples,
                          sparsity=0.5)
  with pytest.raises(ValueError, match='target_sparsity'):
    compress_lib.parameters({'target_sparsity': 1.0})


# ---------------------------------------------------------------------------------------------
# The executor on a real pipeline run (e2e)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def pipeline_artifacts(request):
  """Uris of the first run's Trainer model, Transform outputs, ExampleGen examples and
  Compressor outputs (later tests re-run into the same pipeline root)."""
  from evaluation import run_summary  # pylint: disable=import-outside-toplevel
  output = os.environ.get('COMPRESSION_TEST_OUTPUT')
  if not output:
    output = str(request.getfixturevalue('e2e_run')[0])
  reader = run_summary.RunReader(os.path.join(output, 'pipeline_root', 'metadata.db'),
                                 'recommender')
  first = reader.pipeline_runs()[0].executions

  def artifact(node, key):
    return reader.execution_artifacts(first[node].id, key)[-1]
  return {'model': artifact('Trainer', 'model').uri,
          'transform_graph': artifact('Transform', 'transform_graph').uri,
          'examples': artifact('Transform', 'transformed_examples').uri,
          'examples_splits': artifact('Transform', 'transformed_examples').properties[
              'split_names'].string_value,
          'raw_examples': artifact('SequenceExampleGen', 'examples').uri,
          'compressed_model': artifact('Compressor', 'model').uri,
          'report': artifact('Compressor', 'report').uri}


@pytest.fixture(scope='module')
def compressed(request):
  """The Compressor's outputs with fixed settings (search=0: distillation, 50% pruning, int8)
  in the pipeline: conftest.over_compressed_run's. (model uri, report, report uri)."""
  from evaluation import run_summary  # pylint: disable=import-outside-toplevel
  output = str(request.getfixturevalue('e2e_run')[0])
  request.getfixturevalue('over_compressed_run')
  reader = run_summary.RunReader(os.path.join(output, 'pipeline_root', 'metadata.db'),
                                 'recommender')
  report_uri = reader.outputs('Compressor', 'report')[-1].uri
  return (reader.outputs('Compressor', 'model')[-1].uri, artifacts.read_compression_report(report_uri),
          report_uri)


@pytest.mark.e2e
def test_the_pipeline_compressor_keeps_a_candidate_on_validation(pipeline_artifacts):
  """The pipeline run's Compressor tried its ladder on the eval split and says what it kept."""
  report = artifacts.read_compression_report(pipeline_artifacts['report'])
  candidates, chosen = report['candidates'], report['chosen']
  assert candidates and 0 <= chosen['index'] < len(candidates)
  target = chosen['target_validation_retention']
  assert target == compress_lib.PARAMETERS['min_validation_retention'][1]
  kept = candidates[chosen['index']]
  assert chosen['name'] == kept['name'] and chosen['why']
  # Tried in order until one kept the target: every earlier one fell short of it.
  assert all(c['retention_lower'] < target for c in candidates[:chosen['index']])
  assert kept['retention_lower'] >= target or chosen['fell_back']
  for c in candidates:
    assert c['retention_lower'] <= c['retention']
  if chosen['fell_back']:
    assert not kept['student'] and kept['sparsity'] == 0 and 'fell back' in chosen['why']
  for c in candidates:
    assert c['bytes'] > 0 and c['recommend_p50_ms'] > 0 and c['validation_recall@10'] >= 0
  assert report['trained_validation']['users'] > 0
  assert kept['name'] in chosen['why']
  # The report's own eval-split retention is the kept candidate's.
  assert report['recall_retention'] == pytest.approx(kept['retention'])
  assert '## Candidates (validation split)' in open(
      os.path.join(pipeline_artifacts['report'], 'report.md')).read()


@pytest.mark.e2e
def test_executor_writes_model_and_report(compressed, pipeline_artifacts):
  uri, report, report_uri = compressed
  saved_model = os.path.join(uri, 'Format-Serving')
  assert tf.saved_model.contains_saved_model(saved_model)
  assert os.path.isfile(os.path.join(report_uri, 'report.md'))
  assert report['chosen']['index'] == 0 and len(report['candidates']) == 1
  for key in ('size_ratio', 'gzip_size_ratio', 'speedup_batch1', 'speedup_search_batch1',
              'speedup_batch64', 'speedup_search_batch64', 'session_speedup_batch1',
              'session_speedup_search_batch1', 'fast_id_path', 'ablation', 'recall_retention',
              'search_recall_retention', 'trained', 'compressed', 'sparsity', 'quantized',
              'kept_float', 'left_out', 'quantization_agreement', 'pruning', 'distillation',
              'config', 'seconds', 'index'):
    assert key in report, key
  # The e2e flags force the approximate index on (index=1): it serves, at the chosen nprobe.
  index = report['index']
  assert index['used'] and [r['nprobe'] for r in index['rows']][-1] == index['n_lists']
  assert '## Approximate top-K index' in open(os.path.join(report_uri, 'report.md')).read()
  for name in ('trained', 'compressed'):
    summary = report[name]
    assert summary['bytes'] > summary['gzip_bytes'] > 0
    for kind in ('recommend', 'search'):
      for batch in ('batch_1', 'batch_64'):
        for timings in (summary['latency_ms'], summary['session_latency_ms']):
          assert 0 < timings[kind][batch]['p50'] <= timings[kind][batch]['p99']
    assert summary['quality']['eval']['users'] > 0
  assert report['size_ratio'] == pytest.approx(report['trained']['bytes']
                                               / report['compressed']['bytes'])
  # Same signatures, inputs and outputs as the trained model.
  trained = tf.saved_model.load(os.path.join(pipeline_artifacts['model'], 'Format-Serving'))
  small = tf.saved_model.load(saved_model)
  assert set(small.signatures) == set(trained.signatures)
  for name in trained.signatures:
    assert (small.signatures[name].structured_input_signature
            == trained.signatures[name].structured_input_signature), name
    assert (small.signatures[name].structured_outputs.keys()
            == trained.signatures[name].structured_outputs.keys()), name
  # What was quantized is listed with shapes, dtypes and errors; and nothing float that is big.
  names = {q['name'] for q in report['quantized']}
  assert {'user_embedding', 'item_embedding', 'candidates', 'query_mlp/layer_0/kernel',
          'query_mlp/layer_1/kernel', 'text_projection/kernel',
          'student/word_embeddings'} <= names
  assert all(q['dtype'] == 'int8' and q['max_abs_error'] >= 0 for q in report['quantized'])
  assert 'item_text' not in json.dumps(report['compressed']['largest_variables'])
  assert report['fast_id_path']['enabled'] and report['fast_id_path']['check']['equal']


@pytest.mark.e2e
def test_pruning_reaches_configured_sparsity(compressed):
  _, report, _ = compressed
  target = report['config']['target_sparsity']
  assert report['pruning']['applied']
  assert len(report['sparsity']) >= 4
  for name, layer in report['sparsity'].items():
    assert abs(layer['sparsity'] - target) <= SPARSITY_TOLERANCE, (name, layer)


@pytest.mark.e2e
def test_int8_scores_agree_with_float(pipeline_artifacts):
  """int8 vs float32 towers and index of the same (trained) model, on the eval split."""
  import tensorflow_transform as tft  # pylint: disable=import-outside-toplevel
  from tfx.types import standard_artifacts  # pylint: disable=import-outside-toplevel
  model, _, teacher, _ = model_lib.load_trainer_state(pipeline_artifacts['model'])
  pruning.build(model)
  output = tft.TFTransformOutput(pipeline_artifacts['transform_graph'])
  raw = conftest.artifact(standard_artifacts.Examples, pipeline_artifacts['raw_examples'],
                          features.SPLITS)
  serialized = benchmark.raw_examples(raw, features.EVAL_SPLIT)
  float_module, _ = export_lib.build_module(model, output, 10, teacher, quantize=False)
  int8_module, _ = export_lib.build_module(model, output, 10, teacher, quantize=True)
  agreement = compress_lib.score_agreement(
      float_module, int8_module, output.transform_features_layer(), serialized,
      output.raw_feature_spec())
  assert agreement['examples'] == len(serialized) > 0
  assert agreement['max_abs_score_error'] <= SCORE_TOLERANCE, agreement
  assert agreement['top10_overlap'] >= MIN_TOP10_OVERLAP, agreement
  # The fast id path (query-less batches skip the Transform graph) maps ids as it does, and
  # the served answers are the same with and without it.
  requests = benchmark.requests(serialized, benchmark.RECOMMEND, 16, model.max_history, 4)
  assert export_lib.check_fast_ids(int8_module, requests)['equal']
  slow, _ = export_lib.build_module(model, output, 10, teacher, quantize=True, fast_ids=False)
  for request in requests:
    fast_answer, slow_answer = int8_module.serve(**request), slow.serve(**request)
    np.testing.assert_array_equal(fast_answer['item_ids'].numpy(),
                                  slow_answer['item_ids'].numpy())
    np.testing.assert_allclose(fast_answer['scores'].numpy(), slow_answer['scores'].numpy(),
                               atol=1e-6)
  # The float32 ServingTowers are the trained model's tower: same scores as ExportModule's.
  trained = serving_model.ExportModule(model, output, 10, teacher)
  transformed = output.transform_features_layer()(
      tf.io.parse_example(tf.constant(serialized[:64]), output.raw_feature_spec()))
  # pylint: disable=protected-access
  np.testing.assert_allclose(float_module.catalog_scores(transformed)[0].numpy(),
                             trained.catalog_scores(transformed)[0].numpy(), atol=1e-5)


FRESH_PROCESS = textwrap.dedent('''
    import json, sys
    import tensorflow as tf
    import tensorflow_text  # registers the TF Text ops, as TF Serving links them
    model = tf.saved_model.load(sys.argv[1])
    serve = model.signatures['serving_default']
    out = serve(user_id=tf.constant(['nobody', '']), history=tf.constant([['', ''], ['', '']]),
                query=tf.constant(['', 'red heart']))
    ranks = model.signatures['eval_ranks']
    project = [m for m in sys.modules if m.split('.')[0] in
               ('trainers', 'components', 'compression', 'serving', 'pipeline', 'tfx',
                'tensorflow_transform', 'tensorflow_recommenders', 'tensorflow_hub', 'official',
                'tf_keras', 'tensorflow_model_optimization')]
    print(json.dumps({'item_ids': out['item_ids'].numpy().astype(str).tolist(),
                      'scores': out['scores'].numpy().tolist(), 'project_modules': project,
                      'path': sys.path}))
''')


@pytest.mark.e2e
def test_compressed_model_answers_in_a_fresh_process(compressed, tmp_path):
  uri, _, _ = compressed
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'TF_USE_LEGACY_KERAS')}
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  # -I: isolated mode (no PYTHONPATH, no user site, the script's directory not on sys.path);
  # run from an empty directory so that nothing of the repository can be imported.
  result = subprocess.run([sys.executable, '-I', '-c', FRESH_PROCESS,
                           os.path.join(uri, 'Format-Serving')],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  answer = json.loads(result.stdout.strip().splitlines()[-1])
  assert answer['project_modules'] == []
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert not any(p and os.path.abspath(p).startswith(repo + os.sep + 'trainers')
                 for p in answer['path'])
  assert repo not in [os.path.abspath(p) for p in answer['path'] if p]
  assert len(answer['item_ids']) == 2 and len(answer['item_ids'][0]) > 0
  assert all(s[0] >= s[-1] for s in answer['scores'])


def test_retention_counts_the_changed_hits_as_noise():
  trained = np.array([1, 3, 20, 5, 50, 2, 11, 9])     # 5 hits at 10
  same = ladder.retention(trained, trained)
  assert same == {'point': 1.0, 'lower': 1.0, 'lost': 0, 'gained': 0, 'trained_hits': 5}
  # One hit lost, one gained: the same recall, but two changed users make it uncertain.
  swapped = ladder.retention(trained, np.array([1, 3, 4, 5, 50, 2, 11, 19]))
  assert swapped['point'] == 1.0 and swapped['lost'] == swapped['gained'] == 1
  assert swapped['lower'] == pytest.approx((5 - np.sqrt(2)) / 5)
  with pytest.raises(ValueError, match='other examples'):
    ladder.retention(trained, trained[:3])


def test_the_ladder_goes_from_most_to_least_compressed_and_falls_back():
  steps = ladder.candidates(0.5, False, True, True, True, uses_text=True)
  assert [(c.student, c.sparsity) for c in steps] == [
      (True, 0.5), (True, 0.25), (True, 0.125), (True, 0.0), (False, 0.0)]
  assert all(c.quantize for c in steps)
  assert [c.sparsity for c in ladder.candidates(0.5, False, True, True, True, False)] == [
      0.5, 0.25, 0.125, 0.0]
  assert ladder.candidates(0.8, True, True, True, False, True) == [
      ladder.Candidate(True, 0.8, True, True)]
  results = [dict(name=c.name, retention=r, retention_lower=r - 0.01, lost=1, gained=0)
             for c, r in zip(steps, (0.9, 0.995, 1.01, 1.0, 1.0))]
  assert ladder.choose(results, 0.99)[0] == 2
  index, why = ladder.choose([dict(r, retention_lower=0.5) for r in results], 0.99)
  assert index == len(results) - 1 and 'fell back' in why
