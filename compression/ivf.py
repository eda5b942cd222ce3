"""A two-stage (inverted-file) top-K index over the candidate vectors, in standard TF ops.

Brute force scores the whole catalog on every request: N x dim multiply-adds and a top_k over
N. The index scores only the items of the few partitions nearest to the query:

1. build (once, in the Compressor): k-means (scikit-learn's, one thread, a fixed seed: the
   same vectors give the same lists) over the candidate vectors puts every item in one of
   `n_lists` partitions (default round(sqrt(N))); the items are stored list by list
   (`list_items`, with `offsets` [n_lists + 1]);
2. serve: the query's inner product with the centroids picks the `nprobe` best lists
   (`MatMul`, `TopKV2`); their items are gathered as one ragged row per request
   (`RaggedRange`, `GatherV2`), scored against the model's own candidate vectors (the same
   int8 rows and scales as brute force, so no float re-ranking stage is needed: a candidate's
   score is the one brute force gives it, to float rounding), the request's history items set
   to -inf exactly, and the best K kept (`TopKV2` on the padded rows); a batch whose probed
   lists hold fewer than K candidates for some row falls back to brute force.

Every op is in stock TensorFlow, so unmodified `tensorflow_model_server` loads the model.
`scores()` (brute force over the whole catalog) stays: eval_ranks ranks every item with it,
and the `recommend_exact` signature answers with it, for checks.

nprobe is chosen on the validation split (`choose`): the smallest power of two whose index
recall@10 (share of the exact top-10 that the index returns, history excluded) reaches the
target; the index is used at all only where it scans at most 1/SCAN_RATIO of the catalog
(`worth_it`), since below that the fixed cost of its extra ops outweighs what it saves
(benchmarks/serving.py --index measures both at 1M items).
"""

import math
import time
from typing import Dict, List, Sequence

import numpy as np
import tensorflow as tf

from trainers import features
from trainers import model as model_lib

# The index serves only when it scans at most 1/SCAN_RATIO of the catalog (centroids + the
# probed lists' items, mean over validation requests): a cost model, not a timing, so the
# decision is the same on every run and machine.
SCAN_RATIO = 8
# k-means is trained on at most this many points per list (FAISS's rule of thumb), sampled
# with the seed, then every item is assigned to its nearest centroid.
TRAIN_POINTS_PER_LIST = 64
KMEANS_ITERATIONS = 20
RECALL_K = 10
# History exclusion compares every (candidate, history item) pair up to this many pairs per
# batch (a serving request: thousands of candidates x a short history), else binary-searches.
MAX_COMPARED_PAIRS = 1 << 22


def default_lists(n_items: int) -> int:
  """round(sqrt(N)) partitions, at least 1."""
  return max(1, int(round(math.sqrt(n_items))))


def build_lists(vectors: np.ndarray, n_lists: int, seed: int):
  """k-means partitions of `vectors` [N, dim].

  Returns:
    (centroids float32 [n_lists, dim], list_items int64 [N]: item ids list by list (ascending
    within a list), offsets int64 [n_lists + 1]: list j is list_items[offsets[j]:offsets[j+1]]).
  """
  from sklearn import cluster  # pylint: disable=g-import-not-at-top
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  vectors = np.asarray(vectors, np.float32)
  n_items = len(vectors)
  n_lists = max(1, min(int(n_lists), n_items))
  rng = np.random.default_rng(seed)
  sample = vectors
  if n_items > TRAIN_POINTS_PER_LIST * n_lists:
    sample = vectors[np.sort(rng.choice(n_items, TRAIN_POINTS_PER_LIST * n_lists,
                                        replace=False))]
  # One thread: scikit-learn's multithreaded Lloyd sums in a thread-dependent order.
  with threadpool_limits(limits=1):
    kmeans = cluster.KMeans(n_clusters=n_lists, n_init=1, max_iter=KMEANS_ITERATIONS,
                            random_state=seed).fit(sample)
  centroids = kmeans.cluster_centers_.astype(np.float32)
  assignment = np.empty(n_items, np.int64)
  norms = (centroids ** 2).sum(axis=1)
  for start in range(0, n_items, 65536):
    chunk = vectors[start:start + 65536]
    assignment[start:start + len(chunk)] = np.argmin(norms[None, :] - 2.0 * chunk @ centroids.T,
                                                     axis=1)
  list_items = np.argsort(assignment, kind='stable').astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(np.bincount(assignment, minlength=n_lists))])
  return centroids, list_items, offsets.astype(np.int64)


