"""Trainer module: two-tower retrieval model (TensorFlow Recommenders), exported for serving.

Query tower: user id embedding + the last `max_history` history items, recency-weighted
pooling of them or SASRec-style causal self-attention over them (`history_encoder`,
trainers/history.py) + the last item + (with text) the BERT features of the query, through an
MLP, plus the query's text projection. Item tower: the item id embedding (shared with the
history) + (with text) the projection of the item text's BERT features. The text projection is
shared by both towers, so that a query lands near items whose text says the same. Trained with in-batch
softmax (tfrs.tasks.Retrieval) with logQ correction for the in-batch sampling of popular items.

Text (when the Trainer gets a text encoder as `base_model`, components.text_encoder): by
default the encoder is frozen; it encodes each catalog item's text once, before training (the
item-text table), and, for training, one query per catalog item drawn from its title as the
search protocol draws test queries (with another seed). A share of training examples becomes
search requests (that query, no user, no history) and a share personalized searches (query,
user and history). A training example whose event came with a real query (the interactions'
`query` column) is always a search with that query, personalized except for the search share;
the encoder encodes such queries inside the training step, and only batches that have one pay
for it. Items without training interactions get no id embedding, only their text: cold start.
At serving time the SavedModel runs the encoder on the request's query, and skips it when no
request in the batch has one.

Fine-tuning (`fine_tune_layers` N > 0, meant for GPU hosts): the top N transformer layers of
the encoder train with the towers (their own Adam, `encoder_learning_rate`); the item text of
each batch's candidates and every training query are then encoded inside the training step from
their WordPiece ids, and after training the item-text and training-query tables are encoded
again with the fine-tuned encoder. The serving graph carries the fine-tuned encoder, and
trainer_state's checkpoint holds it, so the Compressor's teacher is the fine-tuned one too.

The serving SavedModel and its signatures: trainers/serving_model.py. The Trainer's entry point
(run_fn) and the datasets: trainers/trainer.py, trainers/data.py.
"""

import io
import json
import os
import re
from typing import Optional

os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from trainers import features
from trainers import history as history_lib
from trainers import text_encoder

DEFAULTS = {
    'embedding_dim': 64,
    'max_history': 20,
    # How the query tower reads the ordered history: 'pool' (learned recency weights) or
    # 'attention' (SASRec-style causal self-attention over item + position embeddings,
    # `attention_blocks` blocks of `attention_heads` heads). `--tune` chooses on validation.
    'history_encoder': 'pool',
    'attention_blocks': 1,
    'attention_heads': 2,
    # At most this many epochs; validation Recall@10 after each decides (ValidationStopping):
    # training stops after `patience` epochs without a better one, with the best epoch's
    # weights. The maximum is a bound, not a setting: data that keeps improving gets it.
    'epochs': 20,
    'patience': 2,
    'batch_size': 1024,
    'learning_rate': 0.003,
    'temperature': 0.05,
    # Subtract log(training frequency) from in-batch negatives' logits (logQ correction of
    # the sampling of popular items as negatives); 0: plain in-batch softmax.
    'logq_correction': 1,
    'user_dropout': 0.2,
    'top_k': 10,
    'seed': 7,
    # Text path (used when the Trainer has a text encoder).
    'search_share': 0.2,               # training examples turned into search requests
    'personalized_search_share': 0.1,  # ... into query + user + history requests
    'item_id_dropout': 0.1,            # candidates seen through their text only
    'text_batch_size': 128,            # encoder batch when encoding the catalog
    # Top transformer layers of the encoder trained with the towers (GPU hosts); 0: frozen.
    'fine_tune_layers': 0,
    'encoder_learning_rate': 5e-5,     # their learning rate
    # tf.distribute strategy (GPU hosts): 'default' (one device), 'mirrored' (every GPU, else
    # every logical CPU), 'multi_worker_mirrored' (TF_CONFIG names the workers; without one,
    # `workers` processes on this host: trainers/workers.py).
    'distribution': 'default',
    'workers': 1,
}
STRATEGIES = ('default', 'mirrored', 'multi_worker_mirrored')
# Keys the Trainer adds to training batches of text models: the target's training query (its
# features; when the encoder is fine-tuned, its WordPiece ids).
TRAIN_QUERY_TEXT = 'train_query_text'
TRAIN_QUERY_TOKENS = 'train_query_tokens'
HAS_TRAIN_QUERY = 'has_train_query'
# Beside Format-Serving in the Model artifact: what rebuilding the Keras model takes (the
# Compressor fine-tunes it): training.json (hyperparameters, vocabulary sizes, per-epoch
# history), the weights as a tf.train.Checkpoint, and the training-query tables of a text model.
TRAINER_STATE_DIR = features.TRAINER_STATE_DIR
# The cut-off of the validation recall that decides training (the gate's metric).
VALIDATION_K = 10


