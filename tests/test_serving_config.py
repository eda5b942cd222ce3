"""serving_config/ (TF Serving configs, Kubernetes and docker-compose) and servable/warmup.py.

Every text proto parses with TF Serving's messages and holds the values serving_config/README.md
explains; the YAML files are valid and wire those files, ports, probes and the GPU together; the
local server (and tensorflow_model_server when it is on PATH) serves a model with these files;
warm-up records round-trip and are replayed at load.
"""

import concurrent.futures
import glob
import logging
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
import yaml
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

import serving_fixtures as fx
from serving import client as client_lib
from serving import model_server
from serving import protos
from servable import warmup

CONFIG = os.path.join(fx.REPO, 'serving_config')
CONTAINER_BASE_PATH = '/models/recommender'
CONFIG_MOUNT = '/etc/tf-serving'
# Each text proto in serving_config/ and the message it is.
PROTOS = {'models.config': model_server_config_pb2.ModelServerConfig,
          'monitoring.config': protos.MonitoringConfig,
          'batching_parameters_gpu.txt': protos.BatchingParameters,
          'batching_parameters_cpu.txt': protos.BatchingParameters}


def parse(name):
  with open(os.path.join(CONFIG, name)) as f:
    return text_format.Parse(f.read(), PROTOS[name]())


def load_yaml(name):
  with open(os.path.join(CONFIG, name)) as f:
    return list(yaml.safe_load_all(f))


def deployment():
  (document,) = load_yaml('k8s/deployment.yaml')
  return document


def container():
  (tf_serving,) = deployment()['spec']['template']['spec']['containers']
  return tf_serving


def flags(args):
  """--name=value flags as a dict."""
  return dict(arg[2:].split('=', 1) for arg in args)


def test_every_text_proto_in_serving_config_parses():
  """Each .config / .txt file is one of TF Serving's config messages and parses as it."""
  names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG, '*.config')) +
                 glob.glob(os.path.join(CONFIG, '*.txt')))
  assert names == sorted(PROTOS)
  for name in names:
    assert parse(name).ListFields(), f'{name} is empty'


def test_models_config_serves_recommender_newest_version():
  (model,) = parse('models.config').model_config_list.config
  assert (model.name, model.base_path, model.model_platform) == (
      fx.MODEL, CONTAINER_BASE_PATH, 'tensorflow')
  assert model.model_version_policy.latest.num_versions == 1


def test_monitoring_config_enables_prometheus():
  prometheus = parse('monitoring.config').prometheus_config
  assert prometheus.enable and prometheus.path == '/monitoring/prometheus/metrics'


@pytest.mark.parametrize('name', ['batching_parameters_gpu.txt', 'batching_parameters_cpu.txt'])
def test_batching_parameters_set_every_value_and_pad_histories(name):
  """Every value is set explicitly (no silent defaults), and variable-width histories batch."""
  params = parse(name)
  for field in ('max_batch_size', 'batch_timeout_micros', 'num_batch_threads',
                'max_enqueued_batches'):
    assert params.HasField(field), f'{name}: {field} unset'
  assert params.max_batch_size.value >= 1 and params.num_batch_threads.value >= 1
  assert params.pad_variable_length_inputs
  if params.allowed_batch_sizes:  # TF Serving refuses sizes not increasing or not ending at max
    sizes = list(params.allowed_batch_sizes)
    assert sizes == sorted(set(sizes)) and sizes[-1] == params.max_batch_size.value


def test_gpu_batching_bounds_latency_and_fixes_batch_shapes():
  gpu, cpu = parse('batching_parameters_gpu.txt'), parse('batching_parameters_cpu.txt')
  assert 0 < gpu.batch_timeout_micros.value <= 5000  # a few ms at most of the 10 ms budget
  assert gpu.allowed_batch_sizes
  assert gpu.max_enqueued_batches.value == gpu.num_batch_threads.value
  assert cpu.batch_timeout_micros.value == 0


def test_kustomization_sets_the_gpu_image_tag_and_generates_the_config_map():
  (kustomization,) = load_yaml('kustomization.yaml')
  assert kustomization['kind'] == 'Kustomization'
  for resource in kustomization['resources']:
    assert os.path.isfile(os.path.join(CONFIG, resource)), resource
  (image,) = kustomization['images']
  assert image['name'] == container()['image'] == 'tensorflow/serving'  # no tag in the manifest
  assert re.fullmatch(r'\d+\.\d+\.\d+-gpu', image['newTag'])
  (generator,) = kustomization['configMapGenerator']
  for name in generator['files']:
    assert os.path.isfile(os.path.join(CONFIG, name)), name
  volumes = {v['name']: v for v in deployment()['spec']['template']['spec']['volumes']}
  assert volumes['config']['configMap']['name'] == generator['name']
  # Every file a flag names is in the ConfigMap, mounted where the flag looks.
  mounts = {m['name']: m['mountPath'] for m in container()['volumeMounts']}
  assert mounts['config'] == CONFIG_MOUNT
  named = [v for k, v in flags(container()['args']).items() if k.endswith('_file')]
  assert sorted(named) == sorted(f'{CONFIG_MOUNT}/{name}' for name in generator['files'])
  assert CONTAINER_BASE_PATH.startswith(mounts['models'] + '/')


