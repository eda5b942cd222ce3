"""The Kubeflow Pipelines v2 spec compiles, parses into kfp's PipelineSpec and is complete."""

import json

from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

import pipeline

EXPECTED_INPUTS = {
    'StatisticsGen': {'examples'},
    'SchemaGen': {'statistics'},
    'ExampleValidator': {'statistics', 'schema'},
    'AnomaliesGate': {'anomalies', 'schema'},
    'Transform': {'examples', 'schema'},
    'Trainer': {'examples', 'transform_graph'},
    'Evaluator': {'examples', 'model'},
    'Pusher': {'model', 'model_blessing'},
}


def test_compiled_spec_has_every_component_image_and_input(tmp_path):
  output = tmp_path / 'pipeline.json'
  assert pipeline.main(['compile', '--target', 'kubeflow', '--output', str(output),
                        '--image', 'registry.example/recommender:1.2.3',
                        '--pipeline-root', 'gs://bucket/root',
                        '--interactions', 's3://bucket/interactions.csv',
                        '--items', 's3://bucket/items.csv',
                        '--serving-dir', 'gs://bucket/serving']) == 0
  with open(output) as f:
    job = json.load(f)
  spec = json_format.ParseDict(job['pipelineSpec'], pipeline_spec_pb2.PipelineSpec())
  tasks = spec.root.dag.tasks
  assert set(tasks) == set(pipeline.NODE_IDS.values())
  for name, task in tasks.items():
    executor = spec.deployment_spec.fields['executors'].struct_value.fields[
        f'{name}_executor'].struct_value
    image = executor.fields['container'].struct_value.fields['image'].string_value
    assert image == 'registry.example/recommender:1.2.3', name
    assert set(task.inputs.artifacts) >= EXPECTED_INPUTS.get(name, set()), name
  assert tasks['Pusher'].trigger_policy.condition  # the Cond on the Evaluator's blessing
  assert job['runtimeConfig']['gcsOutputDirectory'] == 'gs://bucket/root'
  gen = tasks['SequenceExampleGen'].inputs.parameters
  assert gen['interactions'].runtime_value.constant_value.string_value == (
      's3://bucket/interactions.csv')
