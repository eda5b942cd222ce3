"""The TFX Tuner's module: a seeded search over the two-tower's hyperparameters on validation.

`pipeline.py run --tune N` adds `tfx.components.Tuner(tuner_fn='trainers.tuning.tuner_fn')`
before the Trainer; its best hyperparameters feed the Trainer, which trains once more with
them (trainers/model.py `run_fn`). Each trial trains on the train split as the Trainer does
(same datasets, ValidationStopping with the same patience and maximum epochs) and scores
`val_recall@10`, the full-catalog validation Recall@10 that decides training and the gate;
the test split is never read. The first trial is DEFAULTS, then N - 1 seeded random draws
from SEARCH_SPACE (and, with text, TEXT_SEARCH_SPACE), so the tuned model is never worse on validation than the default one and
two runs try the same trials. Hyperparameters set with `--trainer NAME=VALUE` are fixed, not
searched.
"""

from typing import Dict, Tuple

import keras_tuner
import tensorflow as tf
from tfx import v1 as tfx

from trainers import trainer as trainer_lib
from trainers import model as model_lib

# name -> the values tried (DEFAULTS' value is always among them: the first trial).
SEARCH_SPACE: Dict[str, Tuple] = {
    'embedding_dim': (32, 64, 128),
    'learning_rate': (0.001, 0.003, 0.01),
    'temperature': (0.02, 0.05, 0.1, 0.2),
    'user_dropout': (0.0, 0.2, 0.4),
    'max_history': (10, 20, 50),
    'logq_correction': (1, 0),
    'history_encoder': ('pool', 'attention'),
}
# Searched only when the model has text: how much of training goes through the text features
# (search requests, candidates seen through their text only).
TEXT_SEARCH_SPACE: Dict[str, Tuple] = {
    'search_share': (0.1, 0.2, 0.4),
    'item_id_dropout': (0.0, 0.1, 0.3),
}
OBJECTIVE = f'val_recall@{model_lib.VALIDATION_K}'
TRIALS_KEY = 'tune_trials'  # custom_config: the number of trials, DEFAULTS' included


def searched(uses_text: bool) -> Dict[str, Tuple]:
  """The names searched and their values: SEARCH_SPACE, plus TEXT_SEARCH_SPACE for a model
  with text."""
  return {**SEARCH_SPACE, **(TEXT_SEARCH_SPACE if uses_text else {})}


def search_space(fixed, uses_text: bool) -> keras_tuner.HyperParameters:
  """`searched(uses_text)` without the names in `fixed`, each defaulting to DEFAULTS' value."""
  space = keras_tuner.HyperParameters()
  for name, values in searched(uses_text).items():
    if name not in fixed:
      space.Choice(name, list(values), default=model_lib.DEFAULTS[name])
  return space


class DefaultsFirstOracle(keras_tuner.oracles.RandomSearchOracle):
  """Random search whose first trial is the space's defaults (DEFAULTS)."""

  def populate_space(self, trial_id):
    if not self.trials:
      values = {hp.name: hp.default for hp in self.hyperparameters.space}
      self._duplicate(values)  # registered, so that no random draw repeats it
      return {'status': keras_tuner.engine.trial.TrialStatus.RUNNING, 'values': values}
    return super().populate_space(trial_id)


class TwoTowerHyperModel(keras_tuner.HyperModel):
  """Builds and fits one trial's TwoTowerModel on the prepared TrainingData."""

  def __init__(self, data: trainer_lib.TrainingData, params: dict, fixed):
    super().__init__()
    self._data, self._params, self._fixed = data, params, set(fixed)

  def trial_params(self, hp: keras_tuner.HyperParameters) -> dict:
    return model_lib.hyperparameters(
        {k: v for k, v in self._params.items() if k in self._fixed},
        {entry.name: hp.get(entry.name) for entry in hp.space})

  def build(self, hp):
    params = self.trial_params(hp)
    tf.keras.utils.set_random_seed(params['seed'])  # every trial starts from the same seed
    return trainer_lib.build_model(self._data, params)

  def fit(self, hp, model, *args, **kwargs):
    params = self.trial_params(hp)
    stopping = model_lib.ValidationStopping(self._data.validation, model_lib.VALIDATION_K,
                                            params['patience'])
    model.fit(self._data.train.prefetch(2), epochs=params['epochs'], verbose=2,
              callbacks=[stopping])
    return {OBJECTIVE: stopping.best}


class TwoTowerTuner(keras_tuner.engine.base_tuner.BaseTuner):
  """Runs each trial as the hypermodel says. (keras_tuner.Tuner expects a Keras 3 model and
  checkpoints it; the two-tower is a tf_keras model, and the Trainer retrains the best
  values anyway, so no trial's weights are kept.)"""

  def run_trial(self, trial, *args, **kwargs):
    hp = trial.hyperparameters
    return self.hypermodel.fit(hp, self.hypermodel.build(hp), *args, **kwargs)


def tuner_fn(fn_args: tfx.components.FnArgs) -> tfx.components.TunerFnResult:
  """TFX Tuner entry point: custom_config is the Trainer's plus `tune_trials`."""
  config = {k: v for k, v in (fn_args.custom_config or {}).items() if k != 'code'}
  trials = int(config.pop(TRIALS_KEY))
  params = model_lib.hyperparameters(config)
  if params['fine_tune_layers']:
    raise ValueError('--tune with fine_tune_layers is not supported: tune the frozen-encoder '
                     'model, then fine-tune with its values (--trainer NAME=VALUE)')
  trainer_lib.seed_training(params, fine_tuned_encoder=False)
  data = trainer_lib.prepare(fn_args, params)
  uses_text = data.item_text is not None
  fixed = set(config) & set(searched(uses_text))
  oracle = DefaultsFirstOracle(
      objective=keras_tuner.Objective(OBJECTIVE, direction='max'), max_trials=trials,
      hyperparameters=search_space(fixed, uses_text), seed=params['seed'])
  tuner = TwoTowerTuner(oracle=oracle,
                        hypermodel=TwoTowerHyperModel(data, params, fixed),
                        directory=fn_args.working_dir, project_name='two_tower',
                        overwrite=True)
  return tfx.components.TunerFnResult(tuner=tuner, fit_kwargs={})
