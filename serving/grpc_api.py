"""The gRPC services of the local model server: PredictionService and ModelService.

Each call is answered by the ModelServer (serving/model_server.py) with the request proto as
tensorflow-serving-api sends it; a `ServingError` becomes the call's status code and message,
any other fault INTERNAL (logged with its traceback), never a dropped call. docs/serving.md
lists the calls.
"""

import logging

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

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


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
  """PredictionService.Predict and GetModelMetadata, answered by a ModelServer."""

  def __init__(self, server):
    self._server = server

  def Predict(self, request, context):
    return _answer(context, self._server.predict, request)

  def GetModelMetadata(self, request, context):
    return _answer(context, self._server.metadata, request)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
  """ModelService.GetModelStatus, answered by a ModelServer."""

  def __init__(self, server):
    self._server = server

  def GetModelStatus(self, request, context):
    return _answer(context, self._server.status, request)
