"""One loaded model version and the Predict call on it, as tensorflow_model_server runs it.

`Servable` loads a SavedModel's `serve` signatures (through a batcher with --enable_batching);
`run_predict` validates a PredictRequest against the signature and the request limits
(--max_batch_rows, --max_tensor_elements) before any tensor is decoded, runs it, and answers
every refusal as a `ServingError` with TF Serving's status code. The gRPC services
(serving/grpc_api.py), the REST API (serving/rest.py) and the warm-up replay
(serving/versions.py) all go through it; docs/serving.md describes the API and its limits.
"""

import os
from typing import Dict, NamedTuple

import grpc
import numpy as np
import tensorflow as tf
# TF Serving links TF Text's classic ops (text.BertTokenizer): so does this stand-in.
import tensorflow_text  # pylint: disable=unused-import
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import predict_pb2

from serving import batching

Arrays = Dict[str, np.ndarray]
Code = grpc.StatusCode
DEFAULT_SIGNATURE = 'serving_default'
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}  # TF and gRPC share the numbers
MAX_VERSION = 2**63 - 1


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
