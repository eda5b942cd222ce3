"""Beam presets (runners/beam.py) and the --beam-runner flag.

The slow test runs the DAG's Beam components (SequenceExampleGen, StatisticsGen, and SchemaGen
on their statistics) through the LocalDagRunner twice on the same data, with DirectRunner in
memory and with DirectRunner multi-processing on 2 worker processes, and checks that both give
the same split and the same statistics.
"""

import collections
import glob
import json
import math
import os

import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability import local_job_service
from google.protobuf import json_format
from google.protobuf import text_format
from tensorflow_metadata.proto.v0 import schema_pb2
from tensorflow_metadata.proto.v0 import statistics_pb2
from tfx import v1 as tfx

import configs
import pipeline
from runners import beam as beam_runners
from runners import cache_keys
from components import example_gen
from evaluation import artifacts
from evaluation import run_summary

SETUP = '/repo/setup.py'
BEAM_NODES = [configs.NODE_IDS[key] for key in ('example_gen', 'statistics_gen', 'schema_gen')]


def _options(args):
  return PipelineOptions(args).get_all_options(drop_default=True)


# --- the preset table ----------------------------------------------------------------------


def test_in_memory_is_the_default_and_distributed_presets_ship_setup_file():
  assert beam_runners.beam_pipeline_args(setup_file=SETUP) == [
      '--direct_running_mode=in_memory', '--direct_num_workers=1',
      f'--sdk_container_image={beam_runners.PIPELINE_IMAGE}']
  assert pipeline.BEAM_IN_MEMORY == beam_runners.beam_pipeline_args(
      'in-memory', setup_file=pipeline.SETUP_FILE)
  required = {'dataflow': ['project=p', 'region=r', 'temp_location=gs://b/t'],
              'flink': ['flink_master=jm:8081'], 'spark': ['spark_rest_url=http://m:6066']}
  for preset in beam_runners.PRESETS:
    options = _options(beam_runners.beam_pipeline_args(preset, required.get(preset, ()),
                                                       setup_file=SETUP))
    if preset in beam_runners.LOCAL_PRESETS:
      # Nothing to ship; the image only stops TFX from building an sdist of itself.
      assert 'setup_file' not in options and options['sdk_container_image'], preset
    else:
      assert options['setup_file'] == SETUP, preset


def test_multi_processing_runs_n_worker_processes():
  options = _options(beam_runners.beam_pipeline_args('multi-processing', workers=3))
  assert options['direct_running_mode'] == 'multi_processing'
  assert options['direct_num_workers'] == 3
  default = _options(beam_runners.beam_pipeline_args('multi-processing'))
  assert default['direct_num_workers'] == beam_runners.usable_cpus()
  with pytest.raises(beam_runners.PresetError):
    beam_runners.beam_pipeline_args('multi-processing', workers=0)


def test_remote_presets_name_their_runner_and_worker_image():
  dataflow = _options(beam_runners.beam_pipeline_args(
      'dataflow', ['project=p', '--region=r', 'temp_location=gs://b/t'], image='reg/img:1'))
  assert dataflow['runner'] == 'DataflowRunner'
  assert (dataflow['project'], dataflow['region'], dataflow['temp_location']) == (
      'p', 'r', 'gs://b/t')
  assert dataflow['sdk_container_image'] == 'reg/img:1'
  flink = _options(beam_runners.beam_pipeline_args('flink', ['flink_master=jm:8081'],
                                                   image='reg/img:1'))
  assert flink['runner'] == 'FlinkRunner' and flink['flink_master'] == 'jm:8081'
  assert flink['flink_submit_uber_jar'] is True
  assert (flink['environment_type'], flink['environment_config']) == ('DOCKER', 'reg/img:1')
  spark = _options(beam_runners.beam_pipeline_args('spark', ['spark_rest_url=http://m:6066']))
  assert spark['runner'] == 'SparkRunner' and spark['spark_submit_uber_jar'] is True
  assert spark['environment_config'] == beam_runners.PIPELINE_IMAGE
  for preset in ('flink', 'spark'):
    # A Beam job server instead of an uber jar; a worker-pool sidecar instead of Docker.
    portable = _options(beam_runners.beam_pipeline_args(
        preset, ['job_endpoint=js:8099', 'environment_type=EXTERNAL',
                 'environment_config=localhost:50000']))
    assert portable['runner'] == 'PortableRunner' and portable['job_endpoint'] == 'js:8099'
    assert (portable['environment_type'], portable['environment_config']) == (
        'EXTERNAL', 'localhost:50000')
    assert f'{preset}_submit_uber_jar' not in portable


