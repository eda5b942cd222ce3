"""PredictRequests of the serving contract (docs/contracts.md §4), built in one place.

The trainer's export (warm-up records, servable/warmup.py), the gRPC client (serving/client.py),
the benchmarks and the tests all build their requests here, so the padding rule below holds for
every request the project sends.
"""

from typing import Optional, Sequence

import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

# The signature that takes `k` (items wanted) beside serving_default's inputs, and the most
# items it returns (docs/contracts.md §4). serving_default's own K is fixed at export.
K_SIGNATURE = 'recommend_k'
# serving_default by brute force over the whole catalog, whatever index serving_default uses.
EXACT_SIGNATURE = 'recommend_exact'
MAX_K = 1000
# The k of the warm-up requests of recommend_k: what a re-ranker typically asks for.
DEFAULT_LARGE_K = 100

def predict_request(user_ids: Sequence[str], histories: Sequence[Sequence[str]],
                    queries: Optional[Sequence[str]] = None, model_name: str = 'recommender',
                    signature_name: str = 'serving_default',
                    k: Optional[int] = None) -> predict_pb2.PredictRequest:
  """A PredictRequest of the serving contract: `user_id` [B], `history` [B, H], `query` [B].

  Each history row starts with "" and is padded with "" on the right to the longest row: with
  pad_variable_length_inputs, TF Serving's batching pads a shorter history with the request's
  first value, which must therefore be the padding "" (serving_config/README.md). The model
  ignores "".

  Args:
    user_ids: B user ids; unknown users are normal traffic.
    histories: B lists of item ids, most recent last (may be empty).
    queries: B search texts, "" for none; default all "".
    model_name: model_spec.name.
    signature_name: model_spec.signature_name.
    k: items wanted per row: the `k` input of K_SIGNATURE (give it with that signature, and
      only with it).

  Raises:
    ValueError: the three inputs do not have one entry per row, or `k` and K_SIGNATURE do
      not come together.
  """
  if (k is not None) != (signature_name == K_SIGNATURE):
    raise ValueError(f'k is the input of {K_SIGNATURE}: give both or neither (signature '
                     f'{signature_name!r}, k={k})')
  queries = [''] * len(user_ids) if queries is None else list(queries)
  if not len(user_ids) == len(histories) == len(queries):
    raise ValueError(f'{len(user_ids)} users, {len(histories)} histories and {len(queries)} '
                     'queries: give one of each per row')
  width = max([len(h) for h in histories] + [0])
  rows = [[''] + list(h) + [''] * (width - len(h)) for h in histories]
  request = predict_pb2.PredictRequest()
  request.model_spec.name = model_name
  request.model_spec.signature_name = signature_name
  for name, value in [('user_id', list(user_ids)), ('history', rows), ('query', queries)]:
    request.inputs[name].CopyFrom(tf.make_tensor_proto(value, dtype=tf.string))
  if k is not None:
    request.inputs['k'].CopyFrom(tf.make_tensor_proto([int(k)] * len(user_ids), dtype=tf.int32))
  return request
