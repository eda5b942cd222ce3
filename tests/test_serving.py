"""The local model server and the client, through the real tensorflow-serving-api stubs.

Every server test runs against the local server (serving/model_server.py, in this process) and
again against the real `tensorflow_model_server` binary when it is on PATH, with the same flags.
"""

import concurrent.futures
import json
import logging
import os
import resource
import shutil
import signal
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

import serving_fixtures as fx
from conftest import write_csv
from serving import batching
from serving import client as client_lib
from serving import model_server

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
MAX_REQUEST_BYTES = 1 << 20
KINDS = ['local', 'tensorflow_model_server']

# (user_ids, histories): a known user, an unknown user with unknown and known history items,
# and an empty history.
BATCH = (['u1', 'stranger', 'u3'], [['i03', 'i05'], ['nope', 'i07'], []])


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  """Two SavedModel versions of the tiny recommender (different weights), not yet published."""
  root = tmp_path_factory.mktemp('models')
  return {version: fx.save_model(str(root / f'v{version}'), seed=version) for version in (1, 2)}


_LOADED = {}


def reference(path, user_ids, histories):
  """The SavedModel's serving_default called in this process: (item_ids, scores) as arrays."""
  if path not in _LOADED:
    _LOADED[path] = tf.saved_model.load(path).signatures['serving_default']
  request = fx.predict_request(user_ids, histories)
  outputs = _LOADED[path](**{k: tf.make_ndarray(v) for k, v in request.inputs.items()})
  return outputs['item_ids'].numpy(), outputs['scores'].numpy()


def start(kind, tmp_path, argv):
  """Starts a server of `kind` with tensorflow_model_server flags `argv` (ports are added).

  The request-size limit is set with each server's own flag; the binary is skipped when absent.
  """
  if kind == 'local':
    return fx.start_local(argv + [f'--max_request_bytes={MAX_REQUEST_BYTES}'])
  binary = shutil.which('tensorflow_model_server')
  if binary is None:
    pytest.skip('tensorflow_model_server not on PATH')
  return fx.start_process(
      [binary], argv + [f'--grpc_channel_arguments=grpc.max_receive_message_length='
                        f'{MAX_REQUEST_BYTES}'], str(tmp_path / 'tensorflow_model_server.log'))


def model_flags(base_path):
  """The flags serving one model from `base_path`, polled every second."""
  return [f'--model_name={fx.MODEL}', f'--model_base_path={base_path}',
          '--file_system_poll_wait_seconds=1']


@pytest.fixture(scope='module', params=KINDS)
def server(request, models, tmp_path_factory):
  """A server of each kind on a base path holding version 1."""
  tmp_path = tmp_path_factory.mktemp(f'server_{request.param}')
  fx.publish(models[1], str(tmp_path / 'base'), 1)
  running = start(request.param, tmp_path, model_flags(tmp_path / 'base'))
  yield running
  running.stop()


@pytest.fixture
def fresh(request, models, tmp_path):
  """Starts servers for one test (own base path and flags); stops them at its end."""
  started = []

  def make(versions=(1,), extra_flags=(), flags=None):
    base = tmp_path / 'base'
    for version in versions:
      fx.publish(models[version], str(base), version)
    started.append(start(request.param, tmp_path, list(flags or model_flags(base)) +
                         list(extra_flags)))
    return started[-1]

  make.kind = request.param
  yield make
  for running in started:
    running.stop()


def stubs(running):
  """(PredictionService, ModelService) stubs on a server."""
  channel = grpc.insecure_channel(running.target)
  return (prediction_service_pb2_grpc.PredictionServiceStub(channel),
          model_service_pb2_grpc.ModelServiceStub(channel))


def status_of(running):
  """version -> state, from GetModelStatus."""
  request = get_model_status_pb2.GetModelStatusRequest()
  request.model_spec.name = fx.MODEL
  return {s.version: s.state for s in stubs(running)[1].GetModelStatus(request, timeout=10)
          .model_version_status}


def decoded(array):
  """An array of bytes as nested lists of str."""
  return np.char.decode(np.asarray(array).astype(bytes)).tolist()


