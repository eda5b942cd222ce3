"""The local stand-in for tensorflow_model_server: the same gRPC and REST API, in Python.

    python -m serving.model_server --model_name=recommender \\
        --model_base_path=output/serving/recommender --port=8500 --rest_api_port=8501

It takes tensorflow_model_server's flags, serves the numeric version directories under each
model's base path per the model's version policy (the newest one by default), and implements
PredictionService.Predict, PredictionService.GetModelMetadata, ModelService.GetModelStatus and
the REST API (GET /v1/models/<name>[/versions/<v>|/labels/<l>][/metadata], POST ...:predict).
Clients use the tensorflow-serving-api stubs unchanged. serving/README.md lists the flags and
where this server differs from tensorflow_model_server.

Versions: the base path is polled every --file_system_poll_wait_seconds. A new version directory
is loaded once it holds saved_model.pb and its files (names, sizes, mtimes) did not change
between two polls, because the TFX Pusher copies a model file by file; writing into a temporary
directory and renaming it into place is still the safe way to publish. A version is loaded and
warmed up (assets.extra/tf_serving_warmup_requests) before requests are switched to it, and the
old version is unloaded after; requests already running on it finish on it.
"""

import argparse
import base64
import binascii
import hmac
import http.server
import json
import logging
import os
import re
import signal
import threading
import time
from concurrent import futures
from typing import Dict, List, NamedTuple, Optional, Tuple

import grpc
import numpy as np
import tensorflow as tf
# TF Serving links TF Text's classic ops (text.BertTokenizer): so does this stand-in.
import tensorflow_text  # pylint: disable=unused-import
from google.protobuf import json_format
from google.protobuf import text_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving import batching
from serving import protos
from servable import warmup

log = logging.getLogger('model_server')

Arrays = Dict[str, np.ndarray]
State = get_model_status_pb2.ModelVersionStatus.State
Code = grpc.StatusCode
DEFAULT_SIGNATURE = 'serving_default'
WARMUP_FILE = warmup.WARMUP_FILE
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}  # TF and gRPC share the numbers
MAX_VERSION = 2**63 - 1
LOOPBACK = ('127.0.0.1', 'localhost', '::1')
TOKEN_ENV = 'MODEL_SERVER_TOKEN'


class ServingError(Exception):
  """An error answered to the client with a gRPC status code and a message."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


def read_signature_defs(path: str) -> Dict[str, meta_graph_pb2.SignatureDef]:
  """The SignatureDefs of a SavedModel's `serve` graph, as GetModelMetadata returns them."""
  with open(os.path.join(path, 'saved_model.pb'), 'rb') as f:
    saved_model = saved_model_pb2.SavedModel.FromString(f.read())
  for meta_graph in saved_model.meta_graphs:
    if 'serve' in meta_graph.meta_info_def.tags:
      return {k: v for k, v in meta_graph.signature_def.items() if not k.startswith('__')}
  raise ValueError(f'{path} has no meta graph tagged "serve"')


class Servable:
  """One loaded version of a model: its signatures, callable on numpy arrays."""

  def __init__(self, name: str, version: int, path: str, batching_parameters=None):
    self.name, self.version, self.path = name, version, path
    self.signature_defs = read_signature_defs(path)
    self._model = tf.saved_model.load(path, tags=['serve'])
    self._functions = {key: self._model.signatures[key] for key in self.signature_defs}
    self._batchers = {} if batching_parameters is None else {
        key: batching.Batcher(lambda inputs, key=key: self._call(key, inputs),
                              batching_parameters, f'{name}/{version}/{key}')
        for key in self.signature_defs}

  def run(self, signature_name: str, inputs: Arrays) -> Arrays:
    """Runs a signature (through its batcher when batching is on)."""
    batcher = self._batchers.get(signature_name)
    return batcher(inputs) if batcher else self._call(signature_name, inputs)

  def _call(self, signature_name: str, inputs: Arrays) -> Arrays:
    outputs = self._functions[signature_name](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}

  def close(self):
    for batcher in self._batchers.values():
      batcher.close()


def _dtype_name(dtype: int) -> str:
  return types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(dtype)