def test_deployment_requests_a_gpu_and_probes_model_status():
  document = deployment()
  assert (document['apiVersion'], document['kind']) == ('apps/v1', 'Deployment')
  assert 'replicas' not in document['spec']  # the HPA owns it
  tf_serving = container()
  assert tf_serving['command'] == ['tensorflow_model_server']
  resources = tf_serving['resources']
  assert resources['limits']['nvidia.com/gpu'] == 1 == resources['requests']['nvidia.com/gpu']
  ports = {p['name']: p['containerPort'] for p in tf_serving['ports']}
  assert ports == {'grpc': 8500, 'http': 8501}
  for probe in ('startupProbe', 'readinessProbe', 'livenessProbe'):
    get = tf_serving[probe]['httpGet']
    assert get['path'] == f'/v1/models/{fx.MODEL}' and ports[get['port']] == 8501, probe
  labels = document['spec']['template']['metadata']['labels']
  assert document['spec']['selector']['matchLabels'].items() <= labels.items()


def test_gpu_host_flags_are_chosen_and_consistent():
  """The flags the issue asks for are set, and thread counts match the pod's CPUs."""
  args = flags(container()['args'])
  cpus = int(container()['resources']['limits']['cpu'])
  assert 0 < float(args['per_process_gpu_memory_fraction']) < 1
  assert int(args['tensorflow_intra_op_parallelism']) == cpus
  assert int(args['tensorflow_inter_op_parallelism']) == cpus
  assert parse('batching_parameters_gpu.txt').num_batch_threads.value == cpus
  assert args['enable_batching'] == 'true' and args['enable_model_warmup'] == 'true'
  assert args['batching_parameters_file'].endswith('batching_parameters_gpu.txt')
  assert int(args['file_system_poll_wait_seconds']) > 1
  assert int(args['model_config_file_poll_wait_seconds']) > 0
  assert (args['port'], args['rest_api_port']) == ('8500', '8501')
  annotations = deployment()['spec']['template']['metadata']['annotations']
  assert annotations['prometheus.io/path'] == parse('monitoring.config').prometheus_config.path


def test_service_and_autoscaler():
  services = load_yaml('k8s/service.yaml')
  selector = deployment()['spec']['selector']['matchLabels']
  for service in services:
    assert service['kind'] == 'Service' and service['spec']['selector'] == selector
  assert {p['port'] for p in services[0]['spec']['ports']} == {8500, 8501}
  (hpa,) = load_yaml('k8s/hpa.yaml')
  assert (hpa['apiVersion'], hpa['kind']) == ('autoscaling/v2', 'HorizontalPodAutoscaler')
  target = hpa['spec']['scaleTargetRef']
  assert (target['apiVersion'], target['kind'], target['name']) == (
      'apps/v1', 'Deployment', deployment()['metadata']['name'])
  assert 2 <= hpa['spec']['minReplicas'] < hpa['spec']['maxReplicas']
  (metric,) = hpa['spec']['metrics']
  assert metric['resource']['name'] == 'cpu'
  assert 'cpu' in container()['resources']['requests']  # Utilization needs a request


def test_docker_compose_runs_one_gpu_host_with_the_same_flags():
  (compose,) = load_yaml('docker-compose.gpu.yml')
  service = compose['services']['tf-serving']
  assert re.fullmatch(r'tensorflow/serving:\$\{TF_SERVING_TAG:-\d+\.\d+\.\d+-gpu\}',
                      service['image'])
  assert service['entrypoint'] == ['tensorflow_model_server']
  assert service['command'] == container()['args']
  (gpu,) = service['deploy']['resources']['reservations']['devices']
  assert (gpu['driver'], gpu['count'], gpu['capabilities']) == ('nvidia', 1, ['gpu'])
  assert {p.split(':')[-1] for p in service['ports']} == {'8500', '8501'}
  # Published on loopback unless BIND_ADDRESS says otherwise: TF Serving has no authentication.
  assert all(p.startswith('${BIND_ADDRESS:-127.0.0.1}:') for p in service['ports'])
  volumes = {v['target']: v['source'] for v in service['volumes']}
  assert re.fullmatch(r'\$\{MODEL_BASE_PATH:-[^}]+\}', volumes[CONTAINER_BASE_PATH])
  assert volumes[CONFIG_MOUNT] == '.'