def search(query, rows, centroids, list_items, offsets, history_idx: tf.SparseTensor, k,
           nprobe):
  """Top-k item ids and scores of each query row from its `nprobe` nearest lists.

  Args:
    query: float32 [B, dim].
    rows: callable, positions (int64 [M]) -> float32 [M, dim] candidate vectors, stored list
      by list (position p holds item list_items[p]), so that a list is read contiguously.
    centroids, list_items, offsets: build_lists' output (tensors).
    history_idx: int64 SparseTensor [B, (H)] of item ids excluded per row.
    k: items per row (int32 scalar); nprobe: lists probed (int32 scalar).

  Returns:
    (item ids int64 [B, k], scores float32 [B, k]); a row with fewer than k candidates is
    filled with score -inf (as brute force fills a row whose history leaves fewer than k).
  """
  n_lists = tf.shape(centroids)[0]
  nprobe = tf.clip_by_value(nprobe, 1, n_lists)
  probe = tf.math.top_k(tf.matmul(query, centroids, transpose_b=True), k=nprobe).indices
  starts = tf.reshape(tf.gather(offsets, probe), [-1])
  limits = tf.reshape(tf.gather(offsets, probe + 1), [-1])
  positions = tf.RaggedTensor.from_uniform_row_length(
      tf.ragged.range(starts, limits), tf.cast(nprobe, tf.int64)).merge_dims(1, 2)  # [B, (C)]
  row_of = positions.value_rowids()
  items = tf.gather(list_items, positions.flat_values)
  vectors = rows(positions.flat_values)
  # One request (real-time traffic): one matrix-vector product; else a product per row.
  scores = tf.cond(tf.equal(tf.shape(query)[0], 1),
                   lambda: tf.linalg.matvec(vectors, query[0]),
                   lambda: tf.reduce_sum(vectors * tf.gather(query, row_of), axis=1))
  # Padded to at least k columns, so that top_k can always take k.
  width = tf.maximum(tf.cast(positions.bounding_shape(axis=1), tf.int32), k)
  shape = tf.stack([tf.shape(query)[0], width])
  dense_scores = positions.with_flat_values(scores).to_tensor(default_value=-np.inf,
                                                              shape=shape)
  dense_items = positions.with_flat_values(items).to_tensor(default_value=-1, shape=shape)
  history = tf.sparse.to_dense(history_idx, default_value=-1)  # [B, H]
  padding = tf.fill(tf.stack([tf.shape(history)[0], 1]), tf.constant(-1, tf.int64))
  history = tf.concat([padding, history], axis=1)

  def compare_all():  # serving requests: a short history, every pair compared
    return tf.reduce_any(tf.equal(dense_items[:, :, None], history[:, None, :]), axis=2)

  def binary_search():  # eval histories run to thousands: memory grows with W + H, not W x H
    ordered = tf.sort(history, axis=1)
    at = tf.minimum(tf.searchsorted(ordered, dense_items), tf.shape(ordered)[1] - 1)
    return tf.equal(tf.gather(ordered, at, batch_dims=1), dense_items)

  pairs = tf.size(dense_items, out_type=tf.int64) * tf.cast(tf.shape(history)[1], tf.int64)
  excluded = tf.cond(pairs <= MAX_COMPARED_PAIRS, compare_all, binary_search)
  dense_scores = tf.where(excluded, tf.constant(-np.inf, tf.float32), dense_scores)
  top = tf.math.top_k(dense_scores, k=k)
  # A padding column (item -1, score -inf) is only taken by a row short of k candidates.
  return tf.maximum(tf.gather(dense_items, top.indices, batch_dims=1), 0), top.values


class IvfIndex(tf.Module):
  """A candidate index (quantization.CandidateIndex) with inverted lists for serving.

  It holds the base index's vectors once, list by list (`CandidateIndex.row_order`: the same
  int8 codes, moved), so that the search reads each probed list contiguously.
  `scores(query)` is brute force in item order (eval_ranks, recommend_exact);
  `top_k(query, history_idx, k)` is the two-stage search with the chosen nprobe.
  """

  def __init__(self, base: tf.Module, centroids: np.ndarray, list_items: np.ndarray,
               offsets: np.ndarray, nprobe: int, name: str = 'ivf_index'):
    super().__init__(name=name)
    list_items = np.asarray(list_items, np.int64)
    self.by_list = base.row_order(list_items)
    self.n_lists = int(len(centroids))
    self.nprobe = int(max(1, min(nprobe, self.n_lists)))
    self.centroids = tf.Variable(np.asarray(centroids, np.float32), trainable=False,
                                 name='ivf_centroids')
    self.list_items = tf.Variable(list_items, trainable=False, name='ivf_list_items')
    self.position_of = tf.Variable(np.argsort(list_items, kind='stable').astype(np.int64),
                                   trainable=False, name='ivf_position_of')
    self.offsets = tf.Variable(np.asarray(offsets, np.int64), trainable=False,
                               name='ivf_offsets')

  def scores(self, query) -> tf.Tensor:
    """Brute force [B, N] in item order."""
    return tf.gather(self.by_list.scores(query), self.position_of, axis=1)

  def search(self, query, history_idx, k, nprobe):
    return search(query, self.by_list.rows, self.centroids, self.list_items, self.offsets,
                  history_idx, k, nprobe)

  def top_k(self, query, history_idx, k):
    """(item ids int64 [B, k], scores [B, k]) with the exported nprobe. A batch that the
    probed lists cannot fill (a row with fewer than k candidates outside its history, as a
    large k of recommend_k asks) is answered by brute force."""
    ids, scores = self.search(query, history_idx, k, tf.constant(self.nprobe, tf.int32))
    short = tf.reduce_any(tf.math.is_inf(scores))
    return tf.cond(short, lambda: exact_top_k(self, query, history_idx, k),
                   lambda: (ids, scores))

  def as_dict(self) -> Dict:
    return {'n_lists': self.n_lists, 'nprobe': self.nprobe}


