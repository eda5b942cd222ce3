"""Trainer module: two-tower retrieval model (TensorFlow Recommenders), exported for serving.

Query tower: user id embedding + recency-weighted pooling of the last `max_history` history
items + the last item, through an MLP. Item tower: the item id embedding, shared with the
history. Trained with in-batch softmax (tfrs.tasks.Retrieval) with logQ correction for the
in-batch sampling of popular items.

The SavedModel has three signatures (GUIDE §5, §6.5):
- `serving_default`: raw `user_id` [B], `history` [B, H] ("" padded, most recent last),
  `query` [B] -> `item_ids` [B, K], `scores` [B, K]: brute-force top-K over the full catalog,
  the request's history items excluded.
- `eval_ranks`: serialized tf.Examples -> `rank` [B]: the 1-based rank of the example's target
  among the catalog with its history excluded (inf when the target is not in the catalog), for
  the TFMA metrics in trainers.metrics.
- `transform_features`: serialized tf.Examples -> transformed features.

Text features (BERT) plug in at `TwoTowerModel.query_embedding` / `candidate_embedding`:
`query` already reaches serving_default and the examples; it is unused until the text encoder
is wired in.
"""

import json
import os

os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tensorflow_transform as tft
from tfx import v1 as tfx
from tfx_bsl.public import tfxio

from trainers import features

DEFAULTS = {
    'embedding_dim': 64,
    'max_history': 20,
    'epochs': 8,
    'batch_size': 1024,
    'learning_rate': 0.003,
    'temperature': 0.05,
    'user_dropout': 0.2,
    'top_k': 10,
    'seed': 7,
}


def hyperparameters(custom_config) -> dict:
  """Merges the Trainer's custom_config (JSON scalars) over DEFAULTS."""
  params = dict(DEFAULTS)
  unknown = set(custom_config or {}) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown trainer custom_config keys: {sorted(unknown)}; '
                     f'expected some of {sorted(DEFAULTS)}')
  params.update(custom_config or {})
  return params


class TwoTowerModel(tfrs.Model):
  """Query tower over user id + history, item tower over item id."""

  def __init__(self, n_users: int, n_items: int, sampling_probability: np.ndarray, params):
    super().__init__()
    dim = params['embedding_dim']
    self.n_users = n_users
    self.n_items = n_items
    self.max_history = params['max_history']
    self.user_dropout = params['user_dropout']
    # +1: the OOV bucket of each vocabulary.
    self.user_embedding = tf.keras.layers.Embedding(n_users + 1, dim, name='user_embedding')
    self.item_embedding = tf.keras.layers.Embedding(n_items + 1, dim, name='item_embedding')
    self.position_logits = self.add_weight(
        name='position_logits', shape=[self.max_history], initializer='zeros')
    self.query_mlp = tf.keras.Sequential([
        tf.keras.layers.Dense(2 * dim, activation='relu'),
        tf.keras.layers.Dense(dim),
    ], name='query_mlp')
    self.temperature = params['temperature']
    self.sampling_probability = tf.constant(
        np.append(sampling_probability, sampling_probability.min()), tf.float32)
    self.task = tfrs.tasks.Retrieval(temperature=self.temperature,
                                     remove_accidental_hits=True)

  def query_embedding(self, user_idx, history_idx):
    """Query tower.

    Args:
      user_idx: int64 [B] user vocabulary indices.
      history_idx: int64 SparseTensor [B, L] history item indices, most recent last.

    Returns:
      float32 [B, dim], L2-normalized.
    """
    user_idx = tf.reshape(user_idx, [-1])
    history = tf.RaggedTensor.from_sparse(history_idx)[:, -self.max_history:]
    lengths = history.row_lengths()
    dense = history.to_tensor(default_value=0, shape=[None, self.max_history])
    positions = tf.range(self.max_history, dtype=tf.int64)
    # Position counted from the most recent item, so that weights mean recency.
    from_end = lengths[:, None] - 1 - positions[None, :]
    valid = from_end >= 0
    logits = tf.gather(self.position_logits, tf.maximum(from_end, 0))
    weights = tf.nn.softmax(tf.where(valid, logits, -1e9), axis=1)
    weights = weights * tf.cast(valid, tf.float32)
    embedded = self.item_embedding(dense)
    pooled = tf.reduce_sum(weights[:, :, None] * embedded, axis=1)
    last = tf.gather(embedded, tf.maximum(lengths - 1, 0), batch_dims=1)
    last = last * tf.cast(lengths > 0, tf.float32)[:, None]
    query = self.query_mlp(tf.concat([self.user_embedding(user_idx), pooled, last], axis=1))
    return tf.math.l2_normalize(query, axis=1)

  def candidate_embedding(self, item_idx):
    """Item tower: float32 [B, dim], L2-normalized."""
    return tf.math.l2_normalize(self.item_embedding(tf.reshape(item_idx, [-1])), axis=1)

  def compute_loss(self, inputs, training=False):
    user_idx = tf.reshape(inputs[features.USER_IDX], [-1])
    if training and self.user_dropout > 0:
      # Unknown users are normal traffic: train the OOV user embedding on a share of examples.
      drop = tf.random.uniform(tf.shape(user_idx)) < self.user_dropout
      user_idx = tf.where(drop, tf.cast(self.n_users, user_idx.dtype), user_idx)
    item_idx = tf.reshape(inputs[features.ITEM_IDX], [-1])
    return self.task(
        self.query_embedding(user_idx, inputs[features.HISTORY_IDX]),
        self.candidate_embedding(item_idx),
        candidate_sampling_probability=tf.gather(self.sampling_probability, item_idx),
        candidate_ids=item_idx,
        compute_metrics=False)


