"""Validation decides training: ValidationStopping on a tiny TwoTowerModel (no pipeline run).

The e2e tests check the same on the Trainer of a real run (run_summary.json's `training`).
"""

import numpy as np
import pytest
import tensorflow as tf

from trainers import features
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


def test_logq_correction_is_a_hyperparameter_that_changes_the_loss():
  with pytest.raises(ValueError, match='logq_correction 2 is not one of'):
    model_lib.hyperparameters({'logq_correction': 2})
  frequencies = np.random.default_rng(0).dirichlet(np.ones(60))  # popular and rare items
  losses = []
  for logq in (1, 0):
    tf.keras.utils.set_random_seed(3)
    params = dict(model_lib.DEFAULTS, embedding_dim=8, max_history=4, logq_correction=logq)
    model = model_lib.TwoTowerModel(40, 60, frequencies, params)
    batch = next(iter(tiny_dataset(model)))
    losses.append(float(model.compute_loss(batch, training=False)))
  assert losses[0] != pytest.approx(losses[1])


def test_id_weights_shrink_rare_items_towards_their_text():
  trained = np.array([1, 1, 1, 0], np.float32)  # the last: the OOV bucket
  counts = np.array([0, 1, 3])
  np.testing.assert_allclose(model_lib.id_weights(trained, counts, 0.0), [1, 1, 1, 0])
  np.testing.assert_allclose(model_lib.id_weights(trained, counts, 1.0), [0, 0.5, 0.75, 0])


def test_validation_chooses_the_id_shrinkage_and_the_model_keeps_it():
  tf.keras.utils.set_random_seed(5)
  model = tiny_model(uses_text=True)
  trained = np.append(np.ones(model.n_items, np.float32), 0.0)
  model.has_id.assign(trained)
  model.compile(optimizer=tf.keras.optimizers.Adam(0.05))
  stopping = model_lib.ValidationStopping(tiny_dataset(model, batches=2, seed=2), k=10,
                                          patience=1)
  model.fit(tiny_dataset(model, batches=8, seed=1), epochs=2, verbose=0, callbacks=[stopping])
  counts = np.random.default_rng(4).integers(0, 6, size=model.n_items)
  chosen = model_lib.choose_id_shrinkage(model, stopping, counts)
  scores = {float(m): r for m, r in chosen['validation_recall@10'].items()}
  assert set(scores) == set(model_lib.ID_SHRINKAGE_GRID)
  assert scores[chosen['chosen']] == max(scores.values())
  # Among equals, the smallest shrinkage (m=0: the model as trained) is kept.
  assert chosen['chosen'] == min(m for m, r in scores.items() if r == max(scores.values()))
  np.testing.assert_allclose(model.has_id.numpy(),
                             model_lib.id_weights(trained, counts, chosen['chosen']))
  assert stopping.recall() == pytest.approx(scores[chosen['chosen']])


def test_the_attention_history_encoder_trains_and_serves_as_trained(tmp_path):
  """history_encoder='attention' (SASRec-style): it trains, the serving towers compute the
  trained tower (float32 exactly, int8 closely), an empty history reads as zeros, and the
  tower saves and loads as a plain SavedModel function."""
  from compression import export  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match='history_encoder'):
    model_lib.hyperparameters({'history_encoder': 'lstm'})
  tf.keras.utils.set_random_seed(3)
  params = dict(model_lib.DEFAULTS, embedding_dim=8, max_history=4,
                history_encoder='attention', attention_blocks=2)
  model = model_lib.TwoTowerModel(40, 60, np.full(60, 1 / 60), params)
  model.compile(optimizer=tf.keras.optimizers.Adam(0.01))
  train = tiny_dataset(model, batches=8, seed=1)
  losses = model.fit(train, epochs=3, verbose=0).history['loss']
  assert losses[-1] < losses[0]
  assert len(model.history_encoder.trainable_variables) > 0
  # Only the chosen encoder's weights exist (no unused pooling logits to train or export).
  assert not [v for v in model.variables if 'position_logits' in v.name]
  kept = export.kept_float(True, False, False, model.history_encoder)[0]
  assert kept['name'] == 'serving_towers/history_attention', kept
  batch = next(iter(train))
  users, history = batch[features.USER_IDX], batch[features.HISTORY_IDX]
  trained = model.query_embedding(users, history).numpy()
  np.testing.assert_array_equal(
      export.ServingTowers(model, quantize=False).query_embedding(users, history), trained)
  towers = export.ServingTowers(model, quantize=True)
  np.testing.assert_allclose(towers.query_embedding(users, history), trained, atol=0.05)
  no_history = tf.SparseTensor(tf.zeros([0, 2], tf.int64), tf.zeros([0], tf.int64), [2, 3])
  empty = model.history_encoder(
      tf.ones([2, 4, 8]), tf.fill([2, 4], tf.constant(-1, tf.int64)), tf.zeros([2, 4], tf.bool),
      tf.zeros([2], tf.int64))
  np.testing.assert_array_equal(empty, np.zeros([2, 8]))
  assert np.isfinite(model.query_embedding(tf.constant([1, 2], tf.int64), no_history)).all()
  towers.tower = tf.function(towers.query_embedding, input_signature=[
      tf.TensorSpec([None], tf.int64), tf.SparseTensorSpec([None, None], tf.int64)])
  tf.saved_model.save(towers, str(tmp_path / 'towers'))
  loaded = tf.saved_model.load(str(tmp_path / 'towers'))
  np.testing.assert_allclose(loaded.tower(tf.reshape(users, [-1]), history),
                             towers.query_embedding(users, history), atol=1e-6)
