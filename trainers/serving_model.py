"""The serving SavedModel of a trained two-tower model: ExportModule and export().

The SavedModel has five signatures (docs/contracts.md §4):
- `serving_default`: raw `user_id` [B], `history` [B, H] ("" padded, most recent last),
  `query` [B] -> `item_ids` [B, K], `scores` [B, K]: the top-K of the catalog, the request's
  history items excluded: brute force, or the Compressor's approximate index where it chose one
  (compression.ivf).
- `recommend_exact`: serving_default's inputs and outputs, always by brute force (for checks).
- `recommend_k`: the same inputs and `k` int32 [B] (items wanted per request) -> `item_ids`
  and `scores` [B, k'] with k' the largest k of the batch, clipped to [1, min(MAX_K, catalog)]:
  what a client wanting more (or fewer) than K candidates calls (servable.requests).
- `eval_ranks`: serialized tf.Examples -> `rank` [B]: the 1-based rank of the example's target
  among the catalog with its history excluded (inf when the target is not in the catalog), for
  the TFMA metrics in trainers.metrics. Items scoring the same as the target rank as
  serving_default returns them (tf.math.top_k puts the lower index first), so ties are never
  counted in the target's favour. Also `index_recall` [B]: the share of the exact top-10
  (history excluded) that serving_default's top-10 holds (1 without an index).
- `transform_features`: serialized tf.Examples -> transformed features.
"""

import os

os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# pylint: disable=g-import-not-at-top
from typing import Optional

import tensorflow as tf
import tensorflow_transform as tft

from servable import requests
from servable import warmup
from trainers import features
from trainers import model as model_lib


def raw_request(user_id, history: tf.SparseTensor, query, uses_text: bool):
  """The Transform's raw features of serving requests ([B] strings, [B, (H)] history)."""
  column = lambda values: values[:, None]  # SchemaGen gives the scalar features shape [1].
  raw = {
      features.USER_ID: column(user_id),
      features.ITEM_ID: tf.fill(tf.shape(column(user_id)), ''),
      features.HISTORY: history,
      features.QUERY: column(query),
  }
  if uses_text:
    raw[features.ITEM_TEXT] = tf.fill(tf.shape(column(user_id)), '')
  return raw


# serving_default's inputs (docs/contracts.md §4); recommend_k adds `k`.
SERVE_INPUTS = [
    tf.TensorSpec([None], tf.string, name='user_id'),
    tf.TensorSpec([None, None], tf.string, name='history'),
    tf.TensorSpec([None], tf.string, name='query'),
]


