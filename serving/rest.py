"""The REST API of the local model server: TF Serving's JSON formats over HTTP.

    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]            GetModelStatus
    GET  /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata   GetModelMetadata
    POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict    Predict, "instances" or "inputs"

Requests become the protos the gRPC services take and are answered by the same ModelServer
(serving/model_server.py); a ServingError's code becomes its HTTP status. With a token
(--http_auth_token or $MODEL_SERVER_TOKEN) every request needs "Authorization: Bearer <token>".
Bodies beyond --max_request_bytes are refused unread (413), a connection silent for
--rest_api_timeout_in_ms is closed, and beyond --rest_api_num_threads connections a new one gets
503 at once (docs/serving.md, docs/security.md).
"""

import base64
import binascii
import hmac
import http.server
import json
import logging
import re
from typing import Optional

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import predict_pb2

from serving import metrics as metrics_lib
from serving.http_server import BoundedHTTPServer
from serving.http_server import JsonRefusals
from serving.predict import Code
from serving.predict import DEFAULT_SIGNATURE
from serving.predict import MAX_VERSION
from serving.predict import ServingError

log = logging.getLogger('model_server')

TOKEN_ENV = 'MODEL_SERVER_TOKEN'


# REST: JSON in TF Serving's formats, turned into the same protos the gRPC services take.
_HTTP_STATUS = {Code.INVALID_ARGUMENT: 400, Code.FAILED_PRECONDITION: 400, Code.NOT_FOUND: 404,
                Code.RESOURCE_EXHAUSTED: 413, Code.UNIMPLEMENTED: 501, Code.UNAVAILABLE: 503}
_REST_PATH = re.compile(r'/v1/models/(?P<name>[^/:]+)'
                        r'(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?'
                        r'(?P<verb>/metadata|:predict)?')


def _json_array(value, dtype: int) -> np.ndarray:
  """A JSON value as an array of the signature's dtype ({"b64": ...} for binary strings)."""
  if dtype == types_pb2.DT_STRING:
    def to_bytes(v):
      if isinstance(v, list):
        return [to_bytes(x) for x in v]
      if isinstance(v, dict) and set(v) == {'b64'}:
        try:
          return base64.b64decode(v['b64'], validate=True)
        except (binascii.Error, TypeError) as e:
          raise ValueError(f'{{"b64": ...}} is not valid base64: {e}') from None
      if isinstance(v, str):
        return v.encode()
      raise ValueError(f'expected a string, got {v!r}')
    array = np.array(to_bytes(value), dtype=object)
  else:
    array = np.asarray(value, dtype=tf.dtypes.as_dtype(dtype).as_numpy_dtype)
  if array.dtype == object and any(not isinstance(v, bytes) for v in array.flat):
    raise ValueError('rows of different lengths')
  return array


def _json_value(name: str, array: np.ndarray):
  if array.dtype != object:
    return array.tolist()
  if name.endswith('_bytes'):
    return np.vectorize(lambda b: {'b64': base64.b64encode(b).decode()}, otypes=[object])(
        array).tolist()
  return np.vectorize(lambda b: b.decode('utf-8', 'replace'), otypes=[object])(array).tolist()


def _rest_predict(server, spec, body: dict) -> dict:
  """POST :predict with TF Serving's row ("instances") or columnar ("inputs") format."""
  request = predict_pb2.PredictRequest(model_spec=spec)
  if not isinstance(body.get('signature_name', ''), str):
    raise ServingError(Code.INVALID_ARGUMENT, '"signature_name" must be a string')
  request.model_spec.signature_name = body.get('signature_name', '')
  servable = server.model(spec).servable(spec)
  signature = servable.signature_defs.get(request.model_spec.signature_name or DEFAULT_SIGNATURE)
  if signature is None:
    return server.predict(request)  # answers the unknown signature as gRPC does
  if ('instances' in body) == ('inputs' in body):
    raise ServingError(Code.INVALID_ARGUMENT, 'the body needs one of "instances" or "inputs"')
  names = sorted(signature.inputs)
  row_format = 'instances' in body
  data = body['instances'] if row_format else body['inputs']
  if row_format and not isinstance(data, list):
    raise ServingError(Code.INVALID_ARGUMENT,
                       f'"instances" must be a list of rows, got {type(data).__name__}')
  if row_format and len(data) > server.limits.max_batch_rows:
    raise ServingError(Code.INVALID_ARGUMENT,
                       f'"instances" has {len(data)} rows: at most '
                       f'{server.limits.max_batch_rows} per request (--max_batch_rows)')
  if row_format:
    if data and all(isinstance(row, dict) for row in data):
      if any(set(row) != set(data[0]) for row in data):
        raise ServingError(Code.INVALID_ARGUMENT,
                           'every row of "instances" must have the same named inputs')
      data = {name: [row[name] for row in data] for name in data[0]}
    else:
      data = {names[0]: data} if len(names) == 1 else data
  elif not isinstance(data, dict) and len(names) == 1:
    data = {names[0]: data}
  if not isinstance(data, dict):
    raise ServingError(Code.INVALID_ARGUMENT,
                       f'the signature has inputs {names}: send an object per instance')
  for name, value in data.items():
    info = signature.inputs.get(name)  # an unknown name is answered by run_predict
    try:
      array = _json_array(value, info.dtype if info else types_pb2.DT_STRING)
    except RecursionError:
      raise ServingError(Code.INVALID_ARGUMENT, f"input '{name}': nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as e:
      raise ServingError(Code.INVALID_ARGUMENT, f"input '{name}': {e}")
    request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
  response = server.predict(request)
  outputs = {k: _json_value(k, tf.make_ndarray(v)) for k, v in response.outputs.items()}
  if not row_format:
    return {'outputs': next(iter(outputs.values())) if len(outputs) == 1 else outputs}
  if len(outputs) == 1:
    return {'predictions': next(iter(outputs.values()))}
  rows = len(next(iter(outputs.values())))
  return {'predictions': [{k: v[i] for k, v in outputs.items()} for i in range(rows)]}


def _to_dict(message) -> dict:
  return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                   including_default_value_fields=True)


