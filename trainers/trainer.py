"""TFX Trainer entry point (run_fn) of the two-tower model, and the steps the Tuner shares:
prepare the data, build the model, seed the run."""

import os

os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# pylint: disable=g-import-not-at-top
import functools
import json
from typing import Any, NamedTuple, Optional

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from tfx import v1 as tfx

from trainers import data as data_lib
from trainers import features
from trainers import model as model_lib
from trainers import serving_model
from trainers import workers


@functools.lru_cache(maxsize=None)
def _multi_worker_strategy() -> tf.distribute.Strategy:
  """One per process: collective ops are configured once, before the runtime starts."""
  return tf.distribute.MultiWorkerMirroredStrategy()


def distribution_strategy(name: str) -> tf.distribute.Strategy:
  """The tf.distribute strategy of the `distribution` hyperparameter."""
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'mirrored':
    devices = tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('CPU')
    return tf.distribute.MirroredStrategy([d.name for d in devices])
  if name == 'multi_worker_mirrored':
    return _multi_worker_strategy()
  raise ValueError(f'distribution {name!r} is not one of {model_lib.STRATEGIES}')


class TrainingData(NamedTuple):
  """What training a model_lib.TwoTowerModel reads, made once per Trainer (or Tuner) run: `prepare`."""
  tf_transform_output: tft.TFTransformOutput
  n_users: int
  n_items: int
  train: tf.data.Dataset
  evaluation: tf.data.Dataset
  validation: tf.data.Dataset  # the validation split in batches for full-catalog ranks
  frequencies: np.ndarray
  counts: np.ndarray
  examples_with_query: int
  strategy: tf.distribute.Strategy
  fine_tune: bool
  text_features: Optional['model_lib.TextFeatures']
  catalog_tokens: Any
  item_text: Optional[np.ndarray]
  item_tokens: Any
  train_query: Optional[np.ndarray]
  has_train_query: Optional[np.ndarray]
  step_encoder: Optional['model_lib.TextFeatures']