def _check_shape(name: str, array: np.ndarray, info: meta_graph_pb2.TensorInfo):
  if info.tensor_shape.unknown_rank:
    return
  expected = [d.size for d in info.tensor_shape.dim]
  if len(expected) != array.ndim or any(e not in (-1, a) for e, a in zip(expected, array.shape)):
    raise ServingError(Code.INVALID_ARGUMENT,
                       f"input '{name}' has shape {list(array.shape)}, the signature expects "
                       f"{expected} (-1: any size)")


class Limits(NamedTuple):
  """What one request may ask of the server (flags --max_batch_rows, --max_tensor_elements)."""
  max_batch_rows: int = 1024
  max_tensor_elements: int = 1 << 20


def _check_size(name: str, proto, limits: Limits):
  """Refuses a tensor before it is decoded: negative dims, too many elements or rows.

  tf.make_ndarray repeats a single value to the declared shape, so an 89-byte request could
  otherwise allocate gigabytes.
  """
  dims = [d.size for d in proto.tensor_shape.dim]
  if any(d < 0 for d in dims):
    raise ServingError(Code.INVALID_ARGUMENT,
                       f"input '{name}' has shape {dims}: dimensions must not be negative")
  elements = int(np.prod(dims, dtype=object)) if dims else 1
  if elements > limits.max_tensor_elements:
    raise ServingError(Code.RESOURCE_EXHAUSTED,
                       f"input '{name}' has shape {dims}, {elements} elements: at most "
                       f'{limits.max_tensor_elements} per tensor (--max_tensor_elements)')
  if dims and dims[0] > limits.max_batch_rows:
    raise ServingError(Code.INVALID_ARGUMENT,
                       f"input '{name}' has {dims[0]} rows: at most {limits.max_batch_rows} "
                       'per request (--max_batch_rows)')


def run_predict(servable: Servable, request: predict_pb2.PredictRequest,
                limits: Limits = Limits()) -> predict_pb2.PredictResponse:
  """Validates a PredictRequest against the servable's signature and limits, and runs it.

  Raises:
    ServingError: FAILED_PRECONDITION for an unknown signature; INVALID_ARGUMENT for missing,
      unknown, wrongly typed or wrongly shaped inputs, too many rows, an unknown output_filter
      entry, or an error the model itself reports about its inputs; RESOURCE_EXHAUSTED for a
      tensor over the element limit; UNAVAILABLE when the batch queue is full.
  """
  signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
  signature = servable.signature_defs.get(signature_name)
  if signature is None:
    raise ServingError(Code.FAILED_PRECONDITION,
                       f'Serving signature key "{signature_name}" not found.')
  sent, expected = set(request.inputs), set(signature.inputs)
  if sent != expected:
    raise ServingError(
        Code.INVALID_ARGUMENT,
        f'input size does not match signature: {len(sent)}!={len(expected)} '
        f'len({{{",".join(sorted(sent))}}}) != len({{{",".join(sorted(expected))}}}). '
        f'Sent extra: {{{",".join(sorted(sent - expected))}}}. '
        f'Missing but required: {{{",".join(sorted(expected - sent))}}}.')
  inputs = {}
  for name, proto in request.inputs.items():
    info = signature.inputs[name]
    if proto.dtype != info.dtype:
      raise ServingError(Code.INVALID_ARGUMENT,
                         f"input '{name}' has dtype {_dtype_name(proto.dtype)}, the signature "
                         f'expects {_dtype_name(info.dtype)}')
    _check_size(name, proto, limits)
    try:
      inputs[name] = tf.make_ndarray(proto)
    except (ValueError, TypeError) as e:
      raise ServingError(Code.INVALID_ARGUMENT, f"input '{name}' is not a valid tensor: {e}")
    _check_shape(name, inputs[name], info)
  unknown = set(request.output_filter) - set(signature.outputs)
  if unknown:
    raise ServingError(Code.INVALID_ARGUMENT,
                       f'output tensor alias not found in signature: {",".join(sorted(unknown))}')
  try:
    outputs = servable.run(signature_name, inputs)
  except tf.errors.OpError as e:
    raise ServingError(_BY_NUMBER.get(e.error_code, Code.INTERNAL), e.message)
  except (ValueError, TypeError) as e:  # raised while binding the inputs to the function
    raise ServingError(Code.INVALID_ARGUMENT, str(e))
  except batching.QueueFullError as e:
    raise ServingError(Code.UNAVAILABLE, str(e))
  response = predict_pb2.PredictResponse()
  response.model_spec.name = servable.name
  response.model_spec.version.value = servable.version
  response.model_spec.signature_name = signature_name
  for name in request.output_filter or outputs:
    response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
  return response