def hyperparameters(custom_config, tuned: Optional[dict] = None) -> dict:
  """DEFAULTS, overridden by `tuned` (the Tuner's best values), overridden by the Trainer's
  custom_config (JSON scalars: what the user set explicitly is never searched over)."""
  params = dict(DEFAULTS)
  # 'code': the pipeline's code fingerprint, there for the cache key only.
  custom_config = {k: v for k, v in (custom_config or {}).items() if k != 'code'}
  unknown = (set(custom_config) | set(tuned or {})) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown trainer custom_config keys: {sorted(unknown)}; '
                     f'expected some of {sorted(DEFAULTS)}')
  params.update(tuned or {})
  params.update(custom_config or {})
  for name, allowed in (('distribution', STRATEGIES), ('history_encoder', history_lib.ENCODERS),
                        ('logq_correction', (1, 0))):
    if params[name] not in allowed:
      raise ValueError(f'{name} {params[name]!r} is not one of {allowed}')
  if params['fine_tune_layers'] < 0:
    raise ValueError(f'fine_tune_layers must be >= 0 (0: frozen encoder), not '
                     f'{params["fine_tune_layers"]}')
  for name in ('search_share', 'personalized_search_share', 'item_id_dropout', 'user_dropout'):
    if not 0.0 <= params[name] <= 1.0:
      raise ValueError(f'{name} must be in [0, 1], not {params[name]}')
  for name in ('embedding_dim', 'max_history', 'attention_blocks', 'attention_heads', 'epochs',
               'patience', 'batch_size', 'top_k', 'text_batch_size', 'learning_rate',
               'encoder_learning_rate', 'temperature', 'workers'):
    if params[name] <= 0:
      raise ValueError(f'{name} must be > 0, not {params[name]}')
  if params['workers'] > 1 and params['distribution'] != 'multi_worker_mirrored':
    raise ValueError(f"workers {params['workers']} needs distribution multi_worker_mirrored")
  return params


