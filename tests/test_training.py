"""Validation decides training: ValidationStopping on a tiny TwoTowerModel (no pipeline run).

The e2e tests check the same on the Trainer of a real run (run_summary.json's `training`).
"""

import numpy as np
import pytest
import tensorflow as tf

from trainers import model as model_lib
from tiny_model import tiny_dataset, tiny_model


def _fit(epochs, patience, seed=3):
  tf.keras.utils.set_random_seed(seed)
  model = tiny_model(uses_text=False)
  # Random targets: validation recall goes up and down, so patience has work to do.
  train = tiny_dataset(model, batches=8, seed=1)
  validation = tiny_dataset(model, batches=2, seed=2)
  model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
  stopping = model_lib.ValidationStopping(validation, k=10, patience=patience)
  history = model.fit(train, epochs=epochs, verbose=0, callbacks=[stopping])
  return model, stopping, history.history


def test_training_stops_on_validation_recall_and_keeps_the_best_epoch():
  model, stopping, history = _fit(epochs=12, patience=1)
  curve = history['val_recall@10']
  summary = stopping.summary()
  assert summary['epochs_run'] == len(curve) == len(history['loss'])
  best = int(np.argmax(curve))  # the first best epoch
  assert summary['best_epoch'] == best + 1
  assert summary['best_val_recall@10'] == curve[best]
  # It stopped `patience` epochs after the best one, or ran every epoch.
  assert len(curve) == 12 or len(curve) - (best + 1) == 1
  # The seed makes the curve fixed: this one stops early, so the restore is exercised.
  assert len(curve) < 12 and curve[-1] < curve[best]
  # The weights left in the model are the best epoch's: they score its recall again.
  assert stopping.recall() == pytest.approx(curve[best])


def test_validation_recall_is_the_exported_ranking():
  """ValidationStopping's recall counts the ranks that eval_ranks computes (history excluded,
  ties by index), on the same model and candidates."""
  model, stopping, _ = _fit(epochs=1, patience=1)
  candidates = model.candidate_embedding(tf.range(model.n_items, dtype=tf.int64))
  hits = total = 0
  for batch in stopping.dataset:
    query = model.query_embedding(batch['user_idx'], batch['history_idx'])
    scores = tf.matmul(query, candidates, transpose_b=True).numpy()
    excluded = tf.sparse.to_dense(tf.sparse.reorder(batch['history_idx']),
                                  default_value=-1).numpy()
    for row, target in enumerate(batch['item_idx'].numpy().reshape(-1)):
      order = [i for i in np.lexsort((np.arange(model.n_items), -scores[row]))
               if i not in set(excluded[row]) or i == target]
      hits += order.index(target) < 10
      total += 1
  assert stopping.recall() == pytest.approx(hits / total)


def test_patience_is_a_hyperparameter():
  assert model_lib.hyperparameters({'patience': 3})['patience'] == 3
  with pytest.raises(ValueError, match='patience must be > 0'):
    model_lib.hyperparameters({'patience': 0})