def test_beam_arg_replaces_a_preset_value_instead_of_repeating_it():
  args = beam_runners.beam_pipeline_args('in-memory', ['direct_num_workers=1', 'job_name=x'])
  assert args == ['--direct_running_mode=in_memory', '--direct_num_workers=1', '--job_name=x',
                  f'--sdk_container_image={beam_runners.PIPELINE_IMAGE}']
  for bad in ('=x', ' '):
    with pytest.raises(beam_runners.PresetError, match='KEY=VALUE'):
      beam_runners.beam_pipeline_args('in-memory', [bad])


@pytest.mark.parametrize('preset, missing', [
    ('dataflow', 'project, region, temp_location'), ('flink', 'flink_master'),
    ('spark', 'spark_rest_url')])
def test_missing_options_stop_run_and_compile_with_one_line(preset, missing, tmp_path, capsys):
  output = tmp_path / 'out'
  assert pipeline.main(['run', '--output', str(output), '--beam-runner', preset]) == 2
  assert pipeline.main(['compile', '--output', str(tmp_path / 'p.json'),
                        '--beam-runner', preset]) == 2
  errors = capsys.readouterr().err.splitlines()
  assert len(errors) == 2 and errors[0] == errors[1], errors
  assert errors[0].startswith(f'error: --beam-runner {preset} needs {missing}: pass --beam-arg')
  assert not output.exists() and not (tmp_path / 'p.json').exists()


def test_compiled_spec_runs_the_preset_inside_the_image(tmp_path):
  output = tmp_path / 'pipeline.json'
  assert pipeline.main(['compile', '--output', str(output), '--image', 'reg/img:2',
                        '--beam-runner', 'flink', '--beam-arg', 'flink_master=jm:8081',
                        '--beam-arg', 'parallelism=8']) == 0
  with open(output) as f:
    executors = json.load(f)['pipelineSpec']['deploymentSpec']['executors']
  for node in BEAM_NODES[:2] + [configs.NODE_IDS['transform'], configs.NODE_IDS['evaluator']]:
    container = executors[f'{node}_executor']['container']
    options = _options(container['args'])  # the executor's own flags are not Beam's: dropped
    assert options['runner'] == 'FlinkRunner', node
    assert options['environment_config'] == container['image'] == 'reg/img:2', node
    assert options['parallelism'] == 8, node
    assert options['setup_file'] == beam_runners.CONTAINER_SETUP_FILE, node


# --- the same split and statistics on 2 worker processes -----------------------------------


def _run_beam_components(data_dir, root, preset):
  """SequenceExampleGen -> StatisticsGen -> SchemaGen as create_pipeline wires them."""
  interactions, items = str(data_dir / 'interactions.csv'), str(data_dir / 'items.csv')
  gen = example_gen.SequenceExampleGen(interactions=interactions, items=items,
                                       input_fingerprint=cache_keys.fingerprint(interactions, items))
  statistics_gen = tfx.components.StatisticsGen(examples=gen.outputs['examples'])
  schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs['statistics'],
                                        infer_feature_shape=True)
  assert [c.id for c in (gen, statistics_gen, schema_gen)] == BEAM_NODES
  metadata_path = str(root / 'metadata.db')
  tfx.orchestration.LocalDagRunner().run(tfx.dsl.Pipeline(
      pipeline_name='beam-presets',
      pipeline_root=str(root),
      components=[gen, statistics_gen, schema_gen],
      enable_cache=False,
      metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
          metadata_path),
      beam_pipeline_args=beam_runners.beam_pipeline_args(
          preset, setup_file=pipeline.SETUP_FILE, workers=2)))
  reader = run_summary.RunReader(metadata_path, 'beam-presets')
  return {key: reader.output_uri(node, key) for node, key in (
      (BEAM_NODES[0], 'examples'), (BEAM_NODES[0], 'split'), (BEAM_NODES[1], 'statistics'),
      (BEAM_NODES[2], 'schema'))}


