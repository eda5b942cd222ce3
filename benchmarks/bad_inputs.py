"""Bad-input replay: a catalog of bad and edge inputs against the project's real servers.

    python benchmarks/bad_inputs.py --model output/serving/recommender \\
        [--items data/online_retail_sample/items.csv] [--json bad_inputs.json]

It measures the goal of the hardening work: every bad input gets a clear answer, and the model
server's memory grows by less than 100 MB for any single request. It starts, as subprocesses on
free loopback ports, the local model server (`python -m serving.model_server`, gRPC and REST) on
the `--model` base path and the real-time service (`python -m serving.realtime.service
--embedded`) in front of it, waits until the model is AVAILABLE and /healthz answers 200, then
replays four classes of inputs, one request at a time:

1. gRPC (the tensorflow-serving-api stubs): Predict with missing, unknown, wrongly typed or
   wrongly shaped inputs, declared shapes far beyond the values sent, too many rows, unknown
   models, versions, labels and signatures, an empty batch, non-UTF-8 bytes, bytes that are not
   a protobuf, a message over --max_request_bytes, the recommend_k signature with bad k;
   GetModelMetadata and GetModelStatus with bad specs. Clean: a status in CLEAN_CODES, with a
   message when not OK, within GRPC_TIMEOUT_S.
2. REST (the model server's TF Serving REST API), over raw sockets: bad, nested and non-object
   JSON, wrong field types, ragged rows, bad base64, versions beyond int64, bad Content-Length,
   unknown paths and methods, a malformed request line. Clean: 4xx/5xx with a JSON object that
   has "error".
3. The real-time service's HTTP API (GET /recommend, POST /events, /stats, /metrics, /healthz):
   bad k and user parameters, lone surrogates, bad timestamps and quantities, nested JSON,
   bodies of the wrong type or size, bad framing headers. Clean: 4xx/5xx with a JSON "error".
4. The data contract, in this process: small bad CSV files read with contract.data.
   read_contract (what pipeline.py runs before anything else). Clean: a DataError whose message
   is one line naming the file.

In each class a few valid inputs are replayed too (expect 'ok'): a valid input is clean only if
it is served (gRPC OK, HTTP 2xx, a valid read); a bad one (expect 'error') only if it is refused;
'either' marks edge cases that may go both ways (an empty batch, non-UTF-8 bytes in a string
tensor). A dropped connection, a time-out, an exception or an answer outside the rules above is
"not clean" and listed with what came back.

Memory: the model server's RSS (psutil) is read before and after each gRPC and REST request; the
largest single-request growth and the growth over the whole replay are reported (a transient
peak inside one request that is freed before it returns is not seen).

The benchmark reports, it does not gate: the exit status is 0 whenever the replay ran, 2 for bad
flags, 1 when a server did not start.
"""

import argparse
import dataclasses
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
if sys.path and os.path.abspath(sys.path[0] or '.') == _HERE:
  sys.path[0] = REPO  # `python benchmarks/bad_inputs.py`: import the project, not benchmarks/
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import grpc
import psutil
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.framework import tensor_shape_pb2
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from contract import data as contract
from servable import requests as requests_lib
from serving import client as client_lib

MODEL = 'recommender'
GRPC_TIMEOUT_S = 15.0  # a call still running after this is a hang (DEADLINE_EXCEEDED)
HTTP_TIMEOUT_S = 15.0
START_TIMEOUT_S = 240.0
CLEAN_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED}
MEMORY_GOAL_MB = 100.0
SHOWN = 160  # characters of an answer shown in the report

OK, ERROR, EITHER = 'ok', 'error', 'either'


@dataclasses.dataclass
class Case:
  """One input: `send()` delivers it and returns the raw answer, which the class judges."""
  name: str
  send: Callable[[], Any]
  expect: str = ERROR  # OK: must be served; ERROR: must be refused; EITHER: both are clean


@dataclasses.dataclass
class Outcome:
  case: str
  clean: bool
  answer: str  # what came back, one line
  rss_growth_mb: Optional[float] = None


def _one_line(text: str) -> str:
  text = ' '.join(str(text).split())
  return text if len(text) <= SHOWN else text[:SHOWN] + '...'


def replay(cases: Sequence[Case], judge: Callable[[Any, str], Tuple[bool, str]],
           pid: Optional[int] = None) -> List[Outcome]:
  """Sends each case in turn; with `pid`, that process's RSS is read around each request."""
  process = psutil.Process(pid) if pid else None
  outcomes = []
  for case in cases:
    before = process.memory_info().rss if process else 0
    try:
      clean, shown = judge(case.send(), case.expect)
    except Exception as e:  # pylint: disable=broad-except (a dropped connection, a hang, ...)
      clean, shown = False, f'{type(e).__name__}: {e}'
    growth = None
    if process:
      growth = (process.memory_info().rss - before) / 2**20
    outcomes.append(Outcome(case.name, clean, _one_line(shown), growth))
  return outcomes


# 1. gRPC --------------------------------------------------------------------------------------

def _strings(values, shape=None) -> tensor_pb2.TensorProto:
  return tf.make_tensor_proto(values, dtype=tf.string, shape=shape)