def local_flags(base_path, tmp_path):
  """The GPU hosts' command line, pointed at temp copies of the configs, with CPU batching."""
  shutil.copytree(CONFIG, tmp_path / 'etc', ignore=shutil.ignore_patterns('k8s', '*.yml',
                                                                         '*.yaml'))
  config = tmp_path / 'etc' / 'models.config'
  config.write_text(config.read_text().replace(f'"{CONTAINER_BASE_PATH}"', f'"{base_path}"'))
  args = []
  for arg in container()['args']:
    arg = arg.replace(CONFIG_MOUNT, str(tmp_path / 'etc'))
    arg = arg.replace('batching_parameters_gpu.txt', 'batching_parameters_cpu.txt')
    if not arg.startswith(('--port=', '--rest_api_port=', '--file_system_poll_wait_seconds=')):
      args.append(arg)
  return args + ['--file_system_poll_wait_seconds=1']


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
  return fx.save_model(str(tmp_path_factory.mktemp('tiny') / 'model'), seed=1)


@pytest.mark.parametrize('kind', ['local', 'tensorflow_model_server'])
def test_a_server_serves_with_the_serving_config_files(kind, tiny_model, tmp_path, caplog):
  """The deployment's own flags and files (CPU batching, base path substituted) serve a model
  with warm-up records written by servable.warmup, replayed at load.

  The local server runs in this process (the same flag parsing as `python -m
  serving.model_server`, whose CLI test_serving.py runs as a subprocess); the real binary as a
  subprocess when it is on PATH.
  """
  binary = shutil.which('tensorflow_model_server')
  if kind != 'local' and binary is None:
    pytest.skip('tensorflow_model_server not on PATH')
  caplog.set_level(logging.INFO, logger='model_server')
  warm = str(tmp_path / 'warm')
  shutil.copytree(tiny_model, warm)
  requests = warmup.default_requests(fx.ITEMS)
  warmup.write_warmup_requests(warm, requests)
  fx.publish(warm, str(tmp_path / 'base'), 1)
  argv = local_flags(tmp_path / 'base', tmp_path)
  server = (fx.start_local(argv) if kind == 'local' else
            fx.start_process([binary], argv, str(tmp_path / 'server.log')))
  try:
    with client_lib.RecommenderClient(server.target, fx.MODEL) as client:
      assert client.status() == [(1, 'AVAILABLE', '')]
      top = client.recommend('u1', ['i03', 'i05'])
  finally:
    server.stop()
  reference = tf.saved_model.load(tiny_model).signatures['serving_default']
  expected = reference(user_id=tf.constant(['u1']), history=tf.constant([['i03', 'i05']]),
                       query=tf.constant(['']))['item_ids'].numpy()[0]
  assert [item for item, _ in top] == [i.decode() for i in expected]
  if kind == 'local':
    assert f'({len(requests)} warm-up requests)' in caplog.text


def test_default_requests_cover_batch_1_and_bigger_with_and_without_query(tiny_model):
  """Representative requests of the serving contract, valid for the model's serving_default."""
  requests = warmup.default_requests(fx.ITEMS)
  function = tf.saved_model.load(tiny_model).signatures['serving_default']
  seen = set()
  for request in requests:
    assert (request.model_spec.name, request.model_spec.signature_name) == (
        fx.MODEL, 'serving_default')
    inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    assert set(inputs) == {'user_id', 'history', 'query'}
    batch = len(inputs['user_id'])
    assert inputs['history'].ndim == 2 and len(inputs['history']) == len(inputs['query']) == batch
    assert (inputs['history'][:, 0] == b'').all()  # TF Serving pads with the first value
    assert {h for h in inputs['history'].flat if h} <= {i.encode() for i in fx.ITEMS} | {
        b'warmup-unknown-item'}
    seen.add((batch, any(inputs['query'])))
    outputs = function(**{k: tf.constant(v) for k, v in inputs.items()})
    assert outputs['item_ids'].shape == (batch, fx.K)
  assert {(1, False), (1, True)} <= seen and max(b for b, _ in seen) > 1
  assert {b for b, _ in seen} == {1, 8, 64}
  assert warmup.default_requests([], batch_sizes=(2,))  # an empty catalog still warms


def test_warmup_records_round_trip_as_tf_serving_reads_them(tiny_model, tmp_path):
  """write_warmup_requests writes PredictionLog records at assets.extra/...; they read back."""
  saved = str(tmp_path / 'model')
  shutil.copytree(tiny_model, saved)
  requests = warmup.default_requests(tf.constant(fx.ITEMS), batch_sizes=(1, 4))
  path = warmup.write_warmup_requests(saved, requests)
  assert path == os.path.join(saved, 'assets.extra', 'tf_serving_warmup_requests')
  records = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
             for r in tf.data.TFRecordDataset(path)]
  assert [r.predict_log.request for r in records] == requests
  assert [log.predict_log.request for log in warmup.read_warmup_logs(saved)] == requests
  assert warmup.read_warmup_logs(tiny_model) is None
  with pytest.raises(ValueError):
    warmup.write_warmup_requests(saved, [])
  with pytest.raises(ValueError):
    warmup.write_warmup_requests(saved, requests[:1] * (warmup.MAX_RECORDS + 1))


