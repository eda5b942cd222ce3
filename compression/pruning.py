"""Magnitude pruning of the two-tower model's dense and embedding weights (tfmot).

TwoTowerModel is a subclassed Keras model, which `tfmot.sparsity.keras.prune_low_magnitude`
does not take whole; its layers are wrapped where the model holds them instead: the user and
item embeddings, the query MLP (a Sequential, pruned as one) and the text projection. The
model then fine-tunes for a few steps with a PolynomialDecay schedule to the target sparsity
and the `UpdatePruningStep` callback, and the wrappers come off again (`strip_pruning` for the
Sequential; the single layers are unwrapped the same way), leaving the original layers with
sparse weights.

tfrs.Model's train_step calls `compute_loss(training=True)` directly, not through `__call__`,
so layers called inside it see no Keras training flag; the wrapper only advances its pruning
step in training mode. `_TrainingPrune` reads the flag from the fine-tuning loop instead.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

from compression import progress
from trainers import features
from trainers import model as model_lib

# The model's prunable attributes, in report order. `query_mlp` is a Sequential of Dense.
EMBEDDINGS = ('user_embedding', 'item_embedding')
DENSES = ('query_mlp', 'text_projection')


class _TrainingPrune(pruning_wrapper.PruneLowMagnitude):
  """PruneLowMagnitude whose `training` defaults to the fine-tuning loop's flag."""

  fine_tuning = False

  def call(self, inputs, training=None, **kwargs):
    if training is None:
      training = _TrainingPrune.fine_tuning
    return super().call(inputs, training=training, **kwargs)


@dataclasses.dataclass
class PruningConfig:
  """How to prune.

  Attributes:
    target_sparsity: final share of zeros in each pruned weight (with m_by_n: of the
      embedding tables only).
    sparsity_m_by_n: (2, 4) for 2:4 structured sparsity of the dense kernels (2 zeros in
      every 4 consecutive input weights of an output: Ampere+ GPU sparse tensor cores);
      None for unstructured magnitude pruning everywhere.
    fine_tune_steps: training steps; 0 for one pass over the train split.
    learning_rate: Adam learning rate of the fine-tuning.
    batch_size: fine-tuning batch size; 0 for the Trainer's.
    seed: shuffle and dropout seed.
  """
  target_sparsity: float = 0.5
  sparsity_m_by_n: Optional[Tuple[int, int]] = None
  fine_tune_steps: int = 0
  learning_rate: float = 0.001
  batch_size: int = 0
  seed: int = 7


def build(model: model_lib.TwoTowerModel) -> None:
  """Builds every layer of a restored model, so that its checkpoint values are in place.

  load_trainer_state restores lazily: a layer's weights take the checkpoint's values when the
  layer is built. Pruning wraps built layers, so build them all first with one tiny batch.
  """
  history = tf.sparse.from_dense(tf.constant([[0]], tf.int64))
  text = {}
  if model.uses_text:
    text = {'query_text': tf.zeros([1, model.item_text.shape[1]]),
            'has_query': tf.constant([True])}
  model.query_embedding(tf.constant([0], tf.int64), history, **text)
  model.candidate_embedding(tf.constant([0], tf.int64))


def prunable_layers(model: model_lib.TwoTowerModel) -> Dict[str, tf.keras.layers.Layer]:
  """Report name -> layer of every weight-bearing layer pruning applies to."""
  layers = {name: getattr(model, name) for name in EMBEDDINGS}
  # By position: Keras numbers layer names per process (dense, dense_1, ... or dense_7).
  for i, layer in enumerate(model.query_mlp.layers):
    layers[f'query_mlp/layer_{i}'] = layer
  if model.uses_text:
    layers['text_projection'] = model.text_projection
  return layers


def layer_weight(layer) -> tf.Variable:
  """The pruned weight of an Embedding or Dense layer."""
  return layer.embeddings if isinstance(layer, tf.keras.layers.Embedding) else layer.kernel