def _declared(dtype: int, shape: Sequence[int], **values) -> tensor_pb2.TensorProto:
  """A TensorProto whose declared shape need not match the values it carries."""
  proto = tensor_pb2.TensorProto(dtype=dtype, **values)
  proto.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
      dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]))
  return proto


def _request(inputs: Dict[str, tensor_pb2.TensorProto], name: str = MODEL,
             signature: str = 'serving_default', version: Optional[int] = None,
             label: str = '', output_filter: Sequence[str] = ()) -> predict_pb2.PredictRequest:
  request = predict_pb2.PredictRequest()
  request.model_spec.name = name
  request.model_spec.signature_name = signature
  if version is not None:
    request.model_spec.version.value = version
  if label:
    request.model_spec.version_label = label
  for key, proto in inputs.items():
    request.inputs[key].CopyFrom(proto)
  request.output_filter.extend(output_filter)
  return request


def _valid_inputs(rows: int = 1, history=('85123A', '71053')) -> Dict[str, tensor_pb2.TensorProto]:
  request = requests_lib.predict_request([f'u{i}' for i in range(rows)], [list(history)] * rows)
  return dict(request.inputs)


def _with_k(k_proto: tensor_pb2.TensorProto) -> Dict[str, tensor_pb2.TensorProto]:
  return dict(_valid_inputs(), k=k_proto)


def grpc_cases(target: str) -> List[Case]:
  """Predict, GetModelMetadata and GetModelStatus with bad and edge inputs."""
  channel = grpc.insecure_channel(target)
  prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
  models = model_service_pb2_grpc.ModelServiceStub(channel)
  raw_predict = channel.unary_unary('/tensorflow.serving.PredictionService/Predict')

  def call(method, request):
    def send():
      try:
        response = method(request, timeout=GRPC_TIMEOUT_S)
      except grpc.RpcError as e:
        return e.code(), e.details() or ''
      if isinstance(response, predict_pb2.PredictResponse):
        shapes = {k: [d.size for d in v.tensor_shape.dim] for k, v in response.outputs.items()}
        return grpc.StatusCode.OK, f'outputs {dict(sorted(shapes.items()))}'
      return grpc.StatusCode.OK, type(response).__name__
    return send

  def predict(title, inputs, expect=ERROR, **spec):
    return Case(title, call(prediction.Predict, _request(inputs, **spec)), expect)

  valid = _valid_inputs()
  user, history, query = valid['user_id'], valid['history'], valid['query']
  string, int64 = types_pb2.DT_STRING, types_pb2.DT_INT64
  one = dict(string_val=[b'x'])
  # The model name as raw protobuf bytes with invalid UTF-8: a field-1 ModelSpec in field 1.
  bad_name = b'\x0a\x04\x0a\x02\xff\xfe'
  oversize = _valid_inputs()
  oversize['query'] = _strings(['q' * (17 << 20)])  # over --max_request_bytes (16 MiB)
  rows_1025 = requests_lib.predict_request([f'u{i}' for i in range(1025)], [['85123A']] * 1025)
  k_sig = requests_lib.K_SIGNATURE

  def k_case(name, proto, expect=ERROR):
    return predict(name, _with_k(proto), expect, signature=k_sig)

  return [
      predict('valid request, 1 row', valid, OK),
      predict('valid request, 1024 rows (the --max_batch_rows limit)', _valid_inputs(1024), OK),
      predict('empty history row', _valid_inputs(history=()), OK),
      predict('no inputs at all', {}),
      predict('missing input: history', {'user_id': user, 'query': query}),
      predict('missing input: user_id', {'history': history, 'query': query}),
      predict('unknown input name: foo', dict(valid, foo=_strings(['x']))),
      predict('wrong dtype: user_id int64', dict(valid, user_id=tf.make_tensor_proto(
          [1], tf.int64))),
      predict('wrong dtype: history float', dict(valid, history=tf.make_tensor_proto(
          [[0.5]], tf.float32))),
      predict('wrong dtype: DT_INVALID', dict(valid, query=_declared(0, [1], **one))),
      predict('unknown dtype number 999', dict(valid, query=_declared(999, [1], **one))),
      predict('declared shape [10000000], one value', dict(valid, user_id=_declared(
          string, [10_000_000], **one))),
      predict('declared shape [2**40], one value', dict(valid, user_id=_declared(
          string, [2**40], **one))),
      predict('declared shape [2**62, 2**62]', dict(valid, history=_declared(
          string, [2**62, 2**62], **one))),
      predict('declared shape [1024, 1025] (1,049,600 elements)', dict(valid, history=_declared(
          string, [1024, 1025], **one))),
      predict('negative shape [-1]', dict(valid, user_id=_declared(string, [-1], **one))),
      predict('negative shape [1, -5]', dict(valid, history=_declared(string, [1, -5], **one))),
      predict('declared [3] with 2 values', dict(valid, user_id=_declared(
          string, [3], string_val=[b'a', b'b']))),
      predict('1025 rows (declared)', dict(valid, user_id=_declared(string, [1025], **one))),
      predict('1025 rows (sent)', dict(rows_1025.inputs)),
      predict('wrong rank: user_id [1, 1]', dict(valid, user_id=_strings([['u1']]))),
      predict('wrong rank: history [1]', dict(valid, history=_strings(['85123A']))),
      predict('scalar user_id', dict(valid, user_id=_strings('u1'))),
      predict('batch sizes differ: 2 users, 1 history', dict(valid, user_id=_strings(
          ['u1', 'u2']))),
      predict('empty batch (0 rows)', {'user_id': _strings([], [0]),
                                       'history': _strings([], [0, 1]),
                                       'query': _strings([], [0])}, EITHER),
      predict('non-UTF-8 bytes in user_id and history', dict(
          valid, user_id=_declared(string, [1], string_val=[b'\xff\xfe\x80']),
          history=_declared(string, [1, 2], string_val=[b'', b'\xc3\x28'])), EITHER),
      predict('1 MB user id', dict(valid, user_id=_strings(['u' * (1 << 20)])), EITHER),
      predict('unknown model', valid, name='no_such_model'),
      predict('empty model name', valid, name=''),
      predict('unknown version 99999', valid, version=99999),
      predict('version -1', valid, version=-1),
      predict('version 2**63-1', valid, version=2**63 - 1),
      predict('unknown version label', valid, label='canary'),
      predict('unknown signature', valid, signature='no_such_signature'),
      predict('signature eval_ranks with serving inputs', valid, signature='eval_ranks'),
      predict('unknown output_filter', valid, output_filter=['no_such_output']),
      Case('non-UTF-8 model name (raw bytes)', call(raw_predict, bad_name)),
      Case('bytes that are not a protobuf', call(raw_predict, b'\xff' * 64)),
      predict('message of 17 MiB (over --max_request_bytes)', oversize),
      # docs/contracts.md §4: k is clipped to [1, min(MAX_K, catalog)], so these are served.
      k_case(f'{k_sig}: k = 0 (clipped to 1)', tf.make_tensor_proto([0], tf.int32), EITHER),
      k_case(f'{k_sig}: k = -5 (clipped to 1)', tf.make_tensor_proto([-5], tf.int32), EITHER),
      k_case(f'{k_sig}: k = 10**6 (clipped to MAX_K)', tf.make_tensor_proto([10**6], tf.int32),
             EITHER),
      k_case(f'{k_sig}: k = MAX_K ({requests_lib.MAX_K})',
             tf.make_tensor_proto([requests_lib.MAX_K], tf.int32), EITHER),
      k_case(f'{k_sig}: k as float', tf.make_tensor_proto([3.0], tf.float32)),
      k_case(f'{k_sig}: k as string', _strings(['3'])),
      k_case(f'{k_sig}: k int64', tf.make_tensor_proto([3], tf.int64)),
      k_case(f'{k_sig}: k shape [2**40]', _declared(types_pb2.DT_INT32, [2**40], int_val=[3])),
      predict(f'{k_sig}: k missing', valid, signature=k_sig),
      Case('GetModelMetadata: no metadata_field', call(
          prediction.GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest(
              model_spec=_request({}).model_spec))),
      Case('GetModelMetadata: unknown model', call(
          prediction.GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest(
              model_spec=_request({}, name='nope').model_spec, metadata_field=['signature_def'])
      )),
      Case('GetModelStatus: unknown version', call(
          models.GetModelStatus, get_model_status_pb2.GetModelStatusRequest(
              model_spec=_request({}, version=424242).model_spec))),
      Case('GetModelStatus: unknown model', call(
          models.GetModelStatus, get_model_status_pb2.GetModelStatusRequest(
              model_spec=_request({}, name='nope').model_spec))),
  ]


