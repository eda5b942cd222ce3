"""Distills the frozen BERT query encoder (teacher) into a small BertEncoder (student).

The student is a tf-models-official `BertEncoderV2` with fewer and narrower layers (default:
2 layers, hidden 128, 2 heads, inner 512) over the teacher's WordPiece vocabulary, so the
Transform graph's tokens feed it unchanged, followed by mean pooling over the tokens (as the
teacher, all-MiniLM-L6-v2, pools) and a linear head to the teacher's 384-d `default` output.
It is trained to match the teacher's features (MSE plus cosine distance) on the catalog's
item texts and on search queries drawn from catalog titles with
contract.protocol.search_query under several seeds (the Trainer's own training-query seed
among them).

The word-embedding table, 30522 x hidden and most of the student's weights, is not trained:
it is the teacher's table projected onto its top `hidden` principal components, stored int8
with one scale per row from the start (quantization.quantize). Frozen, it keeps a sensible
vector for every token, also the many that catalog text never shows; int8 from the start, the
student is trained on exactly the table it is served with (no post-training error there).
The position and type embeddings start from the teacher's, projected the same way; the
transformer layers and the head are trained.

The teacher's features of item texts and of the Trainer's training queries are already in the
trainer state (the model's item-text table, train_queries.npz), so only the extra query seeds
go through the teacher here.
"""

import dataclasses
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tf_keras
from official.nlp.modeling import networks

from contract import protocol
from trainers import text_encoder
from compression import progress
from compression import quantization
from trainers import features
from trainers import data as data_lib
from trainers import model as model_lib

# Longest input the student takes, [CLS] and [SEP] included: item texts are cut at
# trainers.transform.ITEM_TEXT_MAX_TOKENS (48) and queries at QUERY_MAX_TOKENS (16) tokens.
STUDENT_MAX_LENGTH = 64
TEACHER_WORD_EMBEDDINGS = 'word_embeddings/embeddings'
TEACHER_POSITION_EMBEDDINGS = 'position_embedding/embeddings'
TEACHER_TYPE_EMBEDDINGS = 'type_embeddings/embeddings'


@dataclasses.dataclass
class DistillConfig:
  """Student shape and training.

  Attributes:
    layers: transformer layers of the student.
    hidden: hidden size of the student (also its word-embedding width).
    heads: attention heads (hidden must be a multiple).
    inner: feed-forward width; 0 for 4 * hidden.
    query_seeds: search-query draws per catalog title besides the Trainer's own.
    epochs: passes over the distillation texts.
    batch_size: texts per step.
    learning_rate: Adam learning rate (linear warm-up over the first 10% of steps, then
      linear decay).
    max_steps: at most this many training steps (the budget on large catalogs: a count of
      steps, never of seconds, so that the student is the same on a loaded machine); 0 for
      no limit beyond `epochs`.
    seed: initialization and shuffling seed.
  """
  layers: int = 2
  hidden: int = 128
  heads: int = 2
  inner: int = 0
  query_seeds: int = 3
  epochs: int = 8
  batch_size: int = 64
  learning_rate: float = 0.002
  max_steps: int = 2000
  seed: int = 7


class Int8WordEmbedding(tf_keras.layers.Layer):
  """A frozen word-embedding table held as int8 with one float32 scale per row.

  Stands in for BertEncoderV2's `embedding_layer`: ids [B, L] -> float32 [B, L, width].
  """

  def __init__(self, table: Optional[np.ndarray] = None, vocab_size: int = 0,
               width: int = 0, **kwargs):
    super().__init__(**kwargs)
    if table is None:
      table = np.zeros([vocab_size, width], np.float32)
    q, scale = quantization.quantize(table, axis=0)
    self.info = quantization._info(  # pylint: disable=protected-access
        'student/word_embeddings', np.asarray(table, np.float32), q, scale, 0,
        quantization.PER_ROW)
    self.embeddings_int8 = tf.Variable(q, trainable=False, name='embeddings_int8')
    self.embeddings_scale = tf.Variable(scale, trainable=False, name='embeddings_scale')

  def call(self, ids):  # pylint: disable=arguments-differ
    rows = tf.cast(tf.gather(self.embeddings_int8, ids), tf.float32)
    return rows * tf.gather(self.embeddings_scale, ids)[..., None]

  @property
  def embeddings(self):
    return tf.cast(self.embeddings_int8, tf.float32) * self.embeddings_scale[:, None]