def exact_top_k(index, query, history_idx: tf.SparseTensor, k: int):
  """What serving_default returns without the index: brute force, history excluded."""
  scores = index.scores(query)
  return model_lib.masked_top_k(scores, model_lib.history_mask(history_idx, tf.shape(scores)[1]),
                                k)


def overlap(exact_ids: np.ndarray, approx_ids: np.ndarray) -> np.ndarray:
  """Per row: the share of the exact top-K ids that the approximate top-K holds."""
  exact_ids, approx_ids = np.asarray(exact_ids), np.asarray(approx_ids)
  hits = (exact_ids[:, :, None] == approx_ids[:, None, :]).any(axis=2)
  return hits.mean(axis=1)


def nprobe_ladder(n_lists: int) -> List[int]:
  """1, 2, 4, ... and n_lists (which scans everything: exact)."""
  values, p = [], 1
  while p < n_lists:
    values.append(p)
    p *= 2
  return values + [n_lists]


def scanned(offsets: np.ndarray, centroids: np.ndarray, queries: np.ndarray,
            nprobe: int) -> float:
  """Mean vectors scored per request (centroids + the probed lists' items)."""
  sizes = np.diff(offsets)
  coarse = queries @ centroids.T
  probe = np.argsort(-coarse, axis=1, kind='stable')[:, :nprobe]
  return float(len(centroids) + sizes[probe].sum(axis=1).mean())


def worth_it(n_items: int, scanned_per_request: float) -> bool:
  """The cost model of SCAN_RATIO: the index scans at most 1/SCAN_RATIO of the catalog."""
  return scanned_per_request * SCAN_RATIO <= n_items


def _p50_ms(fn, calls: int) -> float:
  fn()
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times) * 1000.0)


