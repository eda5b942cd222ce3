"""The gRPC services of the local model server: PredictionService and ModelService.

Each call is answered by the ModelServer (serving/model_server.py) with the request proto as
tensorflow-serving-api sends it; a `ServingError` becomes the call's status code and message,
any other fault INTERNAL (logged with its traceback), never a dropped call. The services take
the request's bytes and parse them here, so that bytes that are not the method's request
message (not a protobuf, a string field that is not UTF-8) get INVALID_ARGUMENT naming the
message, rather than grpc's own `INTERNAL: Exception deserializing request!`. Methods the
server does not implement (Classify, Regress, MultiInference, HandleReloadConfigRequest) are
UNIMPLEMENTED. docs/serving.md lists the calls.
"""

import logging

import grpc
from google.protobuf import message as message_lib
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import predict_pb2

from serving.predict import Code
from serving.predict import ServingError

log = logging.getLogger('model_server')


def _answer(context: grpc.ServicerContext, fn, request):
  """fn(request), its ServingError as the call's status, any other fault as INTERNAL."""
  try:
    return fn(request)
  except ServingError as e:
    context.abort(e.code, e.message)
  except Exception as e:  # pylint: disable=broad-except
    log.exception('internal error answering %s', type(request).__name__)
    context.abort(Code.INTERNAL, f'internal error: {type(e).__name__}: {e}')


def _method(request_class, response_class, fn) -> grpc.RpcMethodHandler:
  """A unary method that parses its request bytes as `request_class` and answers fn(request)."""

  def call(data: bytes, context: grpc.ServicerContext):
    try:
      request = request_class.FromString(data)
    except message_lib.DecodeError as e:
      context.abort(Code.INVALID_ARGUMENT, f'the request is not a serialized '
                    f'{request_class.DESCRIPTOR.full_name}: {e}')
    return _answer(context, fn, request)

  return grpc.unary_unary_rpc_method_handler(
      call, request_deserializer=None, response_serializer=response_class.SerializeToString)


def add_services(model_server, grpc_server: grpc.Server) -> None:
  """Registers PredictionService (Predict, GetModelMetadata) and ModelService
  (GetModelStatus), answered by `model_server`, on `grpc_server`."""
  services = {
      'tensorflow.serving.PredictionService': {
          'Predict': _method(predict_pb2.PredictRequest, predict_pb2.PredictResponse,
                             model_server.predict),
          'GetModelMetadata': _method(get_model_metadata_pb2.GetModelMetadataRequest,
                                      get_model_metadata_pb2.GetModelMetadataResponse,
                                      model_server.metadata)},
      'tensorflow.serving.ModelService': {
          'GetModelStatus': _method(get_model_status_pb2.GetModelStatusRequest,
                                    get_model_status_pb2.GetModelStatusResponse,
                                    model_server.status)},
  }
  grpc_server.add_generic_rpc_handlers(tuple(
      grpc.method_handlers_generic_handler(name, methods) for name, methods in services.items()))