def test_local_server_replays_warmup_and_fails_a_load_as_tf_serving_does(tiny_model, tmp_path):
  """Warm-up requests run at load; over 1000 records or a failing request fail the load."""
  base = tmp_path / 'base'
  good, too_many, failing = (str(tmp_path / name) for name in ('good', 'many', 'failing'))
  for path in (good, too_many, failing):
    shutil.copytree(tiny_model, path)
  warmup.write_warmup_requests(good, warmup.default_requests(fx.ITEMS, batch_sizes=(1, 3)))
  record = prediction_log_pb2.PredictionLog()
  record.predict_log.request.CopyFrom(fx.predict_request(['u1'], [['i01']]))
  os.makedirs(os.path.dirname(os.path.join(too_many, warmup.WARMUP_FILE)))
  with tf.io.TFRecordWriter(os.path.join(too_many, warmup.WARMUP_FILE)) as writer:
    for _ in range(warmup.MAX_RECORDS + 1):
      writer.write(record.SerializeToString())
  bad = fx.predict_request(['u1'], [['i01']])
  del bad.inputs['query']
  warmup.write_warmup_requests(failing, [bad])
  for version, path in enumerate((good, too_many, failing), 1):
    fx.publish(path, str(base), version)
  config = model_server_config_pb2.ModelConfig(name=fx.MODEL, base_path=str(base))
  config.model_version_policy.all.SetInParent()
  model = model_server.Model(config)
  model.poll(initial=True)
  states = {s.version: (s.state, s.status.error_message) for s in
            model.status(model_pb2.ModelSpec(name=fx.MODEL)).model_version_status}
  model.close()
  assert states[1] == (get_model_status_pb2.ModelVersionStatus.AVAILABLE, '')
  assert 'exceeds the maximum (1000)' in states[2][1]
  assert 'query' in states[3][1]


def test_batching_pads_each_request_with_its_own_first_value_as_tf_serving():
  """pad_variable_length_inputs fills with the request's first value: "" for client requests."""
  batcher = fx.padding_batcher(lambda inputs: {'history': inputs['history']}, 4)
  raw = np.array([[b'a', b'b']], dtype=object)  # no leading "": padded with a real item
  wide = tf.make_ndarray(client_lib.predict_request(['u'], [['x', 'y', 'z']]).inputs['history'])
  narrow = tf.make_ndarray(client_lib.predict_request(['u'], [['x']]).inputs['history'])
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    outputs = list(pool.map(lambda h: batcher({'history': h})['history'], [wide, narrow, raw]))
  batcher.close()
  assert outputs[0].tolist() == [[b'', b'x', b'y', b'z']]
  assert outputs[1].tolist() == [[b'', b'x', b'', b'']]
  assert outputs[2].tolist() == [[b'a', b'b', b'a', b'a']]


def test_local_server_refuses_a_monitoring_config_that_does_not_parse(tmp_path):
  """As tensorflow_model_server, a bad --monitoring_config_file stops the server."""
  bad = tmp_path / 'monitoring.config'
  bad.write_text('prometheus_config { enabled: true }')
  args = model_server.parse_args(['--model_base_path=/nowhere',
                                  f'--monitoring_config_file={bad}'])
  with pytest.raises(text_format.ParseError):
    model_server.monitoring_config(args)
  args.monitoring_config_file = os.path.join(CONFIG, 'monitoring.config')
  assert model_server.monitoring_config(args).prometheus_config.enable


def test_k_goes_with_recommend_k_and_only_with_it():
  """predict_request never switches signatures behind the caller's back: `k` is recommend_k's
  input, and either both are given or neither."""
  from servable import requests as requests_lib  # pylint: disable=import-outside-toplevel
  request = requests_lib.predict_request(['u'], [['a']], signature_name=requests_lib.K_SIGNATURE,
                                         k=40)
  assert request.model_spec.signature_name == requests_lib.K_SIGNATURE
  assert tf.make_ndarray(request.inputs['k']).tolist() == [40]
  with pytest.raises(ValueError, match='give both or neither'):
    requests_lib.predict_request(['u'], [['a']], k=40)
  with pytest.raises(ValueError, match='give both or neither'):
    requests_lib.predict_request(['u'], [['a']], signature_name=requests_lib.K_SIGNATURE)
  assert 'k' not in requests_lib.predict_request(['u'], [['a']]).inputs