def wait_for(condition, timeout_s=30.0):
  """Polls `condition` until it holds; fails the test after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.1)


def test_predict_matches_the_savedmodel_in_process(server, models):
  """Predict through the stubs gives the SavedModel's own top-K, history excluded."""
  response = stubs(server)[0].Predict(fx.predict_request(*BATCH), timeout=10)
  item_ids, scores = reference(models[1], *BATCH)
  assert response.model_spec.version.value == 1
  assert response.model_spec.signature_name == 'serving_default'
  np.testing.assert_array_equal(tf.make_ndarray(response.outputs['item_ids']), item_ids)
  np.testing.assert_allclose(tf.make_ndarray(response.outputs['scores']), scores, rtol=1e-6)
  assert tf.make_ndarray(response.outputs['item_ids']).shape == (3, fx.K)
  assert not {b'i03', b'i05'} & set(item_ids[0])


def test_model_status_is_available(server):
  """GetModelStatus lists the one version on disk as AVAILABLE."""
  assert status_of(server) == {1: AVAILABLE}


def test_metadata_has_serving_default_with_the_contract(server):
  """GetModelMetadata packs a SignatureDefMap whose serving_default is the contract."""
  request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=['signature_def'])
  request.model_spec.name = fx.MODEL
  response = stubs(server)[0].GetModelMetadata(request, timeout=10)
  signature_map = get_model_metadata_pb2.SignatureDefMap()
  assert response.metadata['signature_def'].Unpack(signature_map)
  signature = signature_map.signature_def['serving_default']
  assert response.model_spec.version.value == 1
  inputs = {k: (v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in
            signature.inputs.items()}
  assert inputs == {'user_id': (tf.string.as_datatype_enum, [-1]),
                    'history': (tf.string.as_datatype_enum, [-1, -1]),
                    'query': (tf.string.as_datatype_enum, [-1])}
  assert signature.outputs['item_ids'].dtype == tf.string.as_datatype_enum
  assert signature.outputs['scores'].dtype == tf.float32.as_datatype_enum


def _bad_request(case):
  """A PredictRequest broken in the way `case` names."""
  request = fx.predict_request(['u1'], [['i03']])
  if case == 'wrong_dtype':
    request.inputs['user_id'].CopyFrom(tf.make_tensor_proto([7], dtype=tf.int64))
  elif case == 'missing_input':
    del request.inputs['query']
  elif case == 'unknown_input':
    request.inputs['color'].CopyFrom(tf.make_tensor_proto(['red']))
  elif case == 'unknown_model':
    request.model_spec.name = 'nope'
  elif case == 'unknown_version':
    request.model_spec.version.value = 99
  elif case == 'unknown_signature':
    request.model_spec.signature_name = 'nope'
  elif case == 'oversized':
    request.inputs['history'].CopyFrom(tf.make_tensor_proto([['x' * 1000] * 1100]))
  return request


@pytest.mark.parametrize('case, code', [
    ('wrong_dtype', grpc.StatusCode.INVALID_ARGUMENT),
    ('missing_input', grpc.StatusCode.INVALID_ARGUMENT),
    ('unknown_input', grpc.StatusCode.INVALID_ARGUMENT),
    ('unknown_model', grpc.StatusCode.NOT_FOUND),
    ('unknown_version', grpc.StatusCode.NOT_FOUND),
    ('unknown_signature', grpc.StatusCode.FAILED_PRECONDITION),
    ('oversized', grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_bad_request_gets_its_status_code_and_a_message(server, case, code):
  """Each malformed or unservable request gets its gRPC status and a message."""
  with pytest.raises(grpc.RpcError) as error:
    stubs(server)[0].Predict(_bad_request(case), timeout=10)
  assert error.value.code() == code
  assert error.value.details()
  if server.kind == 'local' and case in ('wrong_dtype', 'missing_input', 'unknown_input'):
    assert {'wrong_dtype': 'user_id', 'missing_input': 'query',
            'unknown_input': 'color'}[case] in error.value.details()


def test_rest_matches_grpc(server, models):
  """REST predict (row and columnar), status and metadata agree with gRPC."""
  item_ids, scores = reference(models[1], *BATCH)
  url = f'{server.rest_url}/v1/models/{fx.MODEL}'
  request = fx.predict_request(*BATCH)
  histories = decoded(tf.make_ndarray(request.inputs['history']))
  rows = [{'user_id': u, 'history': h, 'query': ''} for u, h in zip(BATCH[0], histories)]
  predictions = requests.post(f'{url}:predict', json={'instances': rows}, timeout=10).json()
  assert [p['item_ids'] for p in predictions['predictions']] == decoded(item_ids)
  np.testing.assert_allclose([p['scores'] for p in predictions['predictions']], scores,
                             rtol=1e-6)
  columns = {'user_id': BATCH[0], 'history': histories, 'query': [''] * 3}
  outputs = requests.post(f'{url}/versions/1:predict', json={'inputs': columns},
                          timeout=10).json()['outputs']
  assert outputs['item_ids'] == decoded(item_ids)
  status = requests.get(url, timeout=10).json()['model_version_status']
  assert [(s['version'], s['state']) for s in status] == [('1', 'AVAILABLE')]
  metadata = requests.get(f'{url}/metadata', timeout=10).json()
  assert set(metadata['metadata']['signature_def']['signature_def']['serving_default']['inputs']
             ) == {'user_id', 'history', 'query'}
  assert requests.get(f'{server.rest_url}/v1/models/nope', timeout=10).status_code == 404
  bad = requests.post(f'{url}:predict', json={'instances': [{'user_id': 'u1'}]}, timeout=10)
  assert bad.status_code == 400 and bad.json()['error']


def test_rest_rejects_an_oversized_body(server):
  """A REST body over --max_request_bytes is answered 413, not read into memory."""
  if server.kind != 'local':
    pytest.skip('tensorflow_model_server has no REST body limit to test')
  body = {'instances': [{'user_id': 'u1', 'history': ['x' * MAX_REQUEST_BYTES], 'query': ''}]}
  answer = requests.post(f'{server.rest_url}/v1/models/{fx.MODEL}:predict', json=body, timeout=10)
  assert answer.status_code == 413 and 'larger than' in answer.json()['error']


class _Looper:
  """Calls Predict in a loop on a thread and records each answer's version or failure."""

  def __init__(self, running):
    self._stub = stubs(running)[0]
    self.versions, self.failures, self.items = [], [], {}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop)
    self._thread.start()

  def _loop(self):
    request = fx.predict_request(*BATCH)
    while not self._stop.is_set():
      try:
        response = self._stub.Predict(request, timeout=10)
      except grpc.RpcError as e:
        self.failures.append(e)
        continue
      version = response.model_spec.version.value
      self.versions.append(version)
      self.items[version] = tf.make_ndarray(response.outputs['item_ids'])

  def stop(self):
    self._stop.set()
    self._thread.join()


@pytest.mark.parametrize('fresh', KINDS, indirect=True)
def test_new_version_is_picked_up_with_zero_failed_requests(fresh, models, tmp_path):
  """A version published while a client loops is served next; no request fails."""
  running = fresh()
  looper = _Looper(running)
  try:
    wait_for(lambda: looper.versions)
    fx.publish(fx.save_model(str(tmp_path / 'v2_new'), seed=2), str(tmp_path / 'base'), 2)
    wait_for(lambda: 2 in looper.versions)
    wait_for(lambda: status_of(running) == {2: AVAILABLE, 1: END})
    answered = len(looper.versions)
    wait_for(lambda: len(looper.versions) > answered + 5)
  finally:
    looper.stop()
  assert looper.failures == []
  switch = looper.versions.index(2)
  assert set(looper.versions[:switch]) == {1} and set(looper.versions[switch:]) == {2}
  np.testing.assert_array_equal(looper.items[2], reference(models[2], *BATCH)[0])


@pytest.mark.parametrize('fresh', KINDS, indirect=True)
def test_a_version_copied_file_by_file_is_loaded_once_complete(fresh, models, tmp_path, caplog):
  """A Pusher-style copy (saved_model.pb first) is not loaded half-copied."""
  if fresh.kind != 'local':
    pytest.skip("the wait for a complete version directory is the local server's rule; "
                'tensorflow_model_server loads a version directory as soon as it appears')
  running = fresh()
  caplog.set_level(logging.INFO, logger='model_server')
  looper = _Looper(running)
  try:
    # Like the TFX Pusher: file by file into the final directory, saved_model.pb first.
    files = sorted((os.path.relpath(os.path.join(root, n), models[2])
                    for root, _, names in os.walk(models[2]) for n in names),
                   key=lambda f: f != 'saved_model.pb')
    for name in files:
      os.makedirs(os.path.dirname(tmp_path / 'base' / '2' / name), exist_ok=True)
      shutil.copyfile(os.path.join(models[2], name), tmp_path / 'base' / '2' / name)
      assert status_of(running).get(2) != END
      time.sleep(0.4)
    wait_for(lambda: status_of(running) == {2: AVAILABLE, 1: END})
  finally:
    looper.stop()
  assert looper.failures == []
  assert 'Failed to load' not in caplog.text
  assert 'Loaded servable version {name: recommender version: 2}' in caplog.text
  assert 'Unloaded servable version {name: recommender version: 1}' in caplog.text


@pytest.mark.parametrize('fresh', KINDS, indirect=True)
@pytest.mark.parametrize('policy, served', [('latest { num_versions: 2 }', {1, 2}),
                                            ('all {}', {1, 2}),
                                            ('specific { versions: 1 }', {1})])
def test_model_config_file_version_policy_and_labels(fresh, models, tmp_path, policy, served):
  """The config file's version policy decides the served versions; labels resolve."""
  config = tmp_path / 'models.config'
  config.write_text(f"""model_config_list {{ config {{
      name: '{fx.MODEL}' base_path: '{tmp_path / "base"}' model_platform: 'tensorflow'
      model_version_policy {{ {policy} }}
      version_labels {{ key: 'stable' value: 1 }} }} }}""")
  running = fresh(versions=(1, 2), flags=[f'--model_config_file={config}',
                                          '--allow_version_labels_for_unavailable_models=true'])
  wait_for(lambda: {v for v, s in status_of(running).items() if s == AVAILABLE} == served)
  predict = stubs(running)[0].Predict
  assert predict(fx.predict_request(*BATCH), timeout=10).model_spec.version.value == max(served)
  for spec in [{'version': 1}, {'version_label': 'stable'}]:
    response = predict(fx.predict_request(*BATCH, **spec), timeout=10)
    assert response.model_spec.version.value == 1
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs['item_ids']),
                                  reference(models[1], *BATCH)[0])
  if 2 not in served:
    with pytest.raises(grpc.RpcError) as error:
      predict(fx.predict_request(*BATCH, version=2), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize('fresh', KINDS, indirect=True)
def test_batched_concurrent_predicts_match_the_savedmodel(fresh, models, tmp_path):
  """With batching on, concurrent requests each get their own rows back."""
  params = tmp_path / 'batching_parameters.txt'
  params.write_text('max_batch_size { value: 8 } batch_timeout_micros { value: 20000 } '
                    'num_batch_threads { value: 1 } max_enqueued_batches { value: 16 }')
  running = fresh(extra_flags=['--enable_batching=true', f'--batching_parameters_file={params}'])
  users = [f'u{n % 4}' for n in range(24)]
  histories = [[fx.ITEMS[n % 30], fx.ITEMS[(n * 7) % 30]] for n in range(24)]
  predict = stubs(running)[0].Predict
  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    answers = list(pool.map(lambda u, h: predict(fx.predict_request([u], [h]), timeout=20),
                            users, histories))
  item_ids, _ = reference(models[1], users, histories)
  np.testing.assert_array_equal(
      np.concatenate([tf.make_ndarray(a.outputs['item_ids']) for a in answers]), item_ids)


def test_batcher_joins_concurrent_calls_and_pads_variable_lengths():
  """Concurrent calls become one padded call, split back per caller."""
  calls = []

  def fn(inputs):
    calls.append(inputs['history'].shape)
    return {'first': inputs['history'][:, 0], 'width': np.full(len(inputs['history']),
                                                               inputs['history'].shape[1])}

  batcher = fx.padding_batcher(fn, 6)
  histories = [np.array([[b'a%d' % n] * (n + 1)] * 2, dtype=object) for n in range(3)]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    outputs = list(pool.map(lambda h: batcher({'history': h}), histories))
  batcher.close()
  assert calls == [(6, 3)]  # three calls of 2 rows, padded to the widest history
  for n, output in enumerate(outputs):
    assert output['first'].tolist() == [b'a%d' % n] * 2
    assert output['width'].tolist() == [3, 3]


@pytest.mark.filterwarnings('error::pytest.PytestUnhandledThreadExceptionWarning')
def test_batcher_with_several_threads_answers_every_call():
  """Batch threads racing for the queue answer every call and none dies."""
  params = batching.BatchingParameters()
  params.max_batch_size.value = 4
  params.batch_timeout_micros.value = 1000
  params.num_batch_threads.value = 4
  batcher = batching.Batcher(lambda inputs: {'twice': inputs['x'] * 2}, params, 'test')
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    calls = [pool.submit(batcher, {'x': np.array([n, n])}) for n in range(200)]
    assert [c.result(timeout=20)['twice'].tolist() for c in calls] == [[2 * n] * 2
                                                                       for n in range(200)]
  batcher.close()


@pytest.mark.parametrize('fresh', KINDS, indirect=True)
def test_warmup_requests_are_replayed_before_serving(fresh, models, tmp_path, caplog):
  """assets.extra/tf_serving_warmup_requests are run before the version serves."""
  caplog.set_level(logging.INFO, logger='model_server')
  warm = str(tmp_path / 'warm')
  shutil.copytree(models[1], warm)
  fx.write_warmup(warm, [fx.predict_request(*BATCH), fx.predict_request(['u2'], [['i01']])])
  fx.publish(warm, str(tmp_path / 'base'), 1)
  running = fresh(versions=())
  assert status_of(running) == {1: AVAILABLE}
  if running.kind == 'local':
    assert '(2 warm-up requests)' in caplog.text


def test_client_recommends_and_reports_status_and_metadata(server, models):
  """RecommenderClient returns the top items, truncated to k, and the status."""
  with client_lib.RecommenderClient(server.target, fx.MODEL) as client:
    top = client.recommend('u1', ['i03', 'i05'], k=3)
    assert client.status() == [(1, 'AVAILABLE', '')]
    assert set(client.metadata()['serving_default'].inputs) == {'user_id', 'history', 'query'}
    assert len(client.recommend('stranger', [], query='red lantern')) == fx.K
  item_ids, scores = reference(models[1], ['u1'], [['i03', 'i05']])
  assert [item for item, _ in top] == decoded(item_ids[0, :3])
  np.testing.assert_allclose([score for _, score in top], scores[0, :3], rtol=1e-6)


def test_client_cli_prints_ranks_titles_and_scores(server, models, tmp_path, capsys):
  """The client CLI prints rank, item id, score and the title from the items file."""
  items = write_csv(tmp_path / 'items.csv', ['item_id', 'title'],
                    [(i, f'title of {i}') for i in fx.ITEMS])
  assert client_lib.main(['--target', server.target, 'recommend', '--user', 'u1', '--history',
                          'i03,i05', '--query', 'red lantern', '-k', '3', '--items', items]) == 0
  rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
  item_ids, scores = reference(models[1], ['u1'], [['i03', 'i05']])
  assert [row[:3] for row in rows] == [[str(rank), item, f'{score:.4f}'] for rank, item, score
                                       in zip((1, 2, 3), decoded(item_ids[0, :3]), scores[0])]
  assert all(' '.join(row[3:]) == f'title of {row[1]}' for row in rows)


def test_client_cli_reports_a_server_error(server, capsys):
  """The client CLI prints the server's status code and exits 1."""
  assert client_lib.main(['--target', server.target, '--model_name', 'nope', 'status']) == 1
  assert capsys.readouterr().err.startswith('error: NOT_FOUND: ')


def test_local_server_cli_serves_and_stops_on_sigterm(models, tmp_path):
  """`python -m serving.model_server` serves, and logs loads and unloads until SIGTERM."""
  fx.publish(models[1], str(tmp_path / 'base'), 1)
  running = fx.start_process(fx.local_server_command(), model_flags(tmp_path / 'base'),
                             str(tmp_path / 'server.log'))
  try:
    with client_lib.RecommenderClient(running.target, fx.MODEL) as client:
      assert client.status() == [(1, 'AVAILABLE', '')]
      assert len(client.recommend('u1', ['i03'])) == fx.K
  finally:
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=20) == 0
  log = running.log()
  assert 'Loaded servable version {name: recommender version: 1}' in log
  assert 'Unloaded servable version {name: recommender version: 1}' in log


# Hardening: hot swaps, request limits, faults and the REST edge cases are answered cleanly.

def _local(request):
  return pytest.mark.parametrize('fresh', ['local'], indirect=True)(request)


def _copy_file_by_file(source, target):
  """A non-atomic publication, as the stock TFX Pusher makes it (saved_model.pb last)."""
  files = sorted((os.path.relpath(os.path.join(root, n), source)
                  for root, _, names in os.walk(source) for n in names),
                 key=lambda f: f == 'saved_model.pb')
  for name in files:
    os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
    shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    time.sleep(0.05)


@_local
def test_hot_swaps_under_load_fail_no_request(fresh, models, tmp_path):
  """20 times: the served version is moved away, then its successor copied in file by file.

  The old version serves until the new one is loaded and warmed (availability-preserving).
  """
  running = fresh(extra_flags=['--file_system_poll_wait_seconds=0.1'])
  base, aside = tmp_path / 'base', tmp_path / 'aside'
  aside.mkdir()
  looper = _Looper(running)
  try:
    wait_for(lambda: looper.versions)
    for version in range(2, 22):
      os.rename(base / str(version - 1), aside / str(version - 1))
      time.sleep(0.3)  # several polls see no version, then a half-written one
      _copy_file_by_file(models[2 - version % 2], str(base / str(version)))
      wait_for(lambda v=version: looper.versions[-1:] == [v])
  finally:
    looper.stop()
  assert looper.failures == []
  assert sorted(set(looper.versions)) == list(range(1, 22))


def _tensor(dtype, dims, **values):
  proto = tf.make_tensor_proto([], dtype=dtype)
  proto.tensor_shape.Clear()
  for size in dims:
    proto.tensor_shape.dim.add(size=size)
  for field, value in values.items():
    getattr(proto, field).extend(value)
  return proto


@pytest.mark.parametrize('dims, code, words', [
    ([10_000_000], grpc.StatusCode.RESOURCE_EXHAUSTED, '--max_tensor_elements'),
    ([2**40], grpc.StatusCode.RESOURCE_EXHAUSTED, '--max_tensor_elements'),
    ([-1], grpc.StatusCode.INVALID_ARGUMENT, 'negative'),
    ([5000], grpc.StatusCode.INVALID_ARGUMENT, '--max_batch_rows'),
])
def test_a_tensor_over_the_limits_is_refused_before_it_is_decoded(server, dims, code, words):
  """An 89-byte request declaring a huge shape allocates nothing and gets its status."""
  if server.kind != 'local':
    pytest.skip('tensorflow_model_server has no such limit flags')
  request = fx.predict_request(['u1'], [['i03']])
  request.inputs['user_id'].CopyFrom(_tensor(tf.string, dims, string_val=[b'u1']))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  with pytest.raises(grpc.RpcError) as error:
    stubs(server)[0].Predict(request, timeout=10)
  assert (error.value.code(), words in error.value.details()) == (code, True)
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB
  assert stubs(server)[0].Predict(fx.predict_request(*BATCH), timeout=10).outputs


@_local
@pytest.mark.parametrize('data, words', [
    (b'\xff' * 64, 'not a serialized tensorflow.serving.PredictRequest'),
    # model_spec.name as bytes that are not UTF-8 (a proto3 string field).
    (b'\x0a\x04\x0a\x02\xff\xfe', 'not a serialized tensorflow.serving.PredictRequest'),
])
def test_request_bytes_that_do_not_parse_are_invalid_argument(fresh, data, words):
  """Bytes that are not the method's request message get INVALID_ARGUMENT naming it (grpc's
  own deserializer would answer INTERNAL 'Exception deserializing request!')."""
  server = fresh()
  channel = grpc.insecure_channel(server.target)
  raw_predict = channel.unary_unary('/tensorflow.serving.PredictionService/Predict')
  with pytest.raises(grpc.RpcError) as error:
    raw_predict(data, timeout=10)
  assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert words in error.value.details()
  classify = channel.unary_unary('/tensorflow.serving.PredictionService/Classify')
  with pytest.raises(grpc.RpcError) as error:
    classify(b'', timeout=10)
  assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
  assert stubs(server)[0].Predict(fx.predict_request(*BATCH), timeout=10).outputs


@_local
def test_an_internal_fault_is_answered_internal_and_500_not_dropped(fresh, monkeypatch):
  """A fault inside the model call is a gRPC INTERNAL and a REST 500, both with a message."""
  running = fresh()

  def fault(*_):
    raise RuntimeError('disk on fire')

  monkeypatch.setattr(model_server.Servable, 'run', fault)
  with pytest.raises(grpc.RpcError) as error:
    stubs(running)[0].Predict(fx.predict_request(*BATCH), timeout=10)
  assert error.value.code() == grpc.StatusCode.INTERNAL
  assert 'disk on fire' in error.value.details()
  rows = [{'user_id': 'u1', 'history': ['i03'], 'query': ''}]
  answer = requests.post(f'{running.rest_url}/v1/models/{fx.MODEL}:predict',
                         json={'instances': rows}, timeout=10)
  assert answer.status_code == 500 and 'disk on fire' in answer.json()['error']


def _raw_http(url, data: bytes, read_timeout=10.0) -> bytes:
  """Sends raw bytes to the REST port and reads the whole answer."""
  host, port = url.split('//')[1].split(':')
  with socket.create_connection((host, int(port)), timeout=read_timeout) as sock:
    sock.sendall(data)
    chunks = []
    while True:
      chunk = sock.recv(65536)
      if not chunk:
        return b''.join(chunks)
      chunks.append(chunk)


_ROW = {'user_id': 'u1', 'history': ['i03'], 'query': ''}


@pytest.mark.parametrize('path, body, words', [
    (':predict', {'instances': 5}, 'must be a list'),
    (':predict', {'signature_name': 5, 'instances': [_ROW]}, 'signature_name'),
    (':predict', '[' * 100_000 + ']' * 100_000, 'nested too deeply'),
    (':predict', {'instances': [{**_ROW, 'user_id': {'b64': '!!!'}}]}, 'base64'),
    (':predict', {'instances': [_ROW, {'user_id': 'u2'}]}, 'same named inputs'),
    (':predict', {'instances': [_ROW] * 5000}, '--max_batch_rows'),
    ('/versions/99999999999999999999', None, 'int64'),
])
def test_rest_bad_input_gets_a_4xx_json_error(server, path, body, words):
  """Each bad REST request is answered 4xx with a JSON error naming what is wrong."""
  if server.kind != 'local':
    pytest.skip("the messages are the local server's")
  url = f'{server.rest_url}/v1/models/{fx.MODEL}{path}'
  if body is None:
    answer = requests.get(url, timeout=10)
  else:
    answer = requests.post(url, data=body if isinstance(body, str) else json.dumps(body),
                           timeout=30)
  assert 400 <= answer.status_code < 500 and words in answer.json()['error'], answer.text


def test_rest_content_length_not_a_number_is_answered_400(server):
  if server.kind != 'local':
    pytest.skip("the messages are the local server's")
  answer = _raw_http(server.rest_url, f'POST /v1/models/{fx.MODEL}:predict HTTP/1.1\r\n'
                     'Host: x\r\nContent-Length: abc\r\n\r\n{}'.encode())
  head, _, body = answer.partition(b'\r\n\r\n')
  assert head.startswith(b'HTTP/1.0 400') and b'Content-Length' in body


@pytest.mark.parametrize('request_bytes, status', [
    (f'PUT /v1/models/{fx.MODEL}:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}'
     .encode(), 501),
    (b'GARBAGE\r\n\r\n', 400),
    (b'GET /v1/models/' + fx.MODEL.encode() + b' HTTP/1.1\r\nX-Big: ' + b'a' * 70_000 +
     b'\r\n\r\n', 431),
])
def test_rest_refusals_of_http_server_itself_are_json(server, request_bytes, status):
  """http.server's own refusals (a method it has no handler for, a request line it cannot
  parse, a header line too long) are JSON with a status line too, and close the connection."""
  if server.kind != 'local':
    pytest.skip("the messages are the local server's")
  head, _, body = _raw_http(server.rest_url, request_bytes).partition(b'\r\n\r\n')
  assert head.startswith(f'HTTP/1.0 {status}'.encode()) or head.startswith(
      f'HTTP/1.1 {status}'.encode()), head
  assert b'Connection: close' in head and json.loads(body)['error']


@_local
def test_rest_timeout_and_connection_limit(fresh):
  """A silent connection is closed after --rest_api_timeout_in_ms; beyond
  --rest_api_num_threads connections, a new one gets 503 at once; then all is served again."""
  running = fresh(extra_flags=['--rest_api_timeout_in_ms=1000', '--rest_api_num_threads=2'])
  host, port = running.rest_url.split('//')[1].split(':')
  idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]
  for sock in idle:
    sock.sendall(b'GET /v1/models/recommender HTTP/1.1\r\nHost: x\r\n')  # partial headers
  time.sleep(0.2)
  busy = requests.get(f'{running.rest_url}/v1/models/{fx.MODEL}', timeout=10)
  assert busy.status_code == 503 and 'rest_api_num_threads' in busy.json()['error']
  start = time.monotonic()
  assert [sock.recv(100) for sock in idle] == [b'', b'']  # closed by the server
  assert time.monotonic() - start < 5
  for sock in idle:
    sock.close()
  wait_for(lambda: requests.get(f'{running.rest_url}/v1/models/{fx.MODEL}',
                                timeout=10).status_code == 200, 10)