def judge_grpc(answer: Tuple[grpc.StatusCode, str], expect: str) -> Tuple[bool, str]:
  code, message = answer
  shown = f'{code.name}: {message}'
  if code not in CLEAN_CODES:
    return False, shown
  if code != grpc.StatusCode.OK and not message.strip():
    return False, shown + '(empty message)'
  if expect == OK and code != grpc.StatusCode.OK:
    return False, 'a valid request refused: ' + shown
  if expect == ERROR and code == grpc.StatusCode.OK:
    return False, 'a bad request served: ' + shown
  return True, shown


# HTTP (classes 2 and 3) -----------------------------------------------------------------------

@dataclasses.dataclass
class HttpAnswer:
  status: int
  content_type: str
  body: bytes


def exchange(port: int, data: bytes, method: str = 'GET', half_close: bool = False
            ) -> HttpAnswer:
  """Sends raw bytes on a new connection and reads one HTTP response.

  half_close: shut the sending side after the bytes (a body that ends early).
  """
  with socket.create_connection(('127.0.0.1', port), timeout=HTTP_TIMEOUT_S) as sock:
    sock.sendall(data)
    if half_close:
      sock.shutdown(socket.SHUT_WR)
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()  # RemoteDisconnected: the connection was dropped without an answer
    return HttpAnswer(response.status, response.getheader('Content-Type', ''), response.read())


def request_bytes(method: str, path: str, body: Optional[bytes] = None,
                  headers: Sequence[Tuple[str, str]] = (), length: bool = True) -> bytes:
  """An HTTP/1.1 request; Content-Length is added for a body unless `length` is False."""
  lines = [f'{method} {path} HTTP/1.1', 'Host: 127.0.0.1']
  lines += [f'{name}: {value}' for name, value in headers]
  if body is not None and length:
    lines.append(f'Content-Length: {len(body)}')
  head = '\r\n'.join(lines).encode('utf-8') + b'\r\n\r\n'
  return head + (body or b'')