class TwoTowerModel(tfrs.Model):
  """Query tower over user id + history (+ query text), item tower over item id (+ text)."""

  def __init__(self, n_users: int, n_items: int, sampling_probability: np.ndarray, params,
               item_text: Optional[np.ndarray] = None, text_features=None,
               item_tokens: Optional[tf.RaggedTensor] = None):
    """Creates the model.

    Args:
      n_users: user vocabulary size (the OOV user is index n_users).
      n_items: item vocabulary size (the OOV item is index n_items).
      sampling_probability: [n_items] training frequency of each item (logQ correction).
      params: hyperparameters (DEFAULTS).
      item_text: [n_items + 1, H] BERT features of each item's text (zeros for none), or None
        for the id-only model.
      text_features: the encoder of training steps (TextFeatures, or one with its call
        interface): it encodes the real queries of training examples; text models only.
        Without one, real queries are left out and only the title-drawn queries train.
      item_tokens: int64 [n_items + 1, (T)] WordPiece ids of each item's text: given, the top
        params['fine_tune_layers'] layers of text_features' encoder are fine-tuned.
    """
    super().__init__()
    dim = params['embedding_dim']
    self.n_users = n_users
    self.n_items = n_items
    self.max_history = params['max_history']
    self.user_dropout = params['user_dropout']
    # +1: the OOV bucket of each vocabulary.
    self.user_embedding = tf.keras.layers.Embedding(n_users + 1, dim, name='user_embedding')
    self.item_embedding = tf.keras.layers.Embedding(n_items + 1, dim, name='item_embedding')
    self.history_encoder = history_lib.make(params)
    self.query_mlp = tf.keras.Sequential([
        tf.keras.layers.Dense(2 * dim, activation='relu'),
        tf.keras.layers.Dense(dim),
    ], name='query_mlp')
    self.temperature = params['temperature']
    self.logq_correction = bool(params['logq_correction'])
    self.sampling_probability = tf.constant(
        np.append(sampling_probability, sampling_probability.min()), tf.float32)
    self.task = tfrs.tasks.Retrieval(temperature=self.temperature,
                                     remove_accidental_hits=True)
    self.uses_text = item_text is not None
    self.search_share = params['search_share']
    self.personalized_search_share = params['personalized_search_share']
    if self.uses_text:
      self.item_id_dropout = params['item_id_dropout']
      self.text_projection = tf.keras.layers.Dense(dim, use_bias=False, name='text_projection')
      self.item_text = tf.Variable(item_text, trainable=False, dtype=tf.float32,
                                   name='item_text')
      # Items never trained on keep a random id embedding: leave it out, their text remains.
      trained = np.append(sampling_probability > sampling_probability.min(), False)
      self.has_id = tf.Variable(trained.astype(np.float32), trainable=False, name='has_id')
    self._text = None
    if text_features is not None:
      self.set_text_features(text_features, item_tokens, params)

  def set_text_features(self, text_features, item_tokens=None, params=None) -> None:
    """Sets the encoder of training steps (the Compressor swaps in its distilled student)."""
    layers = params['fine_tune_layers'] if item_tokens is not None else 0
    # A plain object: Keras does not track the encoder as part of the model (the Trainer
    # checkpoints it beside the model when it fine-tunes it).
    self._text = _TrainingText(text_features, item_tokens, layers,
                               params['encoder_learning_rate'] if layers else 0.0)

  @property
  def encodes_in_training(self) -> bool:
    """Whether training steps run an encoder (real queries, fine-tuning)."""
    return self._text is not None

  @property
  def fine_tunes_encoder(self) -> bool:
    return self._text is not None and bool(self._text.variables)

  def query_embedding(self, user_idx, history_idx, query_text=None, has_query=None):
    """Query tower.

    Args:
      user_idx: int64 [B] user vocabulary indices.
      history_idx: int64 SparseTensor [B, L] history item indices, most recent last.
      query_text: float32 [B, H] BERT features of the query (text models only).
      has_query: bool [B], whether the request has a query (text models only).

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
    embedded = self.item_embedding(dense)
    pooled = self.history_encoder(embedded, from_end, valid, lengths)
    last = tf.gather(embedded, tf.maximum(lengths - 1, 0), batch_dims=1)
    last = last * tf.cast(lengths > 0, tf.float32)[:, None]
    parts = [self.user_embedding(user_idx), pooled, last]
    if self.uses_text:
      text = self.text_projection(query_text) * tf.cast(has_query, tf.float32)[:, None]
      query = self.query_mlp(tf.concat(parts + [text], axis=1)) + text
    else:
      query = self.query_mlp(tf.concat(parts, axis=1))
    return tf.math.l2_normalize(query, axis=1)

  def candidate_embedding(self, item_idx, training=False):
    """Item tower: float32 [B, dim], L2-normalized."""
    item_idx = tf.reshape(item_idx, [-1])
    embedded = self.item_embedding(item_idx)
    if self.uses_text:
      keep = tf.gather(self.has_id, item_idx)
      if training and self.item_id_dropout > 0:
        keep *= tf.cast(tf.random.uniform(tf.shape(keep)) >= self.item_id_dropout, tf.float32)
      if self.fine_tunes_encoder:
        # Each distinct candidate of the batch once; no text, zero features (as in the table).
        unique, position = tf.unique(item_idx)
        tokens = tf.gather(self._text.item_tokens, unique)
        vectors = self._encode(tokens, training) * tf.cast(tokens.row_lengths() > 0,
                                                           tf.float32)[:, None]
        text = tf.gather(vectors, position)
      else:
        text = tf.gather(self.item_text, item_idx)
      embedded = embedded * keep[:, None] + self.text_projection(text)
    return tf.math.l2_normalize(embedded, axis=1)

  def _encode(self, tokens: tf.RaggedTensor, training: bool) -> tf.Tensor:
    """BERT features [B, H] of WordPiece ids [B, (T)] with the encoder of training steps."""
    if self.fine_tunes_encoder:
      return self._text.text_features(tokens.to_sparse(), training=training)
    return self._text.text_features(tokens.to_sparse())

  def _training_query_text(self, inputs, has_real_query, training):
    """Query features [B, H] of a training batch: the real query where the example has one,
    else the target's training query drawn from its title."""
    if self._text is None:
      return inputs[TRAIN_QUERY_TEXT]
    real = tf.RaggedTensor.from_sparse(inputs[features.QUERY_TOKENS])
    batch = tf.shape(has_real_query, out_type=tf.int64)[0]
    if self.fine_tunes_encoder:
      # Every query through the encoder, so that its gradients reach the fine-tuned layers.
      rows = tf.where(has_real_query, tf.range(batch), batch + tf.range(batch))
      title = inputs[TRAIN_QUERY_TOKENS]
      return self._encode(tf.gather(tf.concat([real, title], axis=0), rows), training)
    title = inputs[TRAIN_QUERY_TEXT]

    def with_real_queries():
      rows = tf.where(has_real_query)[:, 0]
      vectors = self._encode(tf.gather(real, rows), training)
      return tf.tensor_scatter_nd_update(title, rows[:, None], vectors)
    # Batches without real queries (as in data without a query column) skip the encoder.
    return tf.cond(tf.reduce_any(has_real_query), with_real_queries, lambda: title)

  def compute_loss(self, inputs, training=False):
    user_idx = tf.reshape(inputs[features.USER_IDX], [-1])
    if training and self.user_dropout > 0:
      # Unknown users are normal traffic: train the OOV user embedding on a share of examples.
      drop = tf.random.uniform(tf.shape(user_idx)) < self.user_dropout
      user_idx = tf.where(drop, tf.cast(self.n_users, user_idx.dtype), user_idx)
    item_idx = tf.reshape(inputs[features.ITEM_IDX], [-1])
    history = inputs[features.HISTORY_IDX]
    text_inputs = {}
    if self.uses_text:
      # Real queries make their examples searches; training queries (one per catalog item,
      # from its title) turn a share of the others into searches (no user, no history) and
      # personalized searches (all three).
      has_real_query = (has_tokens(inputs[features.QUERY_TOKENS]) if self._text is not None
                        else tf.zeros(tf.shape(item_idx), tf.bool))
      draw = tf.random.uniform(tf.shape(item_idx)) if training else tf.ones_like(
          item_idx, tf.float32)
      has_query = tf.logical_or(has_real_query, tf.logical_and(
          inputs[HAS_TRAIN_QUERY], draw < self.search_share + self.personalized_search_share))
      search = tf.logical_and(has_query, draw < self.search_share)
      user_idx = tf.where(search, tf.cast(self.n_users, user_idx.dtype), user_idx)
      history = tf.sparse.retain(history, tf.logical_not(tf.gather(search,
                                                                   history.indices[:, 0])))
      text_inputs = {'query_text': self._training_query_text(inputs, has_real_query, training),
                     'has_query': has_query}
    return self.task(
        self.query_embedding(user_idx, history, **text_inputs),
        self.candidate_embedding(item_idx, training=training),
        candidate_sampling_probability=(tf.gather(self.sampling_probability, item_idx)
                                        if self.logq_correction else None),
        candidate_ids=item_idx,
        compute_metrics=False)

  def validation_ranks(self, inputs, candidates):
    """float32 [B]: rank of each validation example's target among `candidates` [N, dim] (the
    item tower of the whole catalog), its history excluded, as eval_ranks ranks it.

    The example is a recommendation request (serving's): its query text only where it came
    with a real query (a real query needs the encoder of training steps).
    """
    history = inputs[features.HISTORY_IDX]
    text_inputs = {}
    if self.uses_text:
      has_query = (has_tokens(inputs[features.QUERY_TOKENS]) if self._text is not None
                   else tf.zeros(tf.shape(tf.reshape(inputs[features.ITEM_IDX], [-1])),
                                 tf.bool))
      text_inputs = {'query_text': self._training_query_text(inputs, has_query, False),
                     'has_query': has_query}
    query = self.query_embedding(inputs[features.USER_IDX], history, **text_inputs)
    scores = tf.matmul(query, candidates, transpose_b=True)
    return target_ranks(scores, history_mask(history, self.n_items),
                        inputs[features.ITEM_IDX])

  @property
  def trained_variables(self):
    """What training changes: the towers' trainable variables and the fine-tuned encoder
    layers."""
    return self.trainable_variables + (list(self._text.variables) if self._text else [])

  def train_step(self, inputs):
    """tfrs.Model's step, plus the fine-tuned encoder layers with their own optimizer."""
    if not self.fine_tunes_encoder:
      return super().train_step(inputs)
    with tf.GradientTape() as tape:
      loss = self.compute_loss(inputs, training=True)
      regularization_loss = tf.reduce_sum([tf.reduce_sum(loss) for loss in self.losses])
      total_loss = loss + regularization_loss
    # After the first call: Keras creates the towers' weights then.
    towers, encoder = self.trainable_variables, self._text.variables
    gradients = tape.gradient(total_loss, towers + encoder)
    self.optimizer.apply_gradients(zip(gradients[:len(towers)], towers))
    self._text.optimizer.apply_gradients(zip(gradients[len(towers):], encoder))
    metrics = {metric.name: metric.result() for metric in self.metrics}
    metrics.update(loss=loss, regularization_loss=regularization_loss, total_loss=total_loss)
    return metrics


