"""SavedModel warm-up records: `assets.extra/tf_serving_warmup_requests`.

tensorflow_model_server (with --enable_model_warmup, on by default) replays the PredictionLog
records of this TFRecord file against a newly loaded version before it serves it, so the first
real requests do not pay for lazy initialisation (graph optimisation, kernel selection and
autotuning for each input shape, GPU memory pools, hash-table warm-up). The local server
(serving/model_server.py) replays them the same way. A failing record fails the load, and more
than 1000 records fail it too (TF Serving's limit).

The trainer calls, after saving the serving model:

    warmup.write_warmup_requests(serving_model_dir, warmup.default_requests(item_ids))
"""

import os
from typing import Iterable, List, Optional, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

from servable.requests import predict_request

WARMUP_FILE = os.path.join('assets.extra', 'tf_serving_warmup_requests')
MAX_RECORDS = 1000  # tensorflow_model_server fails a load with more records than this

# Free-text queries of the kind shoppers type; the model's text features see real words.
_QUERIES = ['red lantern', 'christmas gift set', 'vintage heart', 'cake stand', 'tea cup']


def _as_strings(item_ids) -> List[str]:
  if hasattr(item_ids, 'numpy'):  # a tf.Tensor or tf.Variable
    item_ids = item_ids.numpy()
  return [i.decode() if isinstance(i, bytes) else str(i) for i in np.asarray(item_ids).ravel()]


def default_requests(item_ids, batch_sizes: Sequence[int] = (1, 8, 64),
                     history_length: int = 20, model_name: str = 'recommender',
                     signature_name: str = 'serving_default', k: Optional[int] = None
                    ) -> List[predict_pb2.PredictRequest]:
  """A few representative requests for the recommender's serving_default.

  For each batch size: one request without queries and one with a query on every other row.
  Rows mix an unknown user, histories of different lengths (from empty to `history_length`,
  drawn from `item_ids` and including one unknown item), so the lookups, the history pooling,
  the exclusion of history items and the full-catalog top-k all run at each warmed shape. The
  default sizes cover a single request and the batches the GPU batching config forms
  (serving_config/batching_parameters_gpu.txt: up to 64).

  Args:
    item_ids: the catalog (strings, bytes, a numpy array or a tf.Tensor); may be empty.
    batch_sizes: the batch sizes to warm.
    history_length: the longest history sent.
    model_name: model_spec.name of the requests.
    signature_name: the signature they call.
    k: items asked per row, with signature_name requests.K_SIGNATURE; else None.

  Returns:
    2 * len(batch_sizes) PredictRequests.
  """
  items = _as_strings(item_ids)[:max(1, history_length * 4)] or ['']
  requests = []
  for batch_size in batch_sizes:
    for with_query in (False, True):
      users, histories, queries = [], [], []
      for row in range(batch_size):
        length = (row * 7 + 3 * with_query) % (history_length + 1) if batch_size > 1 else 5
        history = [items[(row * 13 + j) % len(items)] for j in range(length)]
        if row % 4 == 3 and history:
          history[0] = 'warmup-unknown-item'
        users.append('warmup-user' if row % 2 else '')
        histories.append(history)
        queries.append(_QUERIES[row % len(_QUERIES)] if with_query and row % 2 == 0 else '')
      requests.append(predict_request(users, histories, queries, model_name, signature_name,
                                      k=k))
  return requests


def write_warmup_requests(saved_model_dir: str,
                          requests: Iterable[predict_pb2.PredictRequest]) -> str:
  """Writes the requests as `<saved_model_dir>/assets.extra/tf_serving_warmup_requests`.

  Args:
    saved_model_dir: a SavedModel directory (any tf.io.gfile path, e.g. gs://).
    requests: PredictRequests, replayed in this order at load.

  Returns:
    The path written (replaced if it existed).

  Raises:
    ValueError: no requests, or more than TF Serving's 1000.
  """
  records = []
  for request in requests:
    prediction_log = prediction_log_pb2.PredictionLog()
    prediction_log.predict_log.request.CopyFrom(request)
    records.append(prediction_log.SerializeToString())
  if not 0 < len(records) <= MAX_RECORDS:
    raise ValueError(f'{len(records)} warm-up requests; TF Serving takes 1 to {MAX_RECORDS}')
  path = os.path.join(saved_model_dir, WARMUP_FILE)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)
  return path


def read_warmup_logs(saved_model_dir: str) -> Optional[List[prediction_log_pb2.PredictionLog]]:
  """The PredictionLogs of a SavedModel's warm-up file; None when it has none.

  Raises:
    ValueError: more than 1000 records, or one that is not a PredictionLog (both fail a load in
      TF Serving).
  """
  path = os.path.join(saved_model_dir, WARMUP_FILE)
  if not tf.io.gfile.exists(path):
    return None
  logs = []
  for record in tf.data.TFRecordDataset(path).take(MAX_RECORDS + 1):
    if len(logs) == MAX_RECORDS:
      raise ValueError(f'Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {path}')
    try:
      logs.append(prediction_log_pb2.PredictionLog.FromString(record.numpy()))
    except Exception as e:  # pylint: disable=broad-except  (protobuf's DecodeError)
      raise ValueError(f'Failed to parse warmup record from {path}: {e}') from e
  return logs