def http_case(port: int, name: str, method: str, path: str, body=None, expect: str = ERROR,
              headers: Sequence[Tuple[str, str]] = (), length: bool = True,
              half_close: bool = False, raw: Optional[bytes] = None) -> Case:
  if isinstance(body, (dict, list, int, float, str)) and not isinstance(body, bool):
    body = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
  data = raw if raw is not None else request_bytes(method, path, body, headers, length)
  return Case(name, lambda: exchange(port, data, method, half_close), expect)


def judge_http(answer: HttpAnswer, expect: str) -> Tuple[bool, str]:
  text = answer.body.decode('utf-8', 'replace')
  shown = f'{answer.status} {text}'
  if 200 <= answer.status < 300:
    if answer.content_type.startswith('application/json'):
      try:
        json.loads(answer.body)
      except ValueError:
        return False, f'{answer.status} with a body that is not JSON: {text}'
    if expect == ERROR:
      return False, 'a bad request served: ' + shown
    return True, shown
  if not 400 <= answer.status < 600:
    return False, f'unexpected status: {shown}'
  try:
    payload = json.loads(answer.body)
  except ValueError:
    return False, f'{answer.status} with a body that is not JSON ({answer.content_type}): {text}'
  if not (isinstance(payload, dict) and isinstance(payload.get('error'), str)
          and payload['error'].strip()):
    return False, f'{answer.status} JSON without an "error" message: {text}'
  if expect == OK:
    return False, 'a valid request refused: ' + shown
  return True, shown


# 2. REST of the model server ------------------------------------------------------------------

def rest_cases(port: int) -> List[Case]:
  """TF Serving's REST API with bad and edge requests."""
  predict = f'/v1/models/{MODEL}:predict'
  row = {'user_id': 'u1', 'history': ['', '85123A'], 'query': ''}

  def post(name, body, expect=ERROR, path=predict, **kwargs):
    return http_case(port, name, 'POST', path, body, expect, **kwargs)

  def get(name, path, expect=ERROR):
    return http_case(port, name, 'GET', path, None, expect)

  def length(value: str) -> bytes:
    return request_bytes('POST', predict, b'{}', [('Content-Length', value)], length=False)

  nested = b'{"inputs": {"user_id": ' + b'[' * 50_000 + b'"u"' + b']' * 50_000 + b'}}'
  return [
      get('GET status', f'/v1/models/{MODEL}', OK),
      get('GET metadata', f'/v1/models/{MODEL}/metadata', OK),
      post('valid "instances"', {'instances': [row]}, OK),
      post('valid "inputs" (columnar)', {'inputs': {k: [v] for k, v in row.items()}}, OK),
      post('valid b64 user id', {'instances': [dict(row, user_id={'b64': 'dTE='})]}, OK),
      post('empty "instances" list', {'instances': []}, EITHER),
      post('bad JSON', '{"instances": [', ERROR),
      post('empty body', b'', ERROR),
      post('body not UTF-8', b'\xff\xfe{}', ERROR),
      post('deeply nested JSON body', b'[' * 100_000),
      post('deeply nested JSON value', nested),
      post('body is a list', []),
      post('body is a number', 5),
      post('body is a string', '"instances"'),
      post('{"instances": 5}', {'instances': 5}),
      post('{"instances": "x"}', {'instances': 'x'}),
      post('{"signature_name": 5}', {'signature_name': 5, 'instances': [row]}),
      post('unknown signature', {'signature_name': 'nope', 'instances': [row]}),
      post('both "instances" and "inputs"', {'instances': [row], 'inputs': {}}),
      post('neither "instances" nor "inputs"', {'foo': 1}),
      post('rows with different inputs', {'instances': [row, {'user_id': 'u2'}]}),
      post('ragged history rows', {'inputs': {'user_id': ['a', 'b'], 'query': ['', ''],
                                               'history': [['', 'x'], ['']]}}),
      post('bad b64', {'instances': [dict(row, user_id={'b64': '!!!not base64'})]}),
      post('b64 with other keys', {'instances': [dict(row, user_id={'b64': 'dTE=', 'x': 1})]}),
      post('number for a string input', {'instances': [dict(row, user_id=5)]}),
      post('null for a string input', {'instances': [dict(row, user_id=None)]}),
      post('NaN literal for a string input', '{"instances": [{"user_id": NaN, "history": [""], '
           '"query": ""}]}'),
      post('unknown input name', {'instances': [dict(row, foo='x')]}),
      post('missing input', {'instances': [{'user_id': 'u1', 'query': ''}]}),
      post('1025 instances', {'instances': [row] * 1025}),
      post('version 99999999999999999999', {'instances': [row]},
           path=f'/v1/models/{MODEL}/versions/99999999999999999999:predict'),
      post('unknown version 5', {'instances': [row]},
           path=f'/v1/models/{MODEL}/versions/5:predict'),
      post('unknown label', {'instances': [row]}, path=f'/v1/models/{MODEL}/labels/canary:predict'),
      post('unknown model', {'instances': [row]}, path='/v1/models/nope:predict'),
      get('GET unknown version 99999999999999999999',
          f'/v1/models/{MODEL}/versions/99999999999999999999'),
      get('GET unknown path', '/v2/nothing'),
      get('GET :predict', predict),
      post('POST without :predict', {'instances': [row]}, path=f'/v1/models/{MODEL}'),
      get('GET path with %FF', '/v1/models/%FF'),
      http_case(port, 'Content-Length: abc', 'POST', predict, raw=length('abc')),
      http_case(port, 'Content-Length: \u00b2', 'POST', predict, raw=length('\u00b2')),
      http_case(port, 'Content-Length: -1', 'POST', predict, raw=length('-1')),
      http_case(port, 'Content-Length: 10**30', 'POST', predict, raw=length('1' + '0' * 30)),
      http_case(port, 'Content-Length: 17 MiB (over --max_request_bytes)', 'POST', predict,
                raw=length(str(17 << 20))),
      http_case(port, 'body shorter than Content-Length', 'POST', predict,
                raw=length('100'), half_close=True),
      http_case(port, 'chunked body, no Content-Length', 'POST', predict,
                raw=request_bytes('POST', predict, b'2\r\n{}\r\n0\r\n\r\n',
                                  [('Transfer-Encoding', 'chunked')], length=False)),
      http_case(port, 'method PUT', 'PUT', predict, {'instances': [row]}),
      http_case(port, 'malformed request line', 'GET', '', raw=b'GARBAGE\r\n\r\n'),
      http_case(port, 'header line of 70,000 bytes', 'GET', '',
                raw=request_bytes('GET', f'/v1/models/{MODEL}', None, [('X-Big', 'a' * 70_000)])),
  ]