class StudentTextFeatures(tf.Module):
  """The student with TextFeatures' interface: SparseTensor tokens [B, (T)] -> [B, 384]."""

  def __init__(self, config: DistillConfig, word_table: np.ndarray, cls_id: int, sep_id: int,
               output_width: int):
    super().__init__(name='student_text_features')
    vocab_size, hidden = word_table.shape
    self.cls_id, self.sep_id = int(cls_id), int(sep_id)
    self.width = int(output_width)
    self.word_embeddings = Int8WordEmbedding(word_table, name='word_embeddings')
    self.encoder = networks.BertEncoderV2(
        vocab_size=vocab_size, hidden_size=hidden, num_layers=config.layers,
        num_attention_heads=config.heads, max_sequence_length=STUDENT_MAX_LENGTH,
        type_vocab_size=2, inner_dim=config.inner or 4 * hidden, inner_activation='gelu',
        # A short distillation on a few thousand texts: no dropout.
        output_dropout=0.0, attention_dropout=0.0,
        embedding_layer=self.word_embeddings, name='student_encoder')
    self.pooling = text_encoder.MeanPooling(name='student_mean_pooling')
    self.head = tf_keras.layers.Dense(output_width, name='student_head')

  def encode(self, inputs: Dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
    """float32 [B, 384] of the encoder's input dict (int32 [B, L] each)."""
    sequence = self.encoder(inputs, training=training)['sequence_output']
    return self.head(self.pooling(sequence, inputs['input_mask']))

  def __call__(self, tokens: tf.SparseTensor) -> tf.Tensor:
    ragged = tf.RaggedTensor.from_sparse(tokens)
    longest = tf.cast(tf.reduce_max(tf.concat([ragged.row_lengths(),
                                               tf.zeros([1], tf.int64)], 0)), tf.int32)
    seq_length = tf.minimum(longest + 2, STUDENT_MAX_LENGTH)
    return self.encode(text_encoder.bert_inputs(ragged, seq_length, self.cls_id, self.sep_id))


def _teacher_variables(teacher: model_lib.TextFeatures) -> Dict[str, np.ndarray]:
  """The teacher encoder's embedding tables by name (without the ':0')."""
  wanted = (TEACHER_WORD_EMBEDDINGS, TEACHER_POSITION_EMBEDDINGS, TEACHER_TYPE_EMBEDDINGS)
  found = {}
  for variable in teacher.encoder.variables:
    name = variable.name.split(':')[0]
    for key in wanted:
      if name.endswith(key):
        found[key] = variable.numpy()
  missing = set(wanted) - set(found)
  if missing:
    raise ValueError(f'teacher encoder has no {sorted(missing)} (not a BERT encoder?)')
  return found


def projected_embeddings(teacher_tables: Dict[str, np.ndarray], hidden: int):
  """Teacher embeddings projected onto the top `hidden` principal components of its words.

  Returns:
    (word [vocab, hidden], position [STUDENT_MAX_LENGTH, hidden], type [2, hidden]) float32.
  """
  words = teacher_tables[TEACHER_WORD_EMBEDDINGS].astype(np.float32)
  mean = words.mean(axis=0)
  centered = words - mean
  # Principal directions: eigenvectors of the [H, H] covariance, largest eigenvalues first.
  covariance = (centered.T @ centered).astype(np.float64) / len(words)
  _, vectors = np.linalg.eigh(covariance)
  projection = vectors[:, ::-1][:, :hidden].astype(np.float32)  # [teacher hidden, hidden]
  word = centered @ projection
  position = teacher_tables[TEACHER_POSITION_EMBEDDINGS][:STUDENT_MAX_LENGTH] @ projection
  types = teacher_tables[TEACHER_TYPE_EMBEDDINGS][:2] @ projection
  return word.astype(np.float32), position.astype(np.float32), types.astype(np.float32)


@dataclasses.dataclass
class DistillTexts:
  """Distillation texts: WordPiece ids per text and the teacher's features of each."""
  tokens: List[np.ndarray]
  targets: np.ndarray  # float32 [N, 384]
  kinds: Dict[str, int]


def _rows(tokens: tf.SparseTensor) -> List[np.ndarray]:
  ragged = tf.RaggedTensor.from_sparse(tokens)
  return [np.asarray(row, np.int64) for row in ragged.to_list()]


def collect_texts(catalog: tf.data.Dataset, tft_layer, item_ids: List[str],
                  teacher: model_lib.TextFeatures, item_text: np.ndarray,
                  train_queries: Optional[Tuple[np.ndarray, np.ndarray]],
                  query_seeds: int) -> DistillTexts:
  """Item texts and title queries of the catalog with the teacher's features of each.

  Args:
    catalog: batches of the transformed catalog split.
    tft_layer: the Transform graph's layer (tokenizes queries as serving does).
    item_ids: the item vocabulary (index -> id).
    teacher: the frozen teacher.
    item_text: [n_items + 1, 384] the trained model's item-text table (teacher features of
      each item's text).
    train_queries: the Trainer's (train_query [n_items + 1, 384], has_train_query) or None.
    query_seeds: extra search-query seeds per title, encoded by the teacher here.
  """
  n_items = len(item_ids)
  tokens, targets = [], []
  kinds = {'item_text': 0, 'train_query': 0, 'extra_query': 0}
  seeds = [f'__distill_{k}__' for k in range(query_seeds)]
  for batch in catalog:
    idx = batch[features.ITEM_IDX].numpy().reshape(-1)
    texts = [t.decode() for t in batch[features.ITEM_TEXT].numpy().reshape(-1)]
    keep = idx < n_items
    for i, row in zip(idx, _rows(batch[features.ITEM_TEXT_TOKENS])):
      if i < n_items and len(row):
        tokens.append(row)
        targets.append(item_text[i])
        kinds['item_text'] += 1
    titles = [t.split(' . ')[0] for t in texts]
    if train_queries is not None:
      queries = [data_lib.training_query(item_ids[i] if i < n_items else '', text)
                 for i, text in zip(idx, texts)]
      for i, row in zip(idx, _rows(data_lib.query_tokens(tft_layer, queries))):
        if i < n_items and len(row) and train_queries[1][i]:
          tokens.append(row)
          targets.append(train_queries[0][i])
          kinds['train_query'] += 1
    for seed in seeds:
      queries = [protocol.search_query(seed, item_ids[i] if i < n_items else '', title)
                 for i, title in zip(idx, titles)]
      batch_tokens = data_lib.query_tokens(tft_layer, queries)
      rows = _rows(batch_tokens)
      has = np.array([len(r) > 0 for r in rows]) & keep
      if has.any():
        vectors = teacher(batch_tokens).numpy()
        for j in np.flatnonzero(has):
          tokens.append(rows[j])
          targets.append(vectors[j])
          kinds['extra_query'] += 1
  if not tokens:
    raise ValueError('no catalog text to distill on: the catalog split has no item text')
  return DistillTexts(tokens, np.asarray(targets, np.float32), kinds)


def _batches(tokens: List[np.ndarray], targets: np.ndarray, batch_size: int, cls_id: int,
             sep_id: int, rng: Optional[np.random.Generator]):
  """Padded encoder inputs in batches of similar length (little padding), shuffled if rng."""
  order = np.argsort([len(t) for t in tokens], kind='stable')
  chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
  if rng is not None:
    rng.shuffle(chunks)
  for chunk in chunks:
    rows = [tokens[i][:STUDENT_MAX_LENGTH - 2] for i in chunk]
    length = max(len(r) for r in rows) + 2
    word_ids = np.zeros([len(rows), length], np.int32)
    mask = np.zeros([len(rows), length], np.int32)
    for j, row in enumerate(rows):
      word_ids[j, :len(row) + 2] = np.concatenate([[cls_id], row, [sep_id]])
      mask[j, :len(row) + 2] = 1
    yield ({'input_word_ids': word_ids, 'input_mask': mask,
            'input_type_ids': np.zeros_like(word_ids)}, targets[chunk])


def _loss(predicted, target):
  """Feature MSE (scaled by the teacher's feature variance) plus cosine distance."""
  mse = tf.reduce_mean(tf.square(predicted - target)) / (
      tf.reduce_mean(tf.square(target)) + 1e-6)
  cosine = tf.reduce_mean(tf.reduce_sum(tf.math.l2_normalize(predicted, 1)
                                        * tf.math.l2_normalize(target, 1), 1))
  return mse + (1.0 - cosine)


class _WarmupDecay(tf_keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up over the first 10% of the steps, then linear decay to 5%."""

  def __init__(self, rate: float, total: int):
    super().__init__()
    self.rate, self.total = float(rate), float(total)
    self.warmup = max(1.0, self.total // 10)

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warm = tf.minimum(1.0, (step + 1.0) / self.warmup)
    decay = 1.0 - 0.95 * tf.minimum(1.0, step / self.total)
    return self.rate * warm * decay

  def get_config(self):
    return {'rate': self.rate, 'total': self.total}


def feature_agreement(student: StudentTextFeatures, teacher, tokens: tf.SparseTensor) -> dict:
  """Student vs teacher on some texts: mean cosine, relative MSE, how many texts."""
  has = model_lib.has_tokens(tokens).numpy()
  if not has.any():
    return {'texts': 0, 'cosine': None, 'relative_mse': None}
  s = student(tokens).numpy()[has]
  t = teacher(tokens).numpy()[has]
  cosine = np.sum(s * t, 1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1) + 1e-9)
  return {'texts': int(has.sum()), 'cosine': float(cosine.mean()),
          'relative_mse': float(np.mean((s - t) ** 2) / (np.mean(t ** 2) + 1e-12))}


def distill(teacher: model_lib.TextFeatures, texts: DistillTexts,
            config: DistillConfig) -> Tuple[StudentTextFeatures, dict]:
  """Trains a student on `texts`.

  Returns:
    (student, report): the report has the student's shape and size, the texts by kind, the
    steps, the seconds and the loss at the start and the end.
  """
  started = time.time()
  tf.keras.utils.set_random_seed(config.seed)
  tables = _teacher_variables(teacher)
  word, position, types = projected_embeddings(tables, config.hidden)
  student = StudentTextFeatures(config, word, teacher.cls_id, teacher.sep_id,
                                texts.targets.shape[1])
  rng = np.random.default_rng(config.seed)
  # Build, then start the position and type embeddings from the teacher's.
  first = next(_batches(texts.tokens[:2], texts.targets[:2], 2, teacher.cls_id,
                        teacher.sep_id, None))[0]
  student.encode({k: tf.constant(v) for k, v in first.items()})
  encoder = student.encoder
  encoder._position_embedding_layer.set_weights([position])  # pylint: disable=protected-access
  encoder._type_embedding_layer.set_weights([types])  # pylint: disable=protected-access

  steps_per_epoch = int(np.ceil(len(texts.tokens) / config.batch_size))
  total = max(1, steps_per_epoch * config.epochs)
  if config.max_steps:
    total = min(total, int(config.max_steps))
  optimizer = tf_keras.optimizers.Adam(_WarmupDecay(config.learning_rate, total))
  variables = None

  spec = tf.TensorSpec([None, None], tf.int32)

  @tf.function(input_signature=[{'input_word_ids': spec, 'input_mask': spec,
                                 'input_type_ids': spec},
                                tf.TensorSpec([None, texts.targets.shape[1]], tf.float32)])
  def step(inputs, target):
    with tf.GradientTape() as tape:
      loss = _loss(student.encode(inputs, training=True), target)
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(zip(grads, variables))
    return loss

  # The pooler (on [CLS]) is not part of the mean-pooled features.
  variables = [v for v in student.encoder.trainable_variables
               if 'pooler_transform' not in v.name] + list(student.head.trainable_variables)
  setup_seconds = time.time() - started
  train_started = time.time()
  losses, steps = [], 0
  shown = progress.Progress(
      f'distillation ({config.layers} layers, hidden {config.hidden}, '
      f'{len(texts.tokens)} texts)', total)
  while steps < total:
    epoch = []
    for inputs, target in _batches(texts.tokens, texts.targets, config.batch_size,
                                   teacher.cls_id, teacher.sep_id, rng):
      epoch.append(float(step(inputs, target)))
      steps += 1
      shown.step(steps, float(np.mean(epoch[-20:])))
      if steps >= total:
        break
    losses.append(float(np.mean(epoch)))
  n_float = int(sum(np.prod(v.shape) for v in student.trainable_variables))
  report = {
      'student': {'layers': config.layers, 'hidden': config.hidden, 'heads': config.heads,
                  'inner': config.inner or 4 * config.hidden,
                  'max_length': STUDENT_MAX_LENGTH,
                  'word_embeddings': list(word.shape),
                  'trained_weights': n_float,
                  'weights': int(sum(np.prod(v.shape) for v in student.variables))},
      'teacher_weights': int(sum(np.prod(v.shape) for v in teacher.encoder.variables)),
      'texts': dict(texts.kinds, total=len(texts.tokens)),
      'steps': steps,
      'epochs_run': len(losses),
      'max_steps': config.max_steps,
      'loss_by_epoch': losses,
      'setup_seconds': round(setup_seconds, 2),
      'train_seconds': round(time.time() - train_started, 2),
  }
  return student, report