def _rest_handler(server, args):
  """The HTTP handler class for one server (a ModelServer) and its flags."""

  class Handler(JsonRefusals, http.server.BaseHTTPRequestHandler):
    # A connection that sends nothing for this long (partial headers, a slow body) is closed.
    timeout = args.rest_api_timeout_in_ms / 1000

    def do_GET(self):  # pylint: disable=invalid-name
      self._guarded(None)

    def do_POST(self):  # pylint: disable=invalid-name
      length = self.headers.get('Content-Length', '0').strip()
      if not (length.isascii() and length.isdigit()):
        self.close_connection = True
        self._send(400, {'error': f'Content-Length must be a byte count, got {length[:40]!r}'})
        return
      length = int(length)
      if length > args.max_request_bytes:
        self.close_connection = True  # not read: the connection is closed after the answer
        self._send(413, {'error': f'the request is larger than the maximum of '
                                  f'{args.max_request_bytes} bytes'})
        return
      raw = self.rfile.read(length)
      if len(raw) < length:
        self.close_connection = True
        self._send(400, {'error': f'the body ended after {len(raw)} of {length} bytes'})
        return
      try:
        body = json.loads(raw or b'{}')
      except RecursionError:
        self._send(400, {'error': 'the body is not JSON: nested too deeply'})
        return
      except ValueError as e:  # UnicodeDecodeError included
        self._send(400, {'error': f'the body is not JSON: {e}'})
        return
      if not isinstance(body, dict):
        self._send(400, {'error': f'the body must be a JSON object, got {type(body).__name__}'})
        return
      self._guarded(body)

    def _guarded(self, body: Optional[dict]):
      """_answer, with the token checked first and any internal fault answered 500."""
      if server.token and not hmac.compare_digest(
          self.headers.get('Authorization', '').encode(), f'Bearer {server.token}'.encode()):
        self._send(401, {'error': 'missing or wrong "Authorization: Bearer <token>" header '
                                  f'(--http_auth_token / {TOKEN_ENV})'})
        return
      try:
        self._answer(body)
      except Exception as e:  # pylint: disable=broad-except
        log.exception('internal error answering %s %s', self.command, self.path)
        self._send(500, {'error': f'internal error: {type(e).__name__}: {e}'})

    def _answer(self, body: Optional[dict]):
      if server.metrics and self.command == 'GET' and self.path == server.metrics.path:
        self._send_bytes(200, server.metrics.exposition(), metrics_lib.CONTENT_TYPE)
        return
      match = _REST_PATH.fullmatch(self.path)
      verb = match and match['verb']
      if not match or (verb == ':predict') != (self.command == 'POST'):
        self._send(404, {'error': f'no {self.command} {self.path[:200]}; the API is '
                                  '/v1/models/<name>[/versions/<v>|/labels/<l>]'
                                  '[/metadata|:predict]'})
        return
      spec = predict_pb2.PredictRequest().model_spec
      spec.name = match['name']
      if match['version']:
        if int(match['version']) > MAX_VERSION:
          self._send(400, {'error': f'version {match["version"]} is not an int64'})
          return
        spec.version.value = int(match['version'])
      if match['label']:
        spec.version_label = match['label']
      try:
        if verb == ':predict':
          self._send(200, _rest_predict(server, spec, body))
        elif verb == '/metadata':
          response = server.metadata(get_model_metadata_pb2.GetModelMetadataRequest(
              model_spec=spec, metadata_field=['signature_def']))
          signature_map = get_model_metadata_pb2.SignatureDefMap()
          response.metadata['signature_def'].Unpack(signature_map)
          self._send(200, {'model_spec': _to_dict(response.model_spec),
                           'metadata': {'signature_def': _to_dict(signature_map)}})
        else:
          self._send(200, _to_dict(server.status(
              get_model_status_pb2.GetModelStatusRequest(model_spec=spec))))
      except ServingError as e:
        self._send(_HTTP_STATUS.get(e.code, 500), {'error': e.message})

    def send_refusal(self, code: int, body: dict):
      """JsonRefusals' answer (close_connection is set: Connection: close)."""
      self._send(code, body)

    def _send(self, status: int, payload):
      self._send_bytes(status, json.dumps(payload).encode(), 'application/json')

    def _send_bytes(self, status: int, data: bytes, content_type: str):
      self.send_response(status)
      self.send_header('Content-Type', content_type)
      self.send_header('Content-Length', str(len(data)))
      if self.close_connection:
        self.send_header('Connection', 'close')
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      log.debug('REST %s', format % args)

  return Handler


def http_server(server, args) -> BoundedHTTPServer:
  """The REST API of a ModelServer, bound to --rest_api_bind_address:--rest_api_port.

  It serves once its serve_forever runs; at most --rest_api_num_threads connections at once,
  each on its own thread; beyond them a new one is answered 503 at once and closed.
  """
  data = json.dumps({'error': f'the server has {args.rest_api_num_threads} connections open '
                              '(--rest_api_num_threads); retry later'}).encode()
  busy = (b'HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json'
          b'\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s' % (len(data), data))
  return BoundedHTTPServer((args.rest_api_bind_address, args.rest_api_port),
                           _rest_handler(server, args), args.rest_api_num_threads, busy)
