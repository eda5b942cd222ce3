"""A tiny TwoTowerModel and a random dataset of its transformed features, for fast tests of
the training and compression code (no pipeline run)."""

import numpy as np
import tensorflow as tf

from trainers import features
from trainers import model as model_lib


def tiny_model(uses_text: bool):
  params = dict(model_lib.DEFAULTS, embedding_dim=8, max_history=4)
  n_users, n_items = 40, 60
  frequencies = np.full(n_items, 1.0 / n_items)
  item_text = (np.random.default_rng(0).normal(size=(n_items + 1, 12)).astype(np.float32)
               if uses_text else None)
  return model_lib.TwoTowerModel(n_users, n_items, frequencies, params, item_text=item_text)


def tiny_dataset(model, batch_size=32, batches=4, seed=0):
  rng = np.random.default_rng(seed)
  n = batch_size * batches
  history = rng.integers(0, model.n_items, size=(n, 3))
  data = {
      features.USER_IDX: rng.integers(0, model.n_users, size=(n, 1)),
      features.ITEM_IDX: rng.integers(0, model.n_items, size=(n, 1)),
      features.HISTORY_IDX: tf.sparse.from_dense(tf.constant(history, tf.int64) + 1),
  }
  if model.uses_text:
    data[model_lib.TRAIN_QUERY_TEXT] = rng.normal(size=(n, 12)).astype(np.float32)
    data[model_lib.HAS_TRAIN_QUERY] = np.ones(n, bool)
  dataset = tf.data.Dataset.from_tensor_slices(data).batch(batch_size)

  def shift(batch):  # history ids back to 0-based, kept sparse
    h = batch[features.HISTORY_IDX]
    batch[features.HISTORY_IDX] = tf.SparseTensor(h.indices, h.values - 1, h.dense_shape)
    return batch
  return dataset.map(shift)
