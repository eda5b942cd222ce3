"""Measures SavedModels as TF Serving would run them: size, in-process latency, quality.

Each model is loaded with `tf.saved_model.load` and called through its signatures, as a
server calls them. Latency: `serving_default` on recommendation requests (user and history
from the eval split, no query) and on search requests (the search split's queries, no user,
no history), at batch 1 and 64, after a warm-up; the models take turns in rounds, so that
load from other processes on the machine hits both alike. Quality: `eval_ranks` on raw
examples and trainers.metrics.rank_metrics, as the Evaluator computes it.

`session_latency` times the same requests through the TF1 Session API (one Session::Run per
request, no Python function-call machinery), the way TF Serving's SavedModelBundle runs a
model; the eager numbers carry a fixed per-call overhead of the Python call path that both
models pay alike.
"""

import time
from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf
# The SavedModels' Transform graph tokenizes with TF Text ops.
import tensorflow_text  # pylint: disable=unused-import
from tfx.types import artifact_utils

from trainers import features
from trainers import metrics

RECOMMEND = 'recommend'
SEARCH = 'search'
BATCH_SIZES = (1, 64)


def raw_examples(examples_artifact, split: str, limit: int = 0) -> List[bytes]:
  """Serialized tf.Examples of one split of an ExampleGen Examples artifact."""
  return split_records(artifact_utils.get_split_uri([examples_artifact], split), limit)


def split_records(split_uri: str, limit: int = 0) -> List[bytes]:
  """Serialized records of one split directory of an Examples artifact (`.../Split-<name>`),
  the first `limit` (0: all)."""
  files = sorted(tf.io.gfile.glob(split_uri + '/*'))
  records = []
  for record in tf.data.TFRecordDataset(files, compression_type='GZIP'):
    records.append(record.numpy())
    if limit and len(records) >= limit:
      break
  return records


def _strings(example: tf.train.Example, name: str) -> List[str]:
  return [v.decode() for v in example.features.feature[name].bytes_list.value]


def requests(serialized: Sequence[bytes], kind: str, batch_size: int, max_history: int,
             n_batches: int) -> List[Dict[str, tf.Tensor]]:
  """Request batches for serving_default built from raw examples, cycling through them.

  Recommendation requests carry the example's user and its last `max_history` history items
  and no query; search requests carry the example's query only.
  """
  parsed = [tf.train.Example.FromString(s) for s in serialized]
  if kind == SEARCH:
    parsed = [e for e in parsed if _strings(e, features.QUERY) and _strings(e, features.QUERY)[0]]
  if not parsed:
    return []
  batches = []
  position = 0
  for _ in range(n_batches):
    rows = []
    for _ in range(batch_size):
      rows.append(parsed[position % len(parsed)])
      position += 1
    if kind == RECOMMEND:
      users = [_strings(e, features.USER_ID)[0] for e in rows]
      histories = [_strings(e, features.HISTORY)[-max_history:] for e in rows]
      queries = [''] * len(rows)
    else:
      users = [''] * len(rows)
      histories = [[] for _ in rows]
      queries = [_strings(e, features.QUERY)[0] for e in rows]
    width = max(1, max(len(h) for h in histories))
    history = [h + [''] * (width - len(h)) for h in histories]
    batches.append({'user_id': tf.constant(users), 'history': tf.constant(history),
                    'query': tf.constant(queries)})
  return batches


def _percentiles(seconds: List[float]) -> dict:
  ms = np.asarray(seconds) * 1000.0
  return {'p50': float(np.percentile(ms, 50)), 'p99': float(np.percentile(ms, 99)),
          'mean': float(ms.mean()), 'calls': int(len(ms))}