class ValidationStopping(tf.keras.callbacks.Callback):
  """Validation decides training: after each epoch, full-catalog Recall@`k` of the validation
  split (logged as `val_recall@k`); training stops after `patience` epochs without a better
  one, and ends with the best epoch's weights (its trainable variables, and the fine-tuned
  encoder layers when there are some)."""

  def __init__(self, dataset: tf.data.Dataset, k: int, patience: int):
    super().__init__()
    self.dataset = dataset
    self.k = k
    self.patience = patience
    self.metric = f'val_recall@{k}'
    self.best, self.best_epoch, self.epochs_run = -1.0, -1, 0
    self._best_weights = None
    self._candidates = self._ranks = None

  def _variables(self):
    return self.model.trained_variables

  def recall(self) -> float:
    model = self.model
    # In replica context, as training steps run (a fine-tuned encoder runs only there under
    # MirroredStrategy); every replica gets the whole batch, the first one's ranks are read.
    strategy = model.distribute_strategy
    if self._ranks is None:
      self._candidates = tf.function(lambda: strategy.run(
          lambda: model.candidate_embedding(tf.range(model.n_items, dtype=tf.int64))))
      self._ranks = tf.function(
          lambda batch, candidates: strategy.run(model.validation_ranks,
                                                 args=(batch, candidates)))

    def first(value):
      return strategy.experimental_local_results(value)[0]
    candidates = first(self._candidates())
    hits, examples = 0, 0
    for batch in self.dataset:
      ranks = first(self._ranks(batch, candidates)).numpy()
      hits += int((ranks <= self.k).sum())
      examples += len(ranks)
    return hits / examples if examples else 0.0

  def on_epoch_end(self, epoch, logs=None):
    recall = self.recall()
    self.epochs_run = epoch + 1
    if logs is not None:
      logs[self.metric] = recall
    if recall > self.best:
      self.best, self.best_epoch = recall, epoch
      self._best_weights = [v.numpy() for v in self._variables()]
    note = 'best so far' if self.best_epoch == epoch else (
        f'best {self.best:.4f} at epoch {self.best_epoch + 1}')
    print(f'epoch {epoch + 1}: validation recall@{self.k} {recall:.4f} ({note})', flush=True)
    if epoch - self.best_epoch >= self.patience:
      print(f'stopping: no better validation recall@{self.k} in {self.patience} epoch(s)',
            flush=True)
      self.model.stop_training = True

  def on_train_end(self, logs=None):
    if self._best_weights is not None and self.best_epoch != self.epochs_run - 1:
      for variable, value in zip(self._variables(), self._best_weights):
        variable.assign(value)
      print(f'restored the weights of epoch {self.best_epoch + 1} (validation '
            f'recall@{self.k} {self.best:.4f})', flush=True)

  def summary(self) -> dict:
    return {'epochs_run': self.epochs_run, 'best_epoch': self.best_epoch + 1,
            'best_' + self.metric: self.best, 'patience': self.patience}