@_local
@pytest.mark.parametrize('source', ['flag', 'env'])
def test_rest_token_is_required_when_set(fresh, monkeypatch, source):
  if source == 'env':
    monkeypatch.setenv(model_server.TOKEN_ENV, 's3cret')
  running = fresh(extra_flags=['--http_auth_token=s3cret'] if source == 'flag' else [])
  url = f'{running.rest_url}/v1/models/{fx.MODEL}'
  assert requests.get(url, timeout=10).status_code == 401
  wrong = requests.get(url, headers={'Authorization': 'Bearer nope'}, timeout=10)
  assert wrong.status_code == 401 and 'Authorization' in wrong.json()['error']
  assert requests.get(url, headers={'Authorization': 'Bearer s3cret'},
                      timeout=10).status_code == 200


def test_binding_beyond_loopback_without_a_token_warns(models, tmp_path, caplog):
  fx.publish(models[1], str(tmp_path / 'base'), 1)
  caplog.set_level(logging.WARNING, logger='model_server')
  running = fx.start_local(model_flags(tmp_path / 'base') + ['--rest_api_bind_address=0.0.0.0'])
  running.stop()
  assert 'REST is bound to 0.0.0.0 without --http_auth_token' in caplog.text


@_local
def test_a_version_directory_beyond_int64_is_ignored(fresh, models, tmp_path):
  running = fresh()
  shutil.copytree(models[2], tmp_path / 'base' / '99999999999999999999')
  time.sleep(2.5)  # two polls
  assert status_of(running) == {1: AVAILABLE}
  assert stubs(running)[0].Predict(fx.predict_request(*BATCH), timeout=10).outputs