def choose(base, queries: np.ndarray, history_idx: tf.SparseTensor, target: float,
           n_lists: int, seed: int, latency_calls: int = 50,
           mode: int = -1) -> Dict:
  """Builds the lists, measures index recall@10 per nprobe on validation requests, chooses.

  Args:
    base: the candidate index (CandidateIndex: `scores`, `rows`, `vectors`, `row_order`).
    queries: float32 [U, dim] query vectors of the validation requests.
    history_idx: their excluded items (int64 SparseTensor [U, (H)]).
    target: least validation index recall@10 of the chosen nprobe.
    n_lists: partitions (0: default_lists(N)).
    latency_calls: batch-1 calls per row of the table (reported, never decides).
    mode: -1 serve with the index where worth_it, 1 always (the smallest nprobe reaching the
      target, else all lists), 0 never (the table is still measured).

  Returns:
    report: {used, why, n_lists, nprobe, target, rows: [{nprobe, index_recall@10, scanned,
    scanned_share, batch1_p50_ms}], exact_batch1_p50_ms, build_seconds, validation_requests,
    index: the IvfIndex to serve with, or None (not JSON: the caller pops it)}.
  """
  t0 = time.time()
  vectors = base.vectors()
  n_items = len(vectors)
  n_lists = n_lists or default_lists(n_items)
  centroids, list_items, offsets = build_lists(vectors, n_lists, seed)
  build_seconds = time.time() - t0
  index = IvfIndex(base, centroids, list_items, offsets, nprobe=1)
  k = min(RECALL_K, n_items)
  query = tf.constant(queries, tf.float32)
  # Timed as graphs (as served), one trace for every nprobe.
  search_fn = tf.function(index.search)
  exact_fn = tf.function(lambda q, h: exact_top_k(base, q, h, k))
  exact_ids = _in_chunks(lambda q, h: exact_fn(q, h)[0], query, history_idx, n_items)
  one_query, one_history = query[:1], _rows(history_idx, 0, 1)
  rows = []
  for nprobe in nprobe_ladder(index.n_lists):
    if any(r['index_recall@10'] >= target for r in rows[:-1]):
      break  # the table goes one step past the first nprobe that reaches the target
    scan = scanned(offsets, centroids, queries, nprobe)
    approx = _in_chunks(lambda q, h, p=nprobe: search_fn(q, h, tf.constant(k),
                                                         tf.constant(p))[0],
                        query, history_idx, scan)
    rows.append({
        'nprobe': nprobe,
        'index_recall@10': float(overlap(exact_ids, approx).mean()) if len(queries) else 1.0,
        'scanned': round(scan, 1), 'scanned_share': round(scan / n_items, 4),
        'batch1_p50_ms': round(_p50_ms(lambda p=nprobe: search_fn(
            one_query, one_history, tf.constant(k), tf.constant(p)), latency_calls), 4)})
  exact_ms = _p50_ms(lambda: exact_fn(one_query, one_history), latency_calls)
  reaching = [r for r in rows if r['index_recall@10'] >= target]
  pick = reaching[0] if reaching else rows[-1]
  if mode == 0:
    used, why = False, 'off (index=0)'
  elif mode == 1:
    used, why = True, 'on (index=1)'
  elif not reaching:
    used, why = False, f'no nprobe reaches validation index recall@10 {target:.2f}'
  elif worth_it(n_items, pick['scanned']):
    used, why = True, (f"nprobe {pick['nprobe']} reaches validation index recall@10 "
                       f"{pick['index_recall@10']:.4f} >= {target:.2f} scanning "
                       f"{pick['scanned_share']:.1%} of the catalog (<= 1/{SCAN_RATIO})")
  else:
    used, why = False, (f"nprobe {pick['nprobe']} reaches validation index recall@10 "
                        f"{target:.2f} but scans {pick['scanned_share']:.1%} of the catalog "
                        f"(> 1/{SCAN_RATIO}): brute force is as fast")
  index.nprobe = pick['nprobe']  # what top_k (not traced yet) exports
  return {'used': used, 'why': why, 'n_lists': index.n_lists, 'nprobe': pick['nprobe'],
          'target': target, 'rows': rows, 'exact_batch1_p50_ms': round(exact_ms, 4),
          'build_seconds': round(build_seconds, 2), 'validation_requests': int(len(queries)),
          'index': index if used else None}


# Vectors scored at once when measuring recall over many requests (bounds the memory).
CHUNK_VECTORS = 1 << 22


def _rows(sparse: tf.SparseTensor, start: int, size: int) -> tf.SparseTensor:
  """Rows [start, start + size) of a [B, (H)] SparseTensor."""
  return tf.sparse.slice(sparse, [start, 0], [size, 1 << 40])


def _in_chunks(fn, query, history_idx, per_request: float) -> np.ndarray:
  """fn(query rows, their history) over the requests, a few at a time so that at most
  CHUNK_VECTORS vectors (per_request each) are scored at once; the results concatenated."""
  size = max(1, int(CHUNK_VECTORS // max(per_request, 1.0)))
  total = int(query.shape[0])
  return np.concatenate([fn(query[i:i + size], _rows(history_idx, i, size)).numpy()
                         for i in range(0, total, size)]) if total else np.zeros([0, 0])


def validation_queries(module, examples: Sequence[bytes], raw_feature_spec,
                       batch_size: int = 256):
  """Query vectors [U, dim] and excluded items (SparseTensor [U, (H)]) of serialized examples,
  through `module`'s Transform layer and query tower (ExportModule.query_vectors)."""
  queries, histories = [], []
  for start in range(0, len(examples), batch_size):
    batch = tf.constant(list(examples[start:start + batch_size]))
    transformed = module.tft_layer(tf.io.parse_example(batch, raw_feature_spec))
    queries.append(module.query_vectors(transformed).numpy())
    histories.append(transformed[features.HISTORY_IDX])
  if not queries:
    return np.zeros([0, 1], np.float32), tf.sparse.from_dense(tf.zeros([0, 1], tf.int64))
  return np.concatenate(queries), tf.sparse.concat(0, histories, expand_nonconcat_dims=True)



def for_module(module, examples: Sequence[bytes], raw_feature_spec, params: Dict) -> Dict:
  """choose() for a compressed module's candidate index on validation examples, with the
  Compressor's parameters (index, index_lists, index_recall_target, seed)."""
  queries, history = validation_queries(module, examples, raw_feature_spec)
  return choose(module.candidate_index, queries, history, params['index_recall_target'],
                params['index_lists'], params['seed'], mode=params['index'])