def _snapshot(path: str) -> Tuple:
  """(relative path, size, mtime) of every file under a version directory."""
  files = []
  for root, _, names in os.walk(path):
    for name in names:
      stat = os.stat(os.path.join(root, name))
      files.append((os.path.relpath(os.path.join(root, name), path), stat.st_size,
                    stat.st_mtime_ns))
  return tuple(sorted(files))


class Model:
  """The versions of one model: polled from its base path, loaded and unloaded per its policy."""

  def __init__(self, config: model_server_config_pb2.ModelConfig, batching_parameters=None,
               warmup: bool = True):
    self.name = config.name
    self._config = config
    self._batching_parameters = batching_parameters
    self._warmup = warmup
    # These two are replaced as a whole, never mutated, so requests read them without a lock.
    self._servables: Dict[int, Servable] = {}
    self._states: Dict[int, Tuple[int, int, str]] = {}  # version -> (State, error code, message)
    self._seen: Dict[int, Tuple] = {}  # version -> its snapshot at the previous poll
    self._failed: Dict[int, Tuple] = {}  # version -> the snapshot that failed to load
    self._kept: Optional[List[int]] = None  # versions serving with no directory left, warned
    self._lock = threading.Lock()

  def poll(self, initial: bool = False):
    """Loads the aspired versions that are ready, then unloads the versions no longer aspired.

    Args:
      initial: versions already on disk at start-up are loaded without waiting a second poll.
    """
    with self._lock:
      ready = self._ready_versions(initial)
      aspired = self._aspired(sorted(ready))
      current = self._servables
      serving = {v: s for v, s in current.items() if v in aspired}
      for version in sorted(aspired - set(current)):
        servable = self._load(version, ready[version])
        if servable:
          serving[version] = servable
      if not serving:
        # Availability-preserving: the loaded versions stay until a successor is loaded and
        # warmed up. A successor still being written, one that failed to load, or a base path
        # left empty for a moment (the old version moved away first) leaves them serving, as
        # tensorflow_model_server with servable_versions_always_present.
        if current and not aspired and self._kept != sorted(current):
          self._kept = sorted(current)
          log.warning('no loadable version of model %s under %s: version(s) %s keep serving',
                      self.name, self._config.base_path, sorted(current))
        return
      self._servables, self._kept = serving, None
      for version in serving:
        self._set_state(version, State.AVAILABLE)
      for version in sorted(set(current) - set(serving)):
        self._unload(version, current[version])

  def _ready_versions(self, initial: bool) -> Dict[int, str]:
    """version -> path, of the versions loaded or ready to load.

    A version is a directory named by an int64; it is ready when it holds saved_model.pb and
    its files did not change since the previous poll (or at start-up).
    """
    base = self._config.base_path
    names = os.listdir(base) if os.path.isdir(base) else []
    if not names and initial:
      log.warning('no versions of model %s under %s (yet)', self.name, base)
    ready, seen = {}, {}
    for name in names:
      path = os.path.join(base, name)
      if not (name.isascii() and name.isdigit()) or int(name) > MAX_VERSION:
        continue  # TF Serving ignores directories that are not int64 version numbers
      version = int(name)
      if not os.path.isfile(os.path.join(path, 'saved_model.pb')):
        continue
      if version in self._servables:
        ready[version] = path
        continue
      seen[version] = _snapshot(path)
      stable = initial or self._seen.get(version) == seen[version]
      if stable and self._failed.get(version) != seen[version]:
        ready[version] = path
    self._seen = seen
    return ready

  def _aspired(self, versions: List[int]) -> set:
    policy = self._config.model_version_policy
    choice = policy.WhichOneof('policy_choice')
    if choice == 'all':
      return set(versions)
    if choice == 'specific':
      return set(versions) & set(policy.specific.versions)
    num_versions = policy.latest.num_versions if choice == 'latest' else 0
    return set(versions[-(num_versions or 1):])

  def _load(self, version: int, path: str) -> Optional[Servable]:
    self._set_state(version, State.LOADING)
    start = time.monotonic()
    servable = None
    try:
      servable = Servable(self.name, version, path, self._batching_parameters)
      warmed = self._run_warmup(servable) if self._warmup else 0
    except Exception as e:  # pylint: disable=broad-except
      # Any failure of a model's own code must not stop the server; it keeps the old version.
      if servable:
        servable.close()
      self._failed[version] = self._seen.get(version) or _snapshot(path)
      self._set_state(version, State.END, str(e))
      log.error('Failed to load servable version {name: %s version: %d} from %s: %s',
                self.name, version, path, e)
      return None
    log.info('Loaded servable version {name: %s version: %d} from %s in %.2f s '
             '(%d warm-up requests)', self.name, version, path, time.monotonic() - start, warmed)
    return servable

  @staticmethod
  def _run_warmup(servable: Servable) -> int:
    """Replays the Predict requests of assets.extra/tf_serving_warmup_requests, as TF Serving."""
    count = 0
    for prediction_log in warmup.read_warmup_logs(servable.path) or []:  # at most 1000
      if prediction_log.HasField('predict_log'):
        run_predict(servable, prediction_log.predict_log.request)
        count += 1
    return count

  def servable(self, spec) -> Servable:
    """The servable a ModelSpec asks for: its version, its version label or the newest one.

    Raises:
      ServingError: NOT_FOUND when that version is not loaded.
    """
    servables = self._servables
    if spec.HasField('version'):
      version, wanted = spec.version.value, f'Specific({self.name}, {spec.version.value})'
    elif spec.version_label:
      version = self._config.version_labels.get(spec.version_label)
      wanted = f'Specific({self.name}, label {spec.version_label})'
    else:
      version, wanted = max(servables, default=None), f'Latest({self.name})'
    if version not in servables:
      raise ServingError(Code.NOT_FOUND, f'Servable not found for request: {wanted}')
    return servables[version]

  def status(self, spec) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus for every version this server has seen, or for the one asked for."""
    states = self._states
    versions = sorted(states, reverse=True)
    if spec.HasField('version') or spec.version_label:
      version = (spec.version.value if spec.HasField('version')
                 else self._config.version_labels.get(spec.version_label))
      if version not in states:
        raise ServingError(Code.NOT_FOUND, f'Could not find version '
                           f'{spec.version_label or version} of model {self.name}')
      versions = [version]
    if not versions:
      raise ServingError(Code.NOT_FOUND, f'Could not find any versions of model {self.name}')
    response = get_model_status_pb2.GetModelStatusResponse()
    for version in versions:
      state, error_code, message = states[version]
      status = response.model_version_status.add(version=version, state=state)
      status.status.error_code = error_code
      status.status.error_message = message
    return response

  def _set_state(self, version: int, state: int, error: str = ''):
    self._states = {**self._states, version: (state, Code.UNKNOWN.value[0] if error else 0, error)}

  def _unload(self, version: int, servable: Servable):
    servable.close()
    self._set_state(version, State.END)
    log.info('Unloaded servable version {name: %s version: %d}', self.name, version)

  def close(self):
    servables, self._servables = self._servables, {}
    for version in sorted(servables):
      self._unload(version, servables[version])


class ModelServer:
  """The models, the version poller, and the gRPC and REST servers in front of them."""

  def __init__(self, args: argparse.Namespace):
    """Loads the models' initial versions, then starts polling and serving.

    Args:
      args: parsed flags (`parse_args`). Port 0 binds a free port; see `grpc_port`/`rest_port`.
    """
    for name in _ACCEPTED_NOT_HONOURED:
      if getattr(args, name) is not None:
        log.warning('--%s is accepted for compatibility and ignored by the local server', name)
    monitoring = monitoring_config(args)
    if monitoring and monitoring.prometheus_config.enable:
      log.warning('--monitoring_config_file: tensorflow_model_server would export Prometheus '
                  'metrics at %s; the local server exports none',
                  monitoring.prometheus_config.path or '/monitoring/prometheus/metrics')
    for flag, setter in [('tensorflow_intra_op_parallelism',
                          tf.config.threading.set_intra_op_parallelism_threads),
                         ('tensorflow_inter_op_parallelism',
                          tf.config.threading.set_inter_op_parallelism_threads)]:
      if getattr(args, flag):
        try:
          setter(getattr(args, flag))
        except RuntimeError:  # a server made inside a process where TensorFlow already ran
          log.warning('--%s ignored: TensorFlow is already initialized in this process', flag)
    batching_parameters = _batching_parameters(args)
    self.limits = Limits(args.max_batch_rows, args.max_tensor_elements)
    self.token = args.http_auth_token or os.environ.get(TOKEN_ENV, '')
    _warn_exposure(args, bool(self.token))
    self.models = {config.name: Model(config, batching_parameters, args.enable_model_warmup)
                   for config in model_config(args).model_config_list.config}
    for model in self.models.values():
      model.poll(initial=True)
    self._stop = threading.Event()
    self._poller = threading.Thread(target=self._poll, args=(args.file_system_poll_wait_seconds,),
                                    name='version-poller', daemon=True)
    self._grpc, self._http, self.rest_port = None, None, 0
    try:
      self._grpc, self.grpc_port = self._start_grpc(args)
      if args.rest_api_port:
        self._http = _BoundedHTTPServer((args.rest_api_bind_address, args.rest_api_port),
                                        _rest_handler(self, args), args.rest_api_num_threads)
    except (OSError, RuntimeError):  # a port in use: release what was started
      self.stop(grace=0)
      raise
    if self._http:
      self._http.daemon_threads = True
      self.rest_port = self._http.server_address[1]
      threading.Thread(target=self._http.serve_forever, name='rest', daemon=True).start()
      log.info('Exporting HTTP/REST API at %s:%d', args.rest_api_bind_address, self.rest_port)
    self._poller.start()

  def _start_grpc(self, args) -> Tuple[grpc.Server, int]:
    options = {'grpc.max_receive_message_length': args.max_request_bytes,
               'grpc.so_reuseport': 0}  # a port in use must fail, not be shared
    for argument in filter(None, args.grpc_channel_arguments.split(',')):
      key, value = argument.split('=', 1)
      options[key] = int(value) if value.lstrip('-').isdigit() else value
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.grpc_max_threads),
                         options=list(options.items()))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionService(self), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelService(self), server)
    host = args.grpc_bind_address
    port = server.add_insecure_port(f'[{host}]:{args.port}' if ':' in host
                                    else f'{host}:{args.port}')
    if not port:
      raise OSError(f'cannot bind gRPC to {host}:{args.port}')
    server.start()
    log.info('Running gRPC ModelServer at %s:%d', host, port)
    return server, port

  def _poll(self, wait_seconds: float):
    while wait_seconds > 0 and not self._stop.wait(wait_seconds):
      for model in self.models.values():
        try:
          model.poll()
        except OSError as e:  # e.g. a version directory removed while it was being read
          log.warning('polling %s failed: %s', model.name, e)

  def model(self, spec) -> Model:
    """The model a ModelSpec names. Raises ServingError (NOT_FOUND) for an unknown one."""
    if spec.name not in self.models:
      raise ServingError(Code.NOT_FOUND, f'Servable not found for request: Latest({spec.name})')
    return self.models[spec.name]

  def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    return run_predict(self.model(request.model_spec).servable(request.model_spec), request,
                       self.limits)

  def metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest
              ) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """GetModelMetadata: the servable's signature_def map, packed as TF Serving packs it."""
    fields = set(request.metadata_field)
    if fields != {'signature_def'}:
      raise ServingError(Code.INVALID_ARGUMENT,
                         f'Metadata field(s) {sorted(fields - {"signature_def"}) or "none"} '
                         f'not supported; ask for "signature_def"')
    servable = self.model(request.model_spec).servable(request.model_spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signature_defs.items():
      signature_map.signature_def[key].CopyFrom(signature)
    response.metadata['signature_def'].Pack(signature_map)
    return response

  def status(self, request: get_model_status_pb2.GetModelStatusRequest
            ) -> get_model_status_pb2.GetModelStatusResponse:
    return self.model(request.model_spec).status(request.model_spec)

  def stop(self, grace: float = 1.0):
    """Stops serving and polling and releases the loaded versions."""
    self._stop.set()
    if self._http:
      if self.rest_port:
        self._http.shutdown()
      self._http.server_close()
    if self._grpc:
      self._grpc.stop(grace).wait()
    if self._poller.is_alive():
      self._poller.join()
    for model in self.models.values():
      model.close()


def _answer(context: grpc.ServicerContext, fn, request):
  """fn(request), its ServingError as the call's status, any other fault as INTERNAL."""
  try:
    return fn(request)
  except ServingError as e:
    context.abort(e.code, e.message)
  except Exception as e:  # pylint: disable=broad-except
    log.exception('internal error answering %s', type(request).__name__)
    context.abort(Code.INTERNAL, f'internal error: {type(e).__name__}: {e}')


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):

  def __init__(self, server: ModelServer):
    self._server = server

  def Predict(self, request, context):
    return _answer(context, self._server.predict, request)

  def GetModelMetadata(self, request, context):
    return _answer(context, self._server.metadata, request)