@pytest.mark.parametrize('fresh', ['local'], indirect=True)
def test_monitoring_config_exports_request_counts_and_latencies(fresh):
  """--monitoring_config_file with prometheus_config: Predict calls counted by status and
  timed, on the REST port at the configured path, as tensorflow_model_server does; a model
  name the server does not serve counts as <unknown> (no label per random name)."""
  from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=g-import-not-at-top
  config = os.path.join(fx.REPO, 'serving_config', 'monitoring.config')
  running = fresh(extra_flags=[f'--monitoring_config_file={config}'])
  predict = stubs(running)[0].Predict
  for _ in range(2):
    predict(fx.predict_request(*BATCH), timeout=10)
  bad = fx.predict_request(*BATCH)
  bad.inputs.pop('query')
  for request in (bad, fx.predict_request(*BATCH, name='nope')):
    with pytest.raises(grpc.RpcError):
      predict(request, timeout=10)
  page = requests.get(f'{running.rest_url}/monitoring/prometheus/metrics', timeout=10)
  assert page.status_code == 200 and page.headers['Content-Type'].startswith('text/plain')
  samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(page.text) for s in family.samples}
  count = ':tensorflow:serving:request_count_total'
  assert samples[(count, (('model_name', fx.MODEL), ('status', 'OK')))] == 2
  assert samples[(count, (('model_name', fx.MODEL), ('status', 'INVALID_ARGUMENT')))] == 1
  assert samples[(count, (('model_name', '<unknown>'), ('status', 'NOT_FOUND')))] == 1
  latency = (':tensorflow:serving:request_latency_count',
             (('API', 'predict'), ('entrypoint', 'serving_default'), ('model_name', fx.MODEL)))
  assert samples[latency] == 3