# 3. The real-time service ---------------------------------------------------------------------

def realtime_cases(port: int) -> List[Case]:
  """GET /recommend, POST /events and the other paths with bad and edge requests."""
  good = {'user_id': 'bench-u1', 'item_id': '85123A', 'timestamp': 1291192440}

  def get(name, path, expect=ERROR):
    return http_case(port, name, 'GET', path, None, expect)

  def recommend(name, expect=ERROR, **params):
    return get(name, '/recommend?' + urllib.parse.urlencode(params), expect)

  def event(name, expect=ERROR, **fields):
    return http_case(port, name, 'POST', '/events', dict(good, **fields), expect)

  def post(name, body, expect=ERROR, **kwargs):
    return http_case(port, name, 'POST', '/events', body, expect, **kwargs)

  def length(*values: str) -> bytes:
    return request_bytes('POST', '/events', b'{}', [('Content-Length', v) for v in values],
                         length=False)

  def raw_event(name, json_text):
    return post(name, json_text.encode('utf-8'))

  return [
      get('GET /healthz', '/healthz', OK),
      get('GET /stats', '/stats', OK),
      get('GET /metrics', '/metrics', OK),
      recommend('valid /recommend', OK, user='bench-u1', k=3),
      recommend('k with leading zeros (0003)', OK, user='bench-u1', k='0003'),
      recommend('k=\u00b2', user='u1', k='\u00b2'),
      recommend('k=\u0661 (Arabic-Indic one)', user='u1', k='\u0661'),
      recommend('k=-1', user='u1', k='-1'),
      recommend('k=0', user='u1', k='0'),
      recommend('k=abc', user='u1', k='abc'),
      recommend('k=1e3', user='u1', k='1e3'),
      recommend('k=10000', user='u1', k='10000'),
      recommend('k of 5000 digits', user='u1', k='1' * 5000),
      recommend('k empty', user='u1', k=''),
      recommend('user empty', user='', k=3),
      recommend('user blank', user='   ', k=3),
      get('user missing', '/recommend?k=3'),
      recommend('user of 30,000 characters', user='u' * 30_000, k=3),
      recommend('user of 70,000 characters (request line too long)', user='u' * 70_000, k=3),
      recommend('query of 5,000 characters', user='u1', k=3, query='q' * 5000),
      get('user %ED%A0%80 (UTF-8 of a surrogate)', '/recommend?user=%ED%A0%80&k=3', EITHER),
      get('user %FF (not UTF-8)', '/recommend?user=%FF&k=3', EITHER),
      event('valid event', OK),
      post('valid list of 2 events', [good, dict(good, item_id='71053')], OK),
      event('valid ISO-8601 timestamp', OK, timestamp='2010-12-01T08:26:00Z'),
      raw_event('lone surrogate in user_id', '{"user_id": "x\\ud800", "item_id": "a", '
                '"timestamp": 1291192440}'),
      raw_event('lone surrogate in item_id', '{"user_id": "u", "item_id": "\\udfff", '
                '"timestamp": 1291192440}'),
      raw_event('lone surrogate in event_id', '{"user_id": "u", "item_id": "a", "event_id": '
                '"\\udc80", "timestamp": 1291192440}'),
      raw_event('lone surrogate in query', '{"user_id": "u", "item_id": "a", "query": "\\ud83d",'
                ' "timestamp": 1291192440}'),
      event('timestamp "1e400"', timestamp='1e400'),
      raw_event('timestamp 1e400 (JSON number: inf)', '{"user_id": "u", "item_id": "a", '
                '"timestamp": 1e400}'),
      event('timestamp "+-5"', timestamp='+-5'),
      event('timestamp "\u00b2"', timestamp='\u00b2'),
      event('timestamp 1e30', timestamp=1e30),
      event('timestamp -5', timestamp=-5),
      event('timestamp 10**400 (JSON integer)', timestamp=10**400),
      event('timestamp "09/12/2011 12:00"', timestamp='09/12/2011 12:00'),
      event('timestamp "2011-02-30"', timestamp='2011-02-30'),
      event('timestamp true', timestamp=True),
      event('timestamp null', timestamp=None),
      raw_event('timestamp NaN', '{"user_id": "u", "item_id": "a", "timestamp": NaN}'),
      event('quantity "+-2"', quantity='+-2'),
      event('quantity 0', quantity=0),
      event('quantity -1', quantity=-1),
      event('quantity 2.5', quantity=2.5),
      event('quantity 2**64', quantity=2**64),
      event('quantity "inf"', quantity='inf'),
      event('event_type unknown', event_type='teleport'),
      event('user_id a list', user_id=['u']),
      event('user_id of 300 characters', user_id='u' * 300),
      raw_event('item_id of 5,000 digits (JSON integer)', '{"user_id": "u", "item_id": '
                + '1' * 5000 + ', "timestamp": 1291192440}'),
      post('deeply nested list', b'[' * 100_000),
      post('deeply nested object', b'{"a":' * 50_000),
      post('body is a number', b'5'),
      post('body is a string', b'"event"'),
      post('body is null', b'null'),
      post('body is an empty list', b'[]'),
      post('body is a list of numbers', b'[1, 2]'),
      post('missing fields: {}', {}),
      post('missing timestamp', {'user_id': 'u', 'item_id': 'a'}),
      post('1001 events', [good] * 1001),
      post('body not UTF-8', b'\xff\xfe'),
      post('body is not JSON', b'user_id=u'),
      http_case(port, 'Content-Length: 2,000,000 (over --max-body-bytes)', 'POST', '/events',
                raw=length('2000000')),
      http_case(port, 'Content-Length: abc', 'POST', '/events', raw=length('abc')),
      http_case(port, 'Content-Length: \u00b2', 'POST', '/events', raw=length('\u00b2')),
      http_case(port, 'Content-Length: -5', 'POST', '/events', raw=length('-5')),
      http_case(port, 'Content-Length: "5, 6"', 'POST', '/events', raw=length('5, 6')),
      http_case(port, 'two different Content-Length headers', 'POST', '/events',
                raw=length('2', '3')),
      http_case(port, 'Content-Length: 10**30', 'POST', '/events', raw=length('1' + '0' * 30)),
      http_case(port, 'no Content-Length', 'POST', '/events',
                raw=request_bytes('POST', '/events', None)),
      http_case(port, 'chunked body', 'POST', '/events',
                raw=request_bytes('POST', '/events', b'2\r\n{}\r\n0\r\n\r\n',
                                  [('Transfer-Encoding', 'chunked')], length=False)),
      http_case(port, 'body shorter than Content-Length', 'POST', '/events',
                raw=length('100'), half_close=True),
      get('unknown path', '/nope'),
      http_case(port, 'POST /recommend', 'POST', '/recommend', {}),
      http_case(port, 'method PUT', 'PUT', '/events', {}),
      http_case(port, 'malformed request line', 'GET', '', raw=b'GARBAGE\r\n\r\n'),
      http_case(port, 'header line of 70,000 bytes', 'GET', '',
                raw=request_bytes('GET', '/stats', None, [('X-Big', 'a' * 70_000)])),
  ]