def prepare(fn_args, params: dict) -> TrainingData:
  """The datasets, vocabulary sizes, training statistics and text tables of a Trainer run."""
  tf_transform_output = tft.TFTransformOutput(fn_args.transform_graph_path)
  n_users = tf_transform_output.vocabulary_size_by_name(features.USER_VOCAB)
  n_items = tf_transform_output.vocabulary_size_by_name(features.ITEM_VOCAB)
  train = data_lib.make_dataset(fn_args, fn_args.train_files, tf_transform_output, params['batch_size'],
                   True, params['seed'])
  evaluation = data_lib.make_dataset(fn_args, fn_args.eval_files, tf_transform_output,
                        params['batch_size'], False, params['seed'])
  # The validation split again for model_lib.ValidationStopping's full-catalog ranks, in batches whose
  # [B, N] scores stay small (about 64 MB).
  validation = data_lib.make_dataset(fn_args, fn_args.eval_files, tf_transform_output,
                        max(1, min(params['batch_size'], 2**24 // max(n_items, 1))), False,
                        params['seed'])
  frequencies, counts, examples_with_query = data_lib.train_statistics(train, n_items)
  if params['fine_tune_layers'] and not fn_args.base_model:
    raise ValueError('fine_tune_layers needs a text encoder; the id-only model has none')
  strategy = distribution_strategy(params['distribution'])
  fine_tune = bool(fn_args.base_model and params['fine_tune_layers'])
  text_features, item_text, item_tokens = None, None, None
  catalog_tokens, train_query, has_train_query = None, None, None
  if fn_args.base_model:
    with strategy.scope():
      text_features = model_lib.TextFeatures(fn_args.base_model, trainable=fine_tune)
    catalog_tokens = data_lib.catalog_token_batches(fn_args, tf_transform_output, n_items, params)
    item_text, train_query, has_train_query = data_lib.text_tables(catalog_tokens, text_features,
                                                           n_items)
    train_query_tokens = None
    if fine_tune:
      item_tokens, train_query_tokens = data_lib.token_tables(catalog_tokens, n_items)
    add_queries = data_lib.with_train_queries(train_query, has_train_query, train_query_tokens)
    train, evaluation = train.map(add_queries), evaluation.map(add_queries)
    validation = validation.map(add_queries)
  # The encoder runs inside training steps only for real queries or fine-tuning: data without
  # queries trains on the precomputed tables alone.
  step_encoder = text_features if fine_tune or examples_with_query else None
  return TrainingData(tf_transform_output, n_users, n_items, train, evaluation, validation,
                      frequencies, counts, examples_with_query, strategy, fine_tune,
                      text_features, catalog_tokens, item_text, item_tokens, train_query,
                      has_train_query, step_encoder)


def build_model(data: TrainingData, params: dict) -> 'model_lib.TwoTowerModel':
  """A compiled model_lib.TwoTowerModel of `params` over `data` (variables made under its strategy)."""
  with data.strategy.scope():
    # Variables (and the optimizer's) are created under the strategy: mirrored per device.
    model = model_lib.TwoTowerModel(data.n_users, data.n_items, data.frequencies, params,
                          item_text=data.item_text, text_features=data.step_encoder,
                          item_tokens=data.item_tokens)
    model.compile(optimizer=tf.keras.optimizers.Adam(params['learning_rate']))
  return model


def tuned_values(hyperparameters) -> Optional[dict]:
  """The Tuner's best values from the Trainer's `fn_args.hyperparameters` (None: not tuned)."""
  if not hyperparameters:
    return None
  import keras_tuner  # pylint: disable=import-outside-toplevel
  return dict(keras_tuner.HyperParameters.from_config(hyperparameters).values)


def seed_training(params: dict, fine_tuned_encoder: bool) -> None:
  """Same inputs, same model: seeded and deterministic ops (docs/evaluation.md, "Reproducibility"). Not
  when the encoder is fine-tuned: its SavedModel's dropout ops carry no seed, which op
  determinism refuses."""
  if not fine_tuned_encoder:
    tf.config.experimental.enable_op_determinism()
  tf.keras.utils.set_random_seed(params['seed'])


def run_fn(fn_args: tfx.components.FnArgs):
  """TFX Trainer entry point.

  With a text encoder as `base_model` (components.text_encoder.TextEncoder's Model artifact),
  the model reads item and query text; without one it is the id-only two-tower. With the
  Tuner's best hyperparameters (`pipeline.py run --tune N`), those replace DEFAULTS.
  """
  tuned = tuned_values(fn_args.hyperparameters)
  params = model_lib.hyperparameters(fn_args.custom_config, tuned)
  if params['workers'] > 1 and 'TF_CONFIG' not in os.environ:
    # No orchestrator wrote the workers' TF_CONFIG: this Trainer starts them on localhost.
    workers.launch(fn_args, params['workers'])
    return
  seed_training(params, bool(fn_args.base_model and params['fine_tune_layers']))
  data = prepare(fn_args, params)
  model = build_model(data, params)
  steps = fn_args.train_steps if fn_args.train_steps else None
  stopping = model_lib.ValidationStopping(data.validation, model_lib.VALIDATION_K, params['patience'])
  history = model.fit(data.train.prefetch(2), epochs=params['epochs'], steps_per_epoch=steps,
                      validation_data=data.evaluation, verbose=2,
                      callbacks=[stopping,
                                 tf.keras.callbacks.TensorBoard(fn_args.model_run_dir)])
  id_shrinkage = (model_lib.choose_id_shrinkage(model, stopping, data.counts) if model.uses_text
                  else None)
  text_features, train_query, has_train_query = (data.text_features, data.train_query,
                                                 data.has_train_query)
  if data.fine_tune:
    # The catalog again through the fine-tuned encoder: the tables that serving and the
    # Compressor read; the model reads them instead of encoding item text from now on.
    item_text, train_query, has_train_query = data_lib.text_tables(data.catalog_tokens, text_features,
                                                           data.n_items)
    model.item_text.assign(item_text)
    model.set_text_features(text_features)
  serving_model.export(serving_model.ExportModule(model, data.tf_transform_output, params['top_k'], text_features),
         fn_args.serving_model_dir)
  state = {'params': params, 'n_users': data.n_users, 'n_items': data.n_items,
           'text_encoder': fn_args.base_model or None,
           'fine_tuned_layers': params['fine_tune_layers'] if data.fine_tune else 0,
           # The Tuner's best values, applied under what --trainer set (None: not tuned).
           'tuned': tuned,
           # Training examples whose event came with a real query (trained as searches).
           'train_examples_with_query': data.examples_with_query,
           'replicas': data.strategy.num_replicas_in_sync,
           'validation': stopping.summary(),
           'id_shrinkage': id_shrinkage,
           # Validation Recall@10 of the model as exported (the best epoch, shrinkage applied).
           'validation_recall@10': (id_shrinkage[f'validation_recall@{model_lib.VALIDATION_K}'][
               f"{id_shrinkage['chosen']:g}"] if id_shrinkage else stopping.best),
           'history': {k: [float(x) for x in v] for k, v in history.history.items()}}
  state_dir = os.path.join(os.path.dirname(fn_args.serving_model_dir), model_lib.TRAINER_STATE_DIR)
  tf.io.gfile.makedirs(state_dir)
  model_lib.checkpoint(model, text_features if data.fine_tune else None).write(
      os.path.join(state_dir, 'weights'))
  model_lib.write_npz(os.path.join(state_dir, 'frequencies.npz'), frequencies=data.frequencies)
  if text_features is not None:
    model_lib.write_npz(os.path.join(state_dir, 'train_queries.npz'), train_query=train_query,
               has_train_query=has_train_query)
  for directory in (state_dir, fn_args.model_run_dir):
    with tf.io.gfile.GFile(os.path.join(directory, features.TRAINING_STATE_FILE), 'w') as f:
      json.dump(state, f, indent=2)