def latency(models: Dict[str, object], request_sets: Dict[str, Dict[int, List[dict]]],
            calls: Dict[int, int], warmup: int = 10, rounds: int = 5) -> Dict[str, dict]:
  """p50/p99/mean latency in ms of each model's serving_default per request kind and batch.

  Args:
    models: name -> loaded SavedModel.
    request_sets: kind -> batch size -> request batches.
    calls: batch size -> calls per model (split over `rounds`).
    warmup: untimed calls per model, kind and batch size first.
    rounds: the models alternate this many times.

  Returns:
    name -> kind -> 'batch_<n>' -> {'p50', 'p99', 'mean', 'calls'}.
  """
  functions = {name: m.signatures['serving_default'] for name, m in models.items()}
  times = {name: {} for name in models}
  for kind, by_batch in request_sets.items():
    for batch_size, batches in by_batch.items():
      if not batches:
        continue
      for fn in functions.values():
        for i in range(warmup):
          fn(**batches[i % len(batches)])
      per_round = max(1, calls[batch_size] // rounds)
      for name in functions:
        times[name].setdefault(kind, {})[batch_size] = []
      for r in range(rounds):
        # Alternate which model goes first, so that neither always follows the other.
        order = list(functions) if r % 2 == 0 else list(reversed(list(functions)))
        for name in order:
          fn = functions[name]
          for i in range(per_round):
            request = batches[(r * per_round + i) % len(batches)]
            started = time.perf_counter()
            outputs = fn(**request)
            outputs['scores'].numpy()
            times[name][kind][batch_size].append(time.perf_counter() - started)
  return {name: {kind: {f'batch_{b}': _percentiles(t) for b, t in by_batch.items()}
                 for kind, by_batch in kinds.items()}
          for name, kinds in times.items()}


class SessionModel:
  """A SavedModel run through the TF1 Session API, as TF Serving runs it (SavedModelBundle)."""

  def __init__(self, path: str):
    self.graph = tf.Graph()
    with self.graph.as_default():
      self.session = tf.compat.v1.Session(graph=self.graph)
      meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ['serve'], path)
    signature = meta_graph.signature_def['serving_default']
    self.inputs = {k: v.name for k, v in signature.inputs.items()}
    self.outputs = {k: v.name for k, v in signature.outputs.items()}

  def __call__(self, **request):
    feeds = {self.inputs[k]: v.numpy() for k, v in request.items()}
    values = self.session.run(list(self.outputs.values()), feeds)
    return {k: _Fetched(v) for k, v in zip(self.outputs, values)}

  def close(self):
    self.session.close()


class _Fetched:
  """A fetched numpy value with the .numpy() of an eager tensor (latency() calls it)."""

  def __init__(self, value):
    self.value = value

  def numpy(self):
    return self.value


class _Signatures:
  def __init__(self, fn):
    self.signatures = {'serving_default': fn}


def session_latency(paths: Dict[str, str], request_sets, calls, warmup: int = 10,
                    rounds: int = 5) -> Dict[str, dict]:
  """latency() of each SavedModel through the Session API; name -> path."""
  sessions = {name: SessionModel(path) for name, path in paths.items()}
  try:
    return latency({name: _Signatures(s) for name, s in sessions.items()}, request_sets,
                   calls, warmup, rounds)
  finally:
    for s in sessions.values():
      s.close()


def ranks(model, serialized: Sequence[bytes], batch_size: int = 256) -> np.ndarray:
  """eval_ranks of every example (1-based rank of its target; inf if not in the catalog)."""
  fn = model.signatures[features.EVAL_SIGNATURE]
  out = []
  for i in range(0, len(serialized), batch_size):
    out.append(fn(examples=tf.constant(list(serialized[i:i + batch_size])))[
        features.RANK_OUTPUT].numpy().reshape(-1))
  return np.concatenate(out) if out else np.zeros([0])


def quality(model, splits: Dict[str, Sequence[bytes]]) -> Dict[str, dict]:
  """rank_metrics (docs/contracts.md §2) of a model on each split's raw examples."""
  return {split: metrics.rank_metrics(ranks(model, serialized))
          for split, serialized in splits.items() if len(serialized)}


def ratio(numerator, denominator):
  """numerator / denominator, or None where either is missing or the denominator is 0."""
  if numerator is None or denominator in (None, 0):
    return None
  return float(numerator) / float(denominator)