# Text models: the item tower weighs each item's id embedding by c / (c + m), c its training
# examples, so that items seen a few times lean on their text; validation picks m (0: every
# trained item keeps its whole id embedding, the model as trained; ties keep the smaller m).
ID_SHRINKAGE_GRID = (0.0, 1.0, 3.0, 10.0, 30.0)


def id_weights(trained: np.ndarray, counts: np.ndarray, shrinkage: float) -> np.ndarray:
  """float32 [n_items + 1]: each item's id-embedding weight, c / (c + shrinkage) where
  `trained` [n_items + 1] (the model's has_id as built) is 1, else 0."""
  counts = np.append(np.asarray(counts, np.float64), 0.0)
  weights = counts / np.maximum(counts + shrinkage, 1e-9) if shrinkage > 0 else 1.0
  return (np.asarray(trained, np.float64) * weights).astype(np.float32)


def choose_id_shrinkage(model: TwoTowerModel, stopping: ValidationStopping,
                        counts: np.ndarray, grid=ID_SHRINKAGE_GRID) -> dict:
  """Sets model.has_id to the id weights of the grid's shrinkage with the best validation
  Recall@k (stopping's metric, after training) and returns {'chosen', 'validation_recall@k'}."""
  trained = (model.has_id.numpy() > 0).astype(np.float32)
  scores = {}
  for shrinkage in grid:
    model.has_id.assign(id_weights(trained, counts, shrinkage))
    scores[shrinkage] = stopping.recall()
  chosen = max(grid, key=lambda m: (scores[m], -m))
  model.has_id.assign(id_weights(trained, counts, chosen))
  print('id-embedding shrinkage c/(c+m), validation recall@%d: %s; chosen m=%g' % (
      stopping.k, ', '.join(f'm={m:g} {r:.4f}' for m, r in scores.items()), chosen), flush=True)
  return {'chosen': chosen, f'validation_recall@{stopping.k}': {f'{m:g}': r
                                                               for m, r in scores.items()}}