def sparsity_report(model: model_lib.TwoTowerModel) -> Dict[str, dict]:
  """Per pruned layer: weight shape, number of weights, zeros and sparsity (share of zeros)."""
  report = {}
  for name, layer in prunable_layers(model).items():
    values = layer_weight(layer).numpy()
    zeros = int((values == 0).sum())
    report[name] = {'weight': layer_weight(layer).name.split(':')[0],
                    'shape': list(values.shape), 'weights': int(values.size), 'zeros': zeros,
                    'sparsity': zeros / values.size if values.size else 0.0}
  return report


def _schedule(config: PruningConfig, steps: int):
  """PolynomialDecay from 0 to the target, reaching it at a prune step before the end.

  A layer called twice per training step (the item embedding: history and candidates) counts
  two pruning steps per training step; each layer counts at least one, so ending at
  `end <= steps` brings every layer to the target. `end` is a multiple of `frequency`, since
  the schedule prunes only on those steps.
  """
  frequency = max(1, steps // 10)
  end = max(frequency, (int(steps * 0.7) // frequency) * frequency)
  return tfmot.sparsity.keras.PolynomialDecay(
      initial_sparsity=0.0, final_sparsity=config.target_sparsity, begin_step=0,
      end_step=end, frequency=frequency)


def _wrap(layer, params):
  return _TrainingPrune(layer, **params)


def apply_pruning(model: model_lib.TwoTowerModel, config: PruningConfig, steps: int) -> List:
  """Replaces the prunable layers of `model` with pruning wrappers; returns the wrappers."""
  params = {'pruning_schedule': _schedule(config, steps)}
  dense_params = dict(params)
  if config.sparsity_m_by_n:
    # 2:4 is for matmuls (sparse tensor cores); embedding tables are gathered row by row, and
    # tfmot would group their vocabulary axis: they get the unstructured target instead.
    dense_params['sparsity_m_by_n'] = tuple(config.sparsity_m_by_n)
  wrappers = []
  for name in EMBEDDINGS:
    wrapper = _wrap(getattr(model, name), params)
    setattr(model, name, wrapper)
    wrappers.append(wrapper)
  if model.uses_text:
    model.text_projection = _wrap(model.text_projection, dense_params)
    wrappers.append(model.text_projection)
  mlp = model.query_mlp
  pruned_mlp = tf.keras.Sequential([_wrap(layer, dense_params) for layer in mlp.layers],
                                   name=mlp.name)
  model.query_mlp = pruned_mlp
  wrappers.extend(pruned_mlp.layers)
  # Wrappers create their masks when built; UpdatePruningStep needs them before training.
  build(model)
  return wrappers


def strip(model: model_lib.TwoTowerModel, wrappers) -> None:
  """Applies the final masks and puts the original (now sparse) layers back in the model."""
  for wrapper in wrappers:
    wrapper.pruning_obj.weight_mask_op()
  model.query_mlp = tfmot.sparsity.keras.strip_pruning(model.query_mlp)
  for name in EMBEDDINGS + (('text_projection',) if model.uses_text else ()):
    wrapper = getattr(model, name)
    if isinstance(wrapper, pruning_wrapper.PruneLowMagnitude):
      setattr(model, name, wrapper.layer)


def ranking_distillation_loss(model: model_lib.TwoTowerModel,
                              teacher: model_lib.TwoTowerModel, batch,
                              temperature: float) -> tf.Tensor:
  """KL(teacher || model) of the in-batch score distributions of recommendation requests,
  summed over the batch.

  Both models score the batch's targets (the in-batch candidates) for each example's user and
  history, without query text, as recommendation requests are served; the pruned model is
  pulled towards the trained model's whole ranking of them, not only towards the labels.
  """
  user_idx = tf.reshape(batch[features.USER_IDX], [-1])
  item_idx = tf.reshape(batch[features.ITEM_IDX], [-1])
  history = batch[features.HISTORY_IDX]
  text = {}
  if model.uses_text:
    n = tf.shape(user_idx)[0]
    text = {'query_text': tf.zeros([n, model.item_text.shape[1]]),
            'has_query': tf.zeros([n], tf.bool)}

  def logits(m):
    query = m.query_embedding(user_idx, history, **text)
    return tf.matmul(query, m.candidate_embedding(item_idx), transpose_b=True) / temperature

  target = tf.nn.softmax(tf.stop_gradient(logits(teacher)), axis=1)
  # Summed over the batch, as tfrs.tasks.Retrieval sums its loss: the two terms then weigh
  # alike at distill_weight 1.
  return tf.reduce_sum(tf.keras.losses.kl_divergence(target, tf.nn.softmax(logits(model),
                                                                           axis=1)))


def fine_tune(model: model_lib.TwoTowerModel, train: tf.data.Dataset, config: PruningConfig,
              steps: int, teacher: Optional[model_lib.TwoTowerModel] = None,
              distill_weight: float = 1.0, what: str = 'pruning fine-tune') -> dict:
  """Prunes `model` in place while fine-tuning it on `train` for `steps` steps.

  Args:
    model: the restored, built TwoTowerModel.
    train: batches of transformed training examples (with training queries for text models),
      repeated as needed.
    config: the pruning settings.
    steps: training steps.
    teacher: the trained model, unpruned: adds ranking_distillation_loss (times
      `distill_weight`) to the retrieval loss; None: the retrieval loss alone.
    distill_weight: weight of the ranking-distillation term.
    what: the progress lines' label.

  Returns:
    {'loss': [retrieval loss per step]}, and 'ranking_distillation_loss' with a teacher.
  """
  wrappers = apply_pruning(model, config, steps)
  optimizer = tf.keras.optimizers.Adam(config.learning_rate)
  # tfmot's custom-training-loop protocol: the callback advances every wrapper's step.
  step_callback = tfmot.sparsity.keras.UpdatePruningStep()
  step_callback.set_model(model)
  step_callback.on_train_begin()

  @tf.function
  def train_step(batch):
    with tf.GradientTape() as tape:
      loss = model.compute_loss(batch, training=True)
      distill = (ranking_distillation_loss(model, teacher, batch, model.temperature)
                 if teacher is not None else tf.constant(0.0))
      total = loss + distill_weight * distill
    variables = model.trainable_variables
    gradients = tape.gradient(total, variables)
    optimizer.apply_gradients([(g, v) for g, v in zip(gradients, variables) if g is not None])
    return loss, distill

  history = {'loss': []}
  if teacher is not None:
    history['ranking_distillation_loss'] = []
  shown = progress.Progress(what, steps)
  _TrainingPrune.fine_tuning = True
  try:
    for done, batch in enumerate(train.repeat().take(steps), 1):
      step_callback.on_train_batch_begin(batch=-1)
      loss, distill = train_step(batch)
      history['loss'].append(float(loss))
      if teacher is not None:
        history['ranking_distillation_loss'].append(float(distill))
      shown.step(done, float(loss) + distill_weight * float(distill))
    step_callback.on_epoch_end(batch=-1)
  finally:
    _TrainingPrune.fine_tuning = False
  strip(model, wrappers)
  return history


def train_steps(n_examples: int, batch_size: int, config: PruningConfig) -> int:
  """The fine-tuning's step count: the configured one, or one pass over the train split."""
  if config.fine_tune_steps > 0:
    return int(config.fine_tune_steps)
  return max(1, int(np.ceil(n_examples / batch_size)))


def count_examples(dataset: tf.data.Dataset) -> int:
  """Examples in a batched dataset of transformed examples."""
  return int(sum(int(tf.shape(batch[features.ITEM_IDX])[0]) for batch in dataset))
