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

This module is the server and its flags; the parts are serving/predict.py (a loaded version and
Predict), serving/versions.py (the version manager), serving/grpc_api.py (the gRPC services),
serving/rest.py (the REST API) and serving/http_server.py (its bounded HTTP server). docs/serving.md
describes them.
"""

import argparse
import logging
import os
import signal
import threading
import time
from concurrent import futures
from typing import List, Optional, Tuple

import grpc
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving import batching
from serving import grpc_api
from serving import metrics as metrics_lib
from serving import protos
from serving import rest
from servable import warmup
# The names this module had before it was split, for the callers and tests that use them.
from serving.predict import (  # pylint: disable=unused-import (re-exported)
    Arrays, Code, DEFAULT_SIGNATURE, MAX_VERSION, Limits, Servable, ServingError,
    read_signature_defs, run_predict)
from serving.rest import TOKEN_ENV
from serving.versions import Model, State  # pylint: disable=unused-import (re-exported)

log = logging.getLogger('model_server')

WARMUP_FILE = warmup.WARMUP_FILE
LOOPBACK = ('127.0.0.1', 'localhost', '::1')


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
    # Prometheus metrics on the REST port, as --monitoring_config_file asks (serving/metrics.py).
    self.metrics = None
    if monitoring and monitoring.prometheus_config.enable:
      self.metrics = metrics_lib.ServerMetrics(
          monitoring.prometheus_config.path or '/monitoring/prometheus/metrics', self.models)
    for model in self.models.values():
      model.poll(initial=True)
    self._stop = threading.Event()
    self._poller = threading.Thread(target=self._poll, args=(args.file_system_poll_wait_seconds,),
                                    name='version-poller', daemon=True)
    self._grpc, self._http, self.rest_port = None, None, 0
    try:
      self._grpc, self.grpc_port = self._start_grpc(args)
      if args.rest_api_port:
        self._http = rest.http_server(self, args)
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
    grpc_api.add_services(self, server)
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
    started, status = time.perf_counter(), 'OK'
    try:
      return run_predict(self.model(request.model_spec).servable(request.model_spec), request,
                         self.limits)
    except ServingError as e:
      status = e.code.name
      raise
    except Exception:
      status = 'INTERNAL'
      raise
    finally:
      if self.metrics:
        self.metrics.observe(request.model_spec.name,
                             request.model_spec.signature_name or DEFAULT_SIGNATURE, status,
                             time.perf_counter() - started)

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
  and with prometheus_config enabled it exports request counts and latencies
  (serving/metrics.py).
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
