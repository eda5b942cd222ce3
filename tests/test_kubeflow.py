"""The Kubeflow Pipelines v2 spec compiles, parses into kfp's PipelineSpec and is complete."""

import json

import pytest
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

import configs
import pipeline

EXPECTED_INPUTS = {
    'StatisticsGen': {'examples'},
    'SchemaGen': {'statistics'},
    'ExampleValidator': {'statistics', 'schema'},
    'AnomaliesGate': {'anomalies', 'schema'},
    'Transform': {'examples', 'schema'},
    'Trainer': {'examples', 'transform_graph'},
    'Compressor': {'trained_model', 'transform_graph', 'examples', 'raw_examples'},
    'Evaluator': {'examples', 'model', 'baseline_model'},
    'SearchEvaluator': {'examples', 'model', 'baseline_model'},
    'Pusher': {'model', 'model_blessing'},
}


def test_compiled_spec_has_every_component_image_and_input(tmp_path):
  output = tmp_path / 'pipeline.json'
  assert pipeline.main(['compile', '--target', 'kubeflow', '--output', str(output),
                        '--image', 'registry.example/recommender:1.2.3',
                        '--pipeline-root', 'gs://bucket/root',
                        '--interactions', 's3://bucket/interactions.csv',
                        '--items', 's3://bucket/items.csv',
                        '--serving-dir', 'gs://bucket/serving',
                        '--trainer', 'fine_tune_layers=2']) == 0
  with open(output) as f:
    job = json.load(f)
  spec = json_format.ParseDict(job['pipelineSpec'], pipeline_spec_pb2.PipelineSpec())
  tasks = spec.root.dag.tasks
  assert set(tasks) == set(configs.NODE_IDS.values())
  for name, task in tasks.items():
    executor = spec.deployment_spec.fields['executors'].struct_value.fields[
        f'{name}_executor'].struct_value
    image = executor.fields['container'].struct_value.fields['image'].string_value
    assert image == 'registry.example/recommender:1.2.3', name
    assert set(task.inputs.artifacts) >= EXPECTED_INPUTS.get(name, set()), name
  assert tasks['Pusher'].trigger_policy.condition  # the Cond on the Evaluator's blessing

  def producer(task, key):
    return tasks[task].inputs.artifacts[key].task_output_artifact.producer_task
  # The compressed model is evaluated against the trained one, and it is what is pushed.
  assert producer('Evaluator', 'model') == producer('Pusher', 'model') == 'Compressor'
  assert producer('Evaluator', 'baseline_model') == producer('Compressor', 'trained_model') == (
      'Trainer')
  assert job['runtimeConfig']['gcsOutputDirectory'] == 'gs://bucket/root'
  # A GPU host's switch travels in the Trainer's custom_config.
  trainer = tasks['Trainer'].inputs.parameters['custom_config']
  assert json.loads(trainer.runtime_value.constant_value.string_value)['fine_tune_layers'] == 2
  gen = tasks['SequenceExampleGen'].inputs.parameters
  assert gen['interactions'].runtime_value.constant_value.string_value == (
      's3://bucket/interactions.csv')


def test_readme_submission_recipes_accept_the_compiled_file(tmp_path):
  """docs/scaling.md "Compile and submit": kfp.Client's package reader and Vertex's PipelineJob, offline."""
  import yaml  # pylint: disable=import-outside-toplevel
  from google.auth import credentials  # pylint: disable=import-outside-toplevel
  from google.cloud import aiplatform  # pylint: disable=import-outside-toplevel
  from kfp.client import client  # pylint: disable=import-outside-toplevel

  output = tmp_path / 'pipeline.json'
  assert pipeline.main(['compile', '--output', str(output),
                        '--pipeline-root', 'gs://bucket/root']) == 0
  # kfp.Client().create_run_from_pipeline_package reads the bare PipelineSpec from a .yaml.
  with open(output) as f:
    spec = json.load(f)['pipelineSpec']
  with open(tmp_path / 'pipeline.yaml', 'w') as f:
    yaml.safe_dump(spec, f)
  doc = client._extract_pipeline_yaml(str(tmp_path / 'pipeline.yaml'))  # pylint: disable=protected-access
  assert set(doc.pipeline_spec.root.dag.tasks) == set(configs.NODE_IDS.values())
  # Vertex AI takes the PipelineJob file as it is (built, not submitted).
  job = aiplatform.PipelineJob(display_name='recommender', template_path=str(output),
                               pipeline_root='gs://bucket/root', enable_caching=True,
                               project='my-project', location='us-central1',
                               credentials=credentials.AnonymousCredentials())
  assert job._gca_resource.runtime_config.gcs_output_directory == 'gs://bucket/root'  # pylint: disable=protected-access
  assert set(job._gca_resource.pipeline_spec['root']['dag']['tasks']) == set(  # pylint: disable=protected-access
      configs.NODE_IDS.values())


def test_tune_adds_the_tuner_whose_best_hyperparameters_feed_the_trainer(tmp_path):
  output = tmp_path / 'pipeline.json'
  assert pipeline.main(['compile', '--target', 'kubeflow', '--output', str(output),
                        '--tune', '6', '--trainer', 'embedding_dim=32']) == 0
  with open(output) as f:
    spec = json_format.ParseDict(json.load(f)['pipelineSpec'], pipeline_spec_pb2.PipelineSpec())
  tasks = spec.root.dag.tasks
  assert set(tasks) == set(configs.NODE_IDS.values()) | {configs.TUNER_ID}
  hyperparameters = tasks['Trainer'].inputs.artifacts['hyperparameters']
  assert hyperparameters.task_output_artifact.producer_task == configs.TUNER_ID
  assert set(tasks[configs.TUNER_ID].inputs.artifacts) >= {'examples', 'transform_graph',
                                                            'base_model'}
  config = json.loads(tasks[configs.TUNER_ID].inputs.parameters['custom_config']
                      .runtime_value.constant_value.string_value)
  assert (config['tune_trials'], config['embedding_dim']) == (6, 32)


def test_tune_takes_a_number_of_trials(capsys):
  with pytest.raises(SystemExit) as exit_:
    pipeline.main(['compile', '--tune', 'many'])
  assert exit_.value.code == 2
  assert "expected a number of trials" in capsys.readouterr().err