class _TrainingText:
  """The text encoder of a TwoTowerModel's training steps and, when it is fine-tuned, the item
  tokens, the variables of its top layers and their optimizer."""

  def __init__(self, text_features, item_tokens, layers: int, learning_rate: float):
    self.text_features = text_features
    self.item_tokens = item_tokens
    self.variables = top_layer_variables(text_features.encoder, layers) if layers else []
    self.optimizer = tf.keras.optimizers.Adam(learning_rate) if layers else None


def top_layer_variables(encoder, layers: int):
  """The trainable variables of an encoder's top `layers` transformer layers.

  BERT encoders of tf-models-official (ours, and TF Hub's BERTs) name them
  `transformer/layer_<i>/...`.
  """
  by_layer = {}
  for variable in encoder.trainable_variables:
    match = re.search(r'transformer/layer_(\d+)/', variable.name)
    if match:
      by_layer.setdefault(int(match.group(1)), []).append(variable)
  if not 0 < layers <= len(by_layer):
    raise ValueError(f'fine_tune_layers={layers}: the text encoder has {len(by_layer)} '
                     'trainable transformer layers (transformer/layer_<i>/ variables)')
  return [v for i in sorted(by_layer)[-layers:] for v in by_layer[i]]


class TextFeatures(tf.Module):
  """The frozen text encoder on WordPiece ids: BERT features of queries and item text."""

  def __init__(self, encoder_dir: str, trainable: bool = False):
    """Loads a TextEncoder artifact (a TF Hub BERT SavedModel) through hub.KerasLayer.

    trainable: whether the encoder is fine-tuned (its variables trainable, dropout in training).
    """
    super().__init__()
    self.encoder = text_encoder.load_encoder(encoder_dir, trainable=trainable)
    vocab = text_encoder.read_vocab(os.path.join(encoder_dir, text_encoder.VOCAB_ASSET))
    self.cls_id, self.sep_id = vocab['[CLS]'], vocab['[SEP]']

  def __call__(self, tokens: tf.SparseTensor, training: bool = False) -> tf.Tensor:
    """float32 [B, H] sentence features of [B, (T)] WordPiece ids, padded to the batch's longest."""
    ragged = tf.RaggedTensor.from_sparse(tokens)
    longest = tf.reduce_max(tf.concat([ragged.row_lengths(), [0]], axis=0))
    seq_length = tf.cast(longest, tf.int32) + 2
    return self.encoder(text_encoder.bert_inputs(ragged, seq_length, self.cls_id, self.sep_id),
                        training=training)['default']


def history_mask(history_idx: tf.SparseTensor, n_items: int) -> tf.Tensor:
  """bool [B, N]: the items of each row's history (excluded from its ranking)."""
  # Indicator over N + 1 ids (the last one is the OOV bucket), then drop the OOV column.
  return tf.sparse.to_indicator(history_idx, n_items + 1)[:, :n_items]