# 4. The data contract -------------------------------------------------------------------------

def contract_cases(workdir: str) -> List[Case]:
  """contract.data.read_contract on small bad files (what pipeline.py validates first)."""
  os.makedirs(workdir, exist_ok=True)
  items = os.path.join(workdir, 'items.csv')
  with open(items, 'w') as f:
    f.write('item_id,title\na,Red lantern\nb,Tea set\nc,Cake tin\n')
  good = [('u1', 'a', '1291191960'), ('u1', 'b', '1291192000'), ('u2', 'c', '1291193000')]
  counter = iter(range(10**6))

  def write(content, suffix='.csv') -> str:
    path = os.path.join(workdir, f'interactions_{next(counter)}{suffix}')
    with open(path, 'wb') as f:
      f.write(content if isinstance(content, bytes) else content.encode('utf-8'))
    return path

  def rows(header='user_id,item_id,timestamp', body=good) -> str:
    return header + '\n' + ''.join(','.join(r) + '\n' for r in body)

  def read(name, interactions, items_path=items, expect=ERROR, names=None) -> Case:
    def send():
      try:
        data = contract.read_contract(interactions, items_path)
      except contract.DataError as e:
        return 'DataError', str(e), names or interactions
      return 'ok', (f'{len(data.interactions)} interactions, {len(data.items)} items, '
                    f'bad rows {data.bad_rows}'), names or interactions
    return Case(name, send, expect)

  def timestamp(value, expect=ERROR, name=None):
    return read(name or f'timestamp {value!r}', write(rows(body=good + [('u3', 'a', value)])),
                expect=expect)

  def quantity(value):
    body = [r + ('1',) for r in good] + [('u3', 'a', '1291191960', value)]
    return read(f'quantity {value!r} (row dropped and counted)',
                write(rows('user_id,item_id,timestamp,quantity', body)), expect=OK)

  missing_title = os.path.join(workdir, 'items_no_title.csv')
  with open(missing_title, 'w') as f:
    f.write('item_id\na\n')
  bad_items = os.path.join(workdir, 'items_dup_header.csv')
  with open(bad_items, 'w') as f:
    f.write('item_id,title,title\na,x,y\n')
  return [
      read('valid file', write(rows()), expect=OK),
      read('valid ISO-8601 timestamps', write(rows(body=[('u1', 'a', '2010-12-01T08:26:00Z'),
                                                         ('u1', 'b', '2010-12-01 08:26')])),
           expect=OK),
      timestamp('1e400'),
      timestamp('inf'),
      timestamp('-inf'),
      timestamp('nan'),
      timestamp('99999999999999999999'),
      timestamp('9' * 5000, name="timestamp of 5,000 nines"),
      timestamp('1e30'),
      timestamp('-5'),
      timestamp('1700000000000'),
      timestamp('09/12/2011 12:00'),
      timestamp('2011-02-30'),
      timestamp('\u00b2'),
      timestamp('\u0661\u0662'),
      timestamp('+-5'),
      timestamp(''),
      quantity('inf'),
      quantity('nan'),
      quantity('99999999999999999999'),
      quantity('+-2'),
      quantity('0'),
      read('duplicated header column', write(rows('user_id,item_id,timestamp,user_id',
                                                  [r + ('u9',) for r in good]))),
      read('empty file', write('')),
      read('header only', write('user_id,item_id,timestamp\n')),
      read('blank lines only', write('\n\n\n')),
      read('missing column timestamp', write(rows('user_id,item_id', [r[:2] for r in good]))),
      read('no valid rows left (every user_id empty)', write(rows(body=[('', 'a', '1291191960')]))),
      read('non-UTF-8 bytes', write(b'user_id,item_id,timestamp\n\xff\xfe,a,1291191960\n')),
      read('binary garbage named .parquet', write(b'\x00\xff' * 100, '.parquet')),
      read('a row with too many fields', write(rows(body=good + [('u', 'a', '1', 'x', 'y', 'z')])),
           expect=EITHER),
      read('UTF-8 byte order mark before the header',
           write('\ufeff' + rows()), expect=EITHER),
      read('interactions file not found', os.path.join(workdir, 'missing.csv')),
      read('a directory instead of a file', workdir),
      read('items without a title column', write(rows()), missing_title, names=missing_title),
      read('items with a duplicated header column', write(rows()), bad_items, names=bad_items),
  ]