class ExportModule(tf.Module):
  """What the SavedModel holds: transform layer, towers and the candidate index."""

  def __init__(self, model: TwoTowerModel, tf_transform_output: tft.TFTransformOutput,
               top_k: int):
    super().__init__()
    self.model = model
    self.tft_layer = tf_transform_output.transform_features_layer()
    self._raw_feature_spec = tf_transform_output.raw_feature_spec()
    item_ids = tf_transform_output.vocabulary_by_name(features.ITEM_VOCAB)
    self.item_ids = tf.constant([i.decode() for i in item_ids])
    self.n_items = len(item_ids)
    self.top_k = min(top_k, self.n_items)
    self.candidates = tf.Variable(
        model.candidate_embedding(tf.range(self.n_items, dtype=tf.int64)), trainable=False,
        name='candidates')

  def _scores(self, transformed):
    """Scores of the whole catalog [B, N] and the mask of excluded (history) items."""
    query = self.model.query_embedding(transformed[features.USER_IDX],
                                       transformed[features.HISTORY_IDX])
    scores = tf.matmul(query, self.candidates, transpose_b=True)
    # Indicator over N + 1 ids (the last one is the OOV bucket), then drop the OOV column.
    excluded = tf.sparse.to_indicator(transformed[features.HISTORY_IDX],
                                      self.n_items + 1)[:, :self.n_items]
    return scores, excluded

  @tf.function(input_signature=[
      tf.TensorSpec([None], tf.string, name='user_id'),
      tf.TensorSpec([None, None], tf.string, name='history'),
      tf.TensorSpec([None], tf.string, name='query'),
  ])
  def serve(self, user_id, history, query):
    """serving_default: raw request -> top-K item ids and scores."""
    history = tf.ragged.boolean_mask(history, tf.not_equal(history, ''))
    # The schema gives the scalar features shape [1] (SchemaGen infer_feature_shape).
    raw = {
        features.USER_ID: user_id[:, None],
        features.ITEM_ID: tf.fill(tf.shape(user_id[:, None]), ''),
        features.HISTORY: history.to_sparse(),
        features.QUERY: query[:, None],
    }
    scores, excluded = self._scores(self.tft_layer(raw))
    scores = tf.where(excluded, tf.constant(-np.inf, tf.float32), scores)
    top = tf.math.top_k(scores, k=self.top_k)
    return {'item_ids': tf.gather(self.item_ids, top.indices), 'scores': top.values}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='examples')])
  def eval_ranks(self, examples):
    """eval_ranks: serialized examples -> rank of each target (inf if not in the catalog)."""
    transformed = self.tft_layer(tf.io.parse_example(examples, self._raw_feature_spec))
    scores, excluded = self._scores(transformed)
    target = tf.reshape(transformed[features.ITEM_IDX], [-1])
    in_catalog = target < self.n_items
    target_score = tf.gather(scores, tf.minimum(target, self.n_items - 1), batch_dims=1)
    better = tf.logical_and(scores > target_score[:, None], tf.logical_not(excluded))
    rank = 1.0 + tf.reduce_sum(tf.cast(better, tf.float32), axis=1)
    return {features.RANK_OUTPUT: tf.where(in_catalog, rank, np.inf)}

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='examples')])
  def transform_features(self, examples):
    """transform_features: serialized examples -> transformed features (as in penguin)."""
    return self.tft_layer(tf.io.parse_example(examples, self._raw_feature_spec))