@pytest.fixture(scope='module')
def two_runs(e2e_data, tmp_path_factory):
  """{preset: (output URIs, SDK worker subprocesses started)} for in-memory, multi-processing."""
  runs = {}
  original = local_job_service.SubprocessSdkWorker.run
  for preset in ('in-memory', 'multi-processing'):
    started = []

    def run_and_record(worker, started=started):
      started.append(worker._worker_id)  # pylint: disable=protected-access
      return original(worker)  # raises unless the worker process exits 0

    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(local_job_service.SubprocessSdkWorker, 'run', run_and_record)
      uris = _run_beam_components(e2e_data[0], tmp_path_factory.mktemp(preset), preset)
    runs[preset] = uris, started
  return runs


def _examples(uri):
  """{split: Counter of canonical examples}; canonical because proto map order is not fixed."""
  splits = {}
  for split_dir in sorted(glob.glob(os.path.join(uri, 'Split-*'))):
    counter = collections.Counter()
    files = sorted(glob.glob(os.path.join(split_dir, '*.gz')))
    for record in tf.data.TFRecordDataset(files, compression_type='GZIP'):
      example = tf.train.Example.FromString(record.numpy())
      counter[tuple(sorted(
          (name, tuple(getattr(feature, feature.WhichOneof('kind')).value))
          for name, feature in example.features.feature.items()))] += 1
    splits[os.path.basename(split_dir)] = counter
  return splits


def _feature_stats(uri):
  """{split: (num_examples, {feature path: stats as a dict})}."""
  result = {}
  for path in sorted(glob.glob(os.path.join(uri, 'Split-*', 'FeatureStats.pb'))):
    with open(path, 'rb') as f:
      stats = statistics_pb2.DatasetFeatureStatisticsList.FromString(f.read())
    (dataset,) = stats.datasets
    result[os.path.basename(os.path.dirname(path))] = (dataset.num_examples, {
        '.'.join(feature.path.step): json_format.MessageToDict(feature)
        for feature in dataset.features})
  return result


def _assert_same(left, right, where=''):
  """Equal, except that floats may differ in their last bits (sums in another order)."""
  if isinstance(left, dict):
    assert set(left) == set(right), where
    for key in left:
      _assert_same(left[key], right[key], f'{where}/{key}')
  elif isinstance(left, list):
    assert len(left) == len(right), where
    for i, (a, b) in enumerate(zip(left, right)):
      _assert_same(a, b, f'{where}[{i}]')
  elif isinstance(left, float) or isinstance(right, float):
    assert math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-12), (where, left, right)
  else:
    assert left == right, (where, left, right)


@pytest.mark.e2e
@pytest.mark.distributed
def test_multi_processing_gives_the_same_split_and_statistics(two_runs):
  (memory, memory_workers), (multi, multi_workers) = (two_runs['in-memory'],
                                                      two_runs['multi-processing'])
  # In memory no SDK worker process starts; multi-processing starts 2 per Beam pipeline
  # (SequenceExampleGen's and StatisticsGen's), and each of them exited cleanly.
  assert memory_workers == []
  assert len(multi_workers) >= 4 and len(multi_workers) % 2 == 0, multi_workers

  memory_examples, multi_examples = _examples(memory['examples']), _examples(multi['examples'])
  assert set(memory_examples) >= {'Split-train', 'Split-eval', 'Split-test'}
  assert memory_examples == multi_examples
  csv_files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(memory['split'],
                                                                         '*.csv')))
  assert {'train.csv', 'valid.csv', 'test.csv'} <= set(csv_files)
  for name in csv_files:
    with open(os.path.join(memory['split'], name)) as a, open(
        os.path.join(multi['split'], name)) as b:
      assert collections.Counter(a) == collections.Counter(b), name
  # The example counts come from Beam counters, which the workers report back.
  assert (artifacts.read_split_report(memory['split']) == artifacts.read_split_report(multi['split']))

  memory_stats, multi_stats = _feature_stats(memory['statistics']), _feature_stats(
      multi['statistics'])
  assert set(memory_stats) == set(memory_examples)
  for split, (count, features) in memory_stats.items():
    assert count == sum(memory_examples[split].values()) == multi_stats[split][0], split
    _assert_same(features, multi_stats[split][1], split)

  schemas = []
  for uris in (memory, multi):
    schema = text_format.Parse(open(os.path.join(uris['schema'], 'schema.pbtxt')).read(),
                               schema_pb2.Schema())
    schemas.append({feature.name: json_format.MessageToDict(feature)
                    for feature in schema.feature})
  assert schemas[0] == schemas[1]