def judge_contract(answer: Tuple[str, str, str], expect: str) -> Tuple[bool, str]:
  kind, message, path = answer
  if kind == 'ok':
    if expect == ERROR:
      return False, 'a bad file read as valid: ' + message
    return True, 'valid read: ' + message
  shown = f'DataError: {message}'
  if '\n' in message:
    return False, 'DataError of several lines: ' + shown
  if path not in message:
    return False, 'DataError not naming the file: ' + shown
  if expect == OK:
    return False, 'a valid file refused: ' + shown
  return True, shown


# Servers --------------------------------------------------------------------------------------

def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


class Server:
  """A subprocess of this repository, its output in a log file; stopped with SIGTERM."""

  def __init__(self, name: str, args: List[str], log_dir: str):
    self.name = name
    self.log_path = os.path.join(log_dir, f'{name}.log')
    env = dict(os.environ, TF_USE_LEGACY_KERAS='1', TF_CPP_MIN_LOG_LEVEL='2')
    with open(self.log_path, 'wb') as log:
      self.process = subprocess.Popen([sys.executable, '-m'] + args, cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT)

  def alive(self) -> bool:
    return self.process.poll() is None

  def log_tail(self, lines: int = 5) -> str:
    with open(self.log_path, errors='replace') as f:
      return ' | '.join(f.read().strip().splitlines()[-lines:])

  def tracebacks(self) -> int:
    with open(self.log_path, errors='replace') as f:
      return f.read().count('Traceback (most recent call last)')

  def stop(self):
    if self.alive():
      self.process.send_signal(signal.SIGTERM)
      try:
        self.process.wait(timeout=15)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()


def wait_healthz(port: int, server: Server, timeout_s: float) -> bool:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline and server.alive():
    try:
      if exchange(port, request_bytes('GET', '/healthz', None)).status == 200:
        return True
    except OSError:
      pass
    time.sleep(0.3)
  return False


def has_versions(base_path: str) -> bool:
  return os.path.isdir(base_path) and any(
      name.isdigit() and os.path.isfile(os.path.join(base_path, name, 'saved_model.pb'))
      for name in os.listdir(base_path))


# Report ---------------------------------------------------------------------------------------