def _dataset(fn_args, pattern, tf_transform_output, batch_size, shuffle, seed):
  return fn_args.data_accessor.tf_dataset_factory(
      pattern,
      tfxio.TensorFlowDatasetOptions(batch_size=batch_size, shuffle=shuffle, num_epochs=1,
                                     shuffle_seed=seed),
      tf_transform_output.transformed_metadata.schema)


def _item_frequencies(dataset, n_items: int) -> np.ndarray:
  counts = np.zeros(n_items + 1, np.float64)
  for batch in dataset:
    np.add.at(counts, batch[features.ITEM_IDX].numpy().reshape(-1), 1)
  counts = counts[:n_items] + 1.0
  return counts / counts.sum()


def run_fn(fn_args: tfx.components.FnArgs):
  """TFX Trainer entry point."""
  params = hyperparameters(fn_args.custom_config)
  tf.keras.utils.set_random_seed(params['seed'])
  tf_transform_output = tft.TFTransformOutput(fn_args.transform_output)
  n_users = tf_transform_output.vocabulary_size_by_name(features.USER_VOCAB)
  n_items = tf_transform_output.vocabulary_size_by_name(features.ITEM_VOCAB)
  train = _dataset(fn_args, fn_args.train_files, tf_transform_output, params['batch_size'],
                   True, params['seed'])
  evaluation = _dataset(fn_args, fn_args.eval_files, tf_transform_output,
                        params['batch_size'], False, params['seed'])
  model = TwoTowerModel(n_users, n_items, _item_frequencies(train, n_items), params)
  model.compile(optimizer=tf.keras.optimizers.Adam(params['learning_rate']))
  steps = fn_args.train_steps if fn_args.train_steps else None
  history = model.fit(train.prefetch(2), epochs=params['epochs'], steps_per_epoch=steps,
                      validation_data=evaluation, verbose=2,
                      callbacks=[tf.keras.callbacks.TensorBoard(fn_args.model_run_dir)])
  module = ExportModule(model, tf_transform_output, params['top_k'])
  tf.saved_model.save(module, fn_args.serving_model_dir, signatures={
      'serving_default': module.serve,
      features.EVAL_SIGNATURE: module.eval_ranks,
      'transform_features': module.transform_features,
  })
  with tf.io.gfile.GFile(os.path.join(fn_args.model_run_dir, 'training.json'), 'w') as f:
    json.dump({'params': params, 'n_users': n_users, 'n_items': n_items,
               'history': {k: [float(x) for x in v] for k, v in history.history.items()}}, f)