class _ModelService(model_service_pb2_grpc.ModelServiceServicer):

  def __init__(self, server: ModelServer):
    self._server = server

  def GetModelStatus(self, request, context):
    return _answer(context, self._server.status, request)


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


def _rest_predict(server: ModelServer, spec, body: dict) -> dict:
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


class _BoundedHTTPServer(http.server.ThreadingHTTPServer):
  """A thread per connection, at most `max_connections` at once; beyond, 503 and close."""

  daemon_threads = True

  def __init__(self, address, handler, max_connections: int):
    super().__init__(address, handler)
    self.max_connections = max_connections
    self._slots = threading.BoundedSemaphore(max_connections)

  def process_request(self, request, client_address):
    if not self._slots.acquire(blocking=False):
      try:
        data = json.dumps({'error': f'the server has {self.max_connections} connections open '
                                    '(--rest_api_num_threads); retry later'}).encode()
        request.sendall(b'HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json'
                        b'\r\nRetry-After: 1\r\nContent-Length: %d\r\n\r\n%s' % (len(data), data))
      except OSError:
        pass
      self.shutdown_request(request)
      return
    super().process_request(request, client_address)

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()


def _rest_handler(server: ModelServer, args):
  """The HTTP handler class for one server."""

  class Handler(http.server.BaseHTTPRequestHandler):
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

    def _send(self, status: int, payload):
      data = json.dumps(payload).encode()
      self.send_response(status)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      log.debug('REST %s', format % args)

  return Handler