def report(results: Dict[str, List[Outcome]], rss: Dict[str, Any], notes: List[str]) -> str:
  lines = ['| class | inputs | clean | not clean |', '|---|---:|---:|---:|']
  total = [0, 0]
  for name, outcomes in results.items():
    clean = sum(o.clean for o in outcomes)
    total[0] += len(outcomes)
    total[1] += clean
    lines.append(f'| {name} | {len(outcomes)} | {clean} | {len(outcomes) - clean} |')
  lines.append(f'| all | {total[0]} | {total[1]} | {total[0] - total[1]} |')
  lines += ['', 'Not clean:']
  bad = [(name, o) for name, outcomes in results.items() for o in outcomes if not o.clean]
  lines += [f'- [{name}] {o.case}: {o.answer}' for name, o in bad] or ['- none']
  worst = rss['max_single_request']
  lines += ['', f'Model server RSS: largest single-request growth {worst["mb"]:+.1f} MB '
            f'({worst["class"]}: {worst["case"]}); growth over the gRPC + REST replay '
            f'{rss["total_mb"]:+.1f} MB ({rss["start_mb"]:.0f} -> {rss["end_mb"]:.0f} MB); '
            f'goal < {MEMORY_GOAL_MB:.0f} MB per request: '
            f'{"met" if worst["mb"] < MEMORY_GOAL_MB else "NOT met"}']
  lines += notes
  return '\n'.join(lines)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', required=True, metavar='BASE_PATH',
                      help='model base path holding numeric version directories')
  parser.add_argument('--items', help='items CSV of the data contract, for the service titles')
  parser.add_argument('--json', metavar='OUT', help='write the results as JSON here')
  return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  if not has_versions(args.model):
    print(f'error: --model {args.model}: no numeric version directory with saved_model.pb',
          file=sys.stderr)
    return 2
  if args.items and not os.path.isfile(args.items):
    print(f'error: --items {args.items}: not a file', file=sys.stderr)
    return 2
  started = time.monotonic()
  workdir = tempfile.mkdtemp(prefix='bad_inputs_')
  grpc_port, rest_port, http_port = free_port(), free_port(), free_port()
  servers: List[Server] = []
  keep_logs = True  # the servers' logs are kept when something was not clean
  try:
    model_server = Server('model_server', [
        'serving.model_server', f'--model_name={MODEL}',
        f'--model_base_path={os.path.abspath(args.model)}', f'--port={grpc_port}',
        f'--rest_api_port={rest_port}'], workdir)
    servers.append(model_server)
    service = Server('realtime_service', [
        'serving.realtime.service', '--model-server', f'127.0.0.1:{grpc_port}', '--embedded',
        '--port', str(http_port)] + (['--items', os.path.abspath(args.items)]
                                     if args.items else []), workdir)
    servers.append(service)
    target = f'127.0.0.1:{grpc_port}'
    recommender = client_lib.RecommenderClient(target, MODEL)
    if not recommender.wait_available(START_TIMEOUT_S, model_server.alive):
      print(f'error: the model server did not become AVAILABLE: {model_server.log_tail()}',
            file=sys.stderr)
      return 1
    if not wait_healthz(http_port, service, START_TIMEOUT_S):
      print(f'error: the real-time service did not answer /healthz: {service.log_tail()}',
            file=sys.stderr)
      return 1
    has_k = requests_lib.K_SIGNATURE in recommender.metadata()
    ready_s = time.monotonic() - started
    pid = model_server.process.pid
    start_rss = psutil.Process(pid).memory_info().rss
    results = {
        '1. gRPC Predict/metadata/status': replay(grpc_cases(target), judge_grpc, pid),
        '2. model server REST': replay(rest_cases(rest_port), judge_http, pid),
    }
    end_rss = psutil.Process(pid).memory_info().rss
    results['3. real-time service HTTP'] = replay(realtime_cases(http_port), judge_http)
    results['4. data contract (read_contract)'] = replay(
        contract_cases(os.path.join(workdir, 'contract')), judge_contract)
    measured = [(name, o) for name, outcomes in results.items() for o in outcomes
                if o.rss_growth_mb is not None]
    worst_class, worst = max(measured, key=lambda item: item[1].rss_growth_mb)
    rss = {'start_mb': start_rss / 2**20, 'end_mb': end_rss / 2**20,
           'total_mb': (end_rss - start_rss) / 2**20,
           'max_single_request': {'mb': worst.rss_growth_mb, 'class': worst_class,
                                  'case': worst.case}}
    tracebacks = model_server.tracebacks(), service.tracebacks()
    alive = model_server.alive(), service.alive()
    keep_logs = any(tracebacks) or not all(alive) or not all(
        o.clean for outcomes in results.values() for o in outcomes)
    notes = [f'Servers alive at the end: model server {"yes" if alive[0] else "NO"}, real-time '
             f'service {"yes" if alive[1] else "NO"}; tracebacks in their logs: {tracebacks[0]} '
             f'and {tracebacks[1]}' + (f' (logs kept in {workdir})' if keep_logs else '') + '.',
             f'Replay {time.monotonic() - started - ready_s:.1f} s after {ready_s:.1f} s of '
             'start-up.']
    if not has_k:
      notes.append(f'The model has no {requests_lib.K_SIGNATURE} signature: its k cases were '
                   'answered as an unknown signature, k itself was not checked.')
    print(report(results, rss, notes))
    if args.json:
      with open(args.json, 'w') as f:
        json.dump({'argv': sys.argv, 'model': args.model, 'has_k_signature': has_k,
                   'elapsed_s': round(time.monotonic() - started, 1), 'rss': rss, 'notes': notes,
                   'classes': {name: [dataclasses.asdict(o) for o in outcomes]
                               for name, outcomes in results.items()}}, f, indent=1)
    return 0
  finally:
    for server in reversed(servers):
      server.stop()
    if not keep_logs:
      shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
  sys.exit(main())