def masked_top_k(scores: tf.Tensor, excluded: tf.Tensor, k):
  """(indices int64 [B, k], scores [B, k]): the best k of [B, N] scores, excluded items
  (history_mask) set to -inf: brute-force retrieval as serving_default answers it."""
  top = tf.math.top_k(tf.where(excluded, tf.constant(-np.inf, tf.float32), scores), k=k)
  return tf.cast(top.indices, tf.int64), top.values


def target_ranks(scores: tf.Tensor, excluded: tf.Tensor, target: tf.Tensor) -> tf.Tensor:
  """float32 [B]: 1-based rank of each target among the catalog's scores [B, N], the excluded
  items left out; inf when the target is not in the catalog (index N: the OOV bucket)."""
  n_items = tf.shape(scores, out_type=tf.int64)[1]
  target = tf.cast(tf.reshape(target, [-1]), tf.int64)
  in_catalog = target < n_items
  target_score = tf.gather(scores, tf.minimum(target, n_items - 1), batch_dims=1)
  # Ahead of the target: higher scores, and equal ones at a lower index (top_k's order; the
  # item vocabulary is ordered by frequency, so ties break by popularity).
  earlier = tf.range(n_items)[None, :] < target[:, None]
  ahead = tf.logical_or(scores > target_score[:, None],
                        tf.logical_and(scores == target_score[:, None], earlier))
  better = tf.logical_and(ahead, tf.logical_not(excluded))
  rank = 1.0 + tf.reduce_sum(tf.cast(better, tf.float32), axis=1)
  return tf.where(in_catalog, rank, np.inf)


def has_tokens(tokens: tf.SparseTensor) -> tf.Tensor:
  """bool [B]: which rows of a [B, (T)] SparseTensor have at least one value."""
  batch = tf.cast(tokens.dense_shape[0], tf.int32)
  rows = tf.cast(tokens.indices[:, 0], tf.int32)
  return tf.math.bincount(rows, minlength=batch, maxlength=batch) > 0


def write_npz(path: str, **arrays) -> None:
  """np.savez to any tf.io.gfile path (zip files need a seekable file: build it in memory)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  with tf.io.gfile.GFile(path, 'wb') as f:
    f.write(buffer.getvalue())


def read_npz(path: str):
  with tf.io.gfile.GFile(path, 'rb') as f:
    return np.load(io.BytesIO(f.read()))


def checkpoint(model: TwoTowerModel, fine_tuned_text_features=None) -> tf.train.Checkpoint:
  """trainer_state's checkpoint: the model's weights, and a fine-tuned encoder's."""
  if fine_tuned_text_features is None:
    return tf.train.Checkpoint(model=model)
  return tf.train.Checkpoint(model=model, text_encoder=fine_tuned_text_features)


def load_trainer_state(model_uri: str):
  """Rebuilds the trained Keras model from a Model artifact's trainer_state.

  Args:
    model_uri: the Trainer's Model artifact uri.

  Returns:
    (model: TwoTowerModel with the trained weights (text_features encodes the real queries
     of its training steps, if the training data had any), state: training.json as a dict, text_features: TextFeatures (the
     fine-tuned encoder, if the Trainer fine-tuned it) or None, train_queries: (train_query,
     has_train_query) or None).
  """
  state_dir = os.path.join(model_uri, TRAINER_STATE_DIR)
  with tf.io.gfile.GFile(os.path.join(state_dir, features.TRAINING_STATE_FILE)) as f:
    state = json.load(f)
  frequencies = read_npz(os.path.join(state_dir, 'frequencies.npz'))['frequencies']
  text_features, train_queries, item_text = None, None, None
  if state['text_encoder']:
    text_features = TextFeatures(state['text_encoder'])
    tables = read_npz(os.path.join(state_dir, 'train_queries.npz'))
    train_queries = (tables['train_query'], tables['has_train_query'])
    # Placeholder values of the right shape; the checkpoint restores the trained ones.
    item_text = np.zeros([state['n_items'] + 1, train_queries[0].shape[1]], np.float32)
  params = dict(DEFAULTS, **state['params'])
  step_encoder = text_features if state.get('train_examples_with_query') else None
  model = TwoTowerModel(state['n_users'], state['n_items'], frequencies, params,
                        item_text=item_text, text_features=step_encoder)
  # A fine-tuned encoder is restored over the pretrained one it started from.
  checkpoint(model, text_features if state.get('fine_tuned_layers') else None).read(
      os.path.join(state_dir, 'weights')).expect_partial()
  return model, state, text_features, train_queries