def _warn_exposure(args: argparse.Namespace, with_token: bool):
  """A loud warning for each port bound beyond loopback without protection."""
  if args.grpc_bind_address not in LOOPBACK:
    log.warning('gRPC is bound to %s without authentication: anyone who reaches this host can '
                'call the model (docs/security.md)', args.grpc_bind_address)
  if args.rest_api_port and args.rest_api_bind_address not in LOOPBACK and not with_token:
    log.warning('REST is bound to %s without --http_auth_token: anyone who reaches this host '
                'can call the model (docs/security.md)', args.rest_api_bind_address)


# Flags: tensorflow_model_server's names and defaults unless said otherwise (serving/README.md).
_ACCEPTED_NOT_HONOURED = ['per_process_gpu_memory_fraction',
                          'model_config_file_poll_wait_seconds', 'saved_model_tags',
                          'tensorflow_session_parallelism',
                          'allow_version_labels_for_unavailable_models']


def _bool(value: str) -> bool:
  if value.lower() in ('true', '1', 'yes'):
    return True
  if value.lower() in ('false', '0', 'no'):
    return False
  raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  """Parses tensorflow_model_server's flags (both --flag=value and --flag value)."""
  parser = argparse.ArgumentParser(
      prog='python -m serving.model_server',
      description='Local stand-in for tensorflow_model_server (gRPC and REST).')
  add = parser.add_argument
  add('--port', type=int, default=8500, help='gRPC port; 0 picks a free one')
  add('--grpc_bind_address', default='127.0.0.1',
      help='local only: gRPC address (tensorflow_model_server binds 0.0.0.0)')
  add('--rest_api_port', type=int, default=8501,
      help='REST port, 0 disables REST (tensorflow_model_server defaults to 0)')
  add('--rest_api_bind_address', default='127.0.0.1',
      help='local only: REST address (tensorflow_model_server binds all interfaces)')
  add('--model_name', default='default')
  add('--model_base_path', default='', help='the directory holding the numeric versions')
  add('--model_config_file', default='', help='ModelServerConfig text proto; wins over '
      '--model_name/--model_base_path')
  add('--enable_batching', type=_bool, nargs='?', const=True, default=False)
  add('--batching_parameters_file', default='', help='BatchingParameters text proto')
  add('--file_system_poll_wait_seconds', type=float, default=1,
      help='seconds between polls of the base paths; 0 polls once, at start-up')
  add('--enable_model_warmup', type=_bool, nargs='?', const=True, default=True)
  add('--grpc_channel_arguments', default='',
      help='k=v,... gRPC server arguments, e.g. grpc.max_receive_message_length=1048576')
  add('--grpc_max_threads', type=int, default=16, help='gRPC worker threads')
  add('--max_request_bytes', type=int, default=16 << 20,
      help='local only: largest gRPC message / REST body accepted (RESOURCE_EXHAUSTED / 413); '
      'grpc.max_receive_message_length in --grpc_channel_arguments overrides it for gRPC')
  add('--rest_api_num_threads', type=int, default=4 * (os.cpu_count() or 1),
      help='REST connections served at once (each on its own thread); beyond, 503')
  add('--rest_api_timeout_in_ms', type=int, default=30000,
      help='a REST connection idle this long while a request is read is closed')
  add('--max_batch_rows', type=int, default=Limits().max_batch_rows,
      help='local only: rows per Predict request (INVALID_ARGUMENT / 400 beyond)')
  add('--max_tensor_elements', type=int, default=Limits().max_tensor_elements,
      help='local only: elements per input tensor, checked before it is decoded '
      '(RESOURCE_EXHAUSTED / 413 beyond)')
  add('--http_auth_token', default='',
      help=f'local only: REST requests must carry "Authorization: Bearer <token>" (also from '
      f'${TOKEN_ENV}); gRPC has no token: keep it on loopback or behind a proxy')
  add('--monitoring_config_file', default='', help='MonitoringConfig text proto: parsed and '
      'checked; the local server exports no Prometheus metrics')
  add('--tensorflow_intra_op_parallelism', type=int, default=0)
  add('--tensorflow_inter_op_parallelism', type=int, default=0)
  for name in _ACCEPTED_NOT_HONOURED:
    add(f'--{name}', default=None, help='accepted for compatibility, ignored')
  args = parser.parse_args(argv)
  if not args.model_config_file and not args.model_base_path:
    parser.error('give --model_base_path or --model_config_file')
  if args.batching_parameters_file and not args.enable_batching:
    parser.error('--batching_parameters_file is set without --enable_batching')
  for name in ('rest_api_num_threads', 'rest_api_timeout_in_ms', 'max_batch_rows',
               'max_tensor_elements'):
    if getattr(args, name) < 1:
      parser.error(f'--{name} must be at least 1, got {getattr(args, name)}')
  return args