class ExportModule(tf.Module):
  """What the SavedModel holds: transform layer, towers, text encoder and candidate index."""

  def __init__(self, model: model_lib.TwoTowerModel, tf_transform_output: tft.TFTransformOutput,
               top_k: int, text_features: Optional[model_lib.TextFeatures] = None,
               candidate_index: Optional[tf.Module] = None):
    """Creates the module.

    Args:
      model: the towers (a model_lib.TwoTowerModel, or an object with its `query_embedding`, such as
        compression.export.ServingTowers).
      tf_transform_output: the Transform output.
      top_k: items returned per request.
      text_features: the query text encoder (model_lib.TextFeatures or one with its call interface and
        a `width` attribute), None for the id-only model.
      candidate_index: a prebuilt index with `scores(query [B, dim]) -> [B, N]` (the
        Compressor's int8 index); None: the model's float item-tower outputs.
    """
    super().__init__()
    self.model = model
    self.text_features = text_features
    self.candidate_index = candidate_index
    self.tft_layer = tf_transform_output.transform_features_layer()
    self._raw_feature_spec = tf_transform_output.raw_feature_spec()
    item_ids = tf_transform_output.vocabulary_by_name(features.ITEM_VOCAB)
    self.item_ids = tf.constant([i.decode() for i in item_ids])
    self.n_items = len(item_ids)
    self.top_k = min(top_k, self.n_items)
    self.max_k = max(1, min(requests.MAX_K, self.n_items))
    if candidate_index is None:
      self.candidates = tf.Variable(
          model.candidate_embedding(tf.range(self.n_items, dtype=tf.int64)), trainable=False,
          name='candidates')
    self.text_width = (int(getattr(text_features, 'width', 0) or model.item_text.shape[1])
                       if text_features is not None else 0)

  def _query_text(self, transformed):
    """BERT features of the requests' queries and which requests have one."""
    tokens = transformed[features.QUERY_TOKENS]
    has_query = model_lib.has_tokens(tokens)
    # Recommendation traffic has no query: skip the encoder for such batches.
    text = tf.cond(tf.reduce_any(has_query), lambda: self.text_features(tokens),
                   lambda: tf.zeros([tf.shape(has_query)[0], self.text_width]))
    return {'query_text': text, 'has_query': has_query}

  def query_vectors(self, transformed):
    """The query tower's output [B, dim] for transformed requests."""
    text_inputs = self._query_text(transformed) if self.text_features is not None else {}
    return self.model.query_embedding(transformed[features.USER_IDX],
                                      transformed[features.HISTORY_IDX], **text_inputs)

  def catalog_scores(self, transformed, query=None):
    """Scores of the whole catalog [B, N] and the mask of excluded (history) items."""
    if query is None:
      query = self.query_vectors(transformed)
    if self.candidate_index is not None:
      scores = self.candidate_index.scores(query)
    else:
      scores = tf.matmul(query, self.candidates, transpose_b=True)
    return scores, model_lib.history_mask(transformed[features.HISTORY_IDX], self.n_items)

  @property
  def uses_index(self) -> bool:
    """Whether serving_default answers from an approximate index (`top_k(query, history, k)`,
    such as the Compressor's compression.ivf.IvfIndex) rather than brute force."""
    return hasattr(self.candidate_index, 'top_k')

  def top_items(self, transformed, k, exact: bool = False):
    """(item indices int64 [B, k], scores [B, k]) of transformed requests, history excluded:
    the index's search, or brute force (`exact`, or without an index)."""
    query = self.query_vectors(transformed)
    if self.uses_index and not exact:
      return self.candidate_index.top_k(query, transformed[features.HISTORY_IDX], k)
    return model_lib.masked_top_k(*self.catalog_scores(transformed, query), k)

  def _transform_request(self, raw):
    """The transformed features of serving requests (a hook: the Compressor's module adds a
    fast path for query-less batches, checked against the Transform graph)."""
    return self.tft_layer(raw)

  def _recommend(self, user_id, history, query, k, exact: bool = False):
    """The top k items (ids and scores) of each request, its history items excluded."""
    history = tf.ragged.boolean_mask(history, tf.not_equal(history, '')).to_sparse()
    raw = raw_request(user_id, history, query, self.text_features is not None)
    indices, scores = self.top_items(self._transform_request(raw), k, exact)
    return {'item_ids': tf.gather(self.item_ids, indices), 'scores': scores}

  @tf.function(input_signature=SERVE_INPUTS)
  def serve(self, user_id, history, query):
    """serving_default: raw request -> top-K item ids and scores."""
    return self._recommend(user_id, history, query, self.top_k)

  @tf.function(input_signature=SERVE_INPUTS)
  def serve_exact(self, user_id, history, query):
    """recommend_exact: serving_default by brute force over the whole catalog, whatever index
    serving_default uses (for checks: index recall is measured against it)."""
    return self._recommend(user_id, history, query, self.top_k, exact=True)

  @tf.function(input_signature=SERVE_INPUTS + [tf.TensorSpec([None], tf.int32, name='k')])
  def serve_k(self, user_id, history, query, k):
    """recommend_k: serving_default with the number of items asked per request. A batch (TF
    Serving's batching merges requests) answers its largest k for every row; a client keeps
    the first k of its own rows."""
    largest = tf.reduce_max(tf.concat([k, tf.ones([1], tf.int32)], axis=0))
    return self._recommend(user_id, history, query, tf.clip_by_value(largest, 1, self.max_k))

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='examples')])
  def eval_ranks(self, examples):
    """eval_ranks: serialized examples -> rank of each target (inf if not in the catalog)."""
    transformed = self.tft_layer(tf.io.parse_example(examples, self._raw_feature_spec))
    query = self.query_vectors(transformed)
    scores, excluded = self.catalog_scores(transformed, query)
    ranks = model_lib.target_ranks(scores, excluded, transformed[features.ITEM_IDX])
    k = min(features.INDEX_RECALL_K, self.n_items)
    if self.uses_index:
      exact = model_lib.masked_top_k(scores, excluded, k)[0]
      found = self.candidate_index.top_k(query, transformed[features.HISTORY_IDX], k)[0]
      hits = tf.reduce_any(tf.equal(exact[:, :, None], found[:, None, :]), axis=2)
      index_recall = tf.reduce_mean(tf.cast(hits, tf.float32), axis=1)
    else:
      index_recall = tf.ones_like(ranks)
    return {features.RANK_OUTPUT: ranks, features.INDEX_RECALL_OUTPUT: index_recall}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='examples')])
  def transform_features(self, examples):
    """transform_features: serialized examples -> transformed features (as in penguin)."""
    return self.tft_layer(tf.io.parse_example(examples, self._raw_feature_spec))


def export(module: tf.Module, export_dir: str) -> None:
  """Saves an ExportModule (or a compressed one) with its five signatures.

  The SavedModel carries TF Serving warm-up requests (assets.extra/tf_serving_warmup_requests)
  over its own catalog, so that a freshly loaded version answers its first request fast.
  """
  tf.saved_model.save(module, export_dir, signatures={
      'serving_default': module.serve,
      requests.K_SIGNATURE: module.serve_k,
      requests.EXACT_SIGNATURE: module.serve_exact,
      features.EVAL_SIGNATURE: module.eval_ranks,
      'transform_features': module.transform_features,
  })
  item_ids = module.item_ids.numpy()
  warmup.write_warmup_requests(export_dir, warmup.default_requests(item_ids) + (
      warmup.default_requests(item_ids, batch_sizes=(1, 8), signature_name=requests.K_SIGNATURE,
                              k=requests.DEFAULT_LARGE_K)))