def model_config(args: argparse.Namespace) -> model_server_config_pb2.ModelServerConfig:
  """The ModelServerConfig: from --model_config_file, or one model from the model flags."""
  config = model_server_config_pb2.ModelServerConfig()
  if args.model_config_file:
    with open(args.model_config_file) as f:
      text_format.Parse(f.read(), config)
  else:
    config.model_config_list.config.add(name=args.model_name, base_path=args.model_base_path,
                                        model_platform='tensorflow')
  for model in config.model_config_list.config:
    if model.model_platform not in ('', 'tensorflow'):
      raise ValueError(f'model {model.name}: platform {model.model_platform!r} is not served')
  return config


def monitoring_config(args: argparse.Namespace):
  """The MonitoringConfig of --monitoring_config_file (None without one).

  tensorflow_model_server fails to start on a file that does not parse; so does this server,
  although it exports no metrics.
  """
  if not args.monitoring_config_file:
    return None
  config = protos.MonitoringConfig()
  with open(args.monitoring_config_file) as f:
    text_format.Parse(f.read(), config)
  return config


def _batching_parameters(args: argparse.Namespace):
  if not args.enable_batching:
    return None
  params = batching.BatchingParameters()
  if args.batching_parameters_file:
    with open(args.batching_parameters_file) as f:
      text_format.Parse(f.read(), params)
  return params


def main(argv: Optional[List[str]] = None) -> int:
  """Serves until SIGINT or SIGTERM."""
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  args = parse_args(argv)
  try:
    server = ModelServer(args)
  except (OSError, RuntimeError, ValueError, text_format.ParseError) as e:
    log.error('cannot start: %s', e)
    return 2
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  signal.signal(signal.SIGINT, lambda *_: stop.set())
  stop.wait()
  log.info('Shutting down')
  server.stop()
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
