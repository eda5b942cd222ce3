"""The Tuner (trainers/tuning.py): DEFAULTS first, seeded draws, --trainer values fixed, and
the real TFX Tuner executor searching on validation Recall@10 over the e2e run's artifacts."""

import copy
import glob
import json
import os

import keras_tuner
import pytest
from tfx.components.tuner import executor as tuner_executor
from tfx.dsl.components.base import base_executor
from tfx.proto import trainer_pb2
from tfx.types import standard_artifacts
from tfx.types import standard_component_specs as specs
from tfx.utils import proto_utils

import conftest
from evaluation import run_summary
from trainers import features
from trainers import trainer as trainer_lib
from trainers import model as model_lib
from trainers import tuning


def _trials(oracle, n):
  values = []
  for i in range(n):
    trial = oracle.create_trial(f'tuner{i}')
    values.append(dict(trial.hyperparameters.values))
    oracle.end_trial(trial)  # no metric: a failed-looking trial, enough for the draws
  return values


def _oracle(fixed=(), seed=7, trials=5, tmp_path=None, name='o', uses_text=False):
  oracle = tuning.DefaultsFirstOracle(
      objective=keras_tuner.Objective(tuning.OBJECTIVE, direction='max'), max_trials=trials,
      hyperparameters=tuning.search_space(set(fixed), uses_text), seed=seed)
  oracle._set_project_dir(str(tmp_path), name)  # pylint: disable=protected-access
  return oracle


def test_the_first_trial_is_defaults_then_seeded_distinct_draws(tmp_path):
  first = _trials(_oracle(tmp_path=tmp_path, name='a'), 5)
  again = _trials(_oracle(tmp_path=tmp_path, name='b'), 5)
  assert first[0] == {name: model_lib.DEFAULTS[name] for name in tuning.SEARCH_SPACE}
  assert first == again  # same seed, same trials
  assert len({json.dumps(v, sort_keys=True) for v in first}) == 5
  for values in first:
    assert all(values[name] in choices for name, choices in tuning.SEARCH_SPACE.items())
  assert _trials(_oracle(seed=8, tmp_path=tmp_path, name='c'), 5)[1:] != first[1:]
  # A model with text also searches how much of training goes through the text.
  text = _trials(_oracle(tmp_path=tmp_path, name='d', uses_text=True), 3)
  space = tuning.searched(uses_text=True)
  assert set(space) == set(tuning.SEARCH_SPACE) | set(tuning.TEXT_SEARCH_SPACE)
  assert text[0] == {name: model_lib.DEFAULTS[name] for name in space}
  assert all(values[name] in space[name] for values in text for name in space)


def test_values_set_with_trainer_flags_are_not_searched(tmp_path):
  values = _trials(_oracle(fixed={'embedding_dim'}, tmp_path=tmp_path), 3)
  assert all('embedding_dim' not in v for v in values)
  params = model_lib.hyperparameters({'embedding_dim': 16}, {'embedding_dim': 128,
                                                             'learning_rate': 0.01})
  assert (params['embedding_dim'], params['learning_rate']) == (16, 0.01)
  with pytest.raises(ValueError, match='unknown'):
    model_lib.hyperparameters({}, {'no_such_knob': 1})


@pytest.mark.e2e
def test_the_tfx_tuner_searches_on_validation_and_writes_the_best(e2e_run, tmp_path):
  output, _ = e2e_run
  reader = run_summary.RunReader(str(output / 'pipeline_root' / 'metadata.db'), 'recommender')
  examples_uri = reader.output_uri('Transform', 'transformed_examples')
  splits = [os.path.basename(p)[len('Split-'):]
            for p in sorted(glob.glob(os.path.join(examples_uri, 'Split-*')))]
  inputs = {
      specs.EXAMPLES_KEY: [conftest.artifact(standard_artifacts.Examples, examples_uri, splits)],
      specs.TRANSFORM_GRAPH_KEY: [conftest.artifact(standard_artifacts.TransformGraph,
                                            reader.output_uri('Transform', 'transform_graph'))],
      specs.BASE_MODEL_KEY: [conftest.artifact(standard_artifacts.Model,
                                       reader.output_uri('TextEncoder', 'model'))],
  }
  best = conftest.artifact(standard_artifacts.HyperParameters, str(tmp_path / 'best'))
  results = conftest.artifact(standard_artifacts.TunerResults, str(tmp_path / 'results'))
  os.makedirs(best.uri)
  os.makedirs(results.uri)
  context = base_executor.BaseExecutor.Context(tmp_dir=str(tmp_path / 'tmp'), unique_id='1')
  tuner_executor.Executor(context).Do(
      inputs, {specs.BEST_HYPERPARAMETERS_KEY: [best], specs.TUNER_RESULTS_KEY: [results]},
      {specs.TUNER_FN_KEY: 'trainers.tuning.tuner_fn',
       specs.TRAIN_ARGS_KEY: proto_utils.proto_to_json(
           trainer_pb2.TrainArgs(splits=[features.TRAIN_SPLIT])),
       specs.EVAL_ARGS_KEY: proto_utils.proto_to_json(
           trainer_pb2.EvalArgs(splits=[features.EVAL_SPLIT])),
       specs.CUSTOM_CONFIG_KEY: json.dumps({'epochs': 1, tuning.TRIALS_KEY: 2})})
  [path] = glob.glob(os.path.join(best.uri, '*'))
  with open(path) as f:
    tuned = trainer_lib.tuned_values(json.load(f))
  space = tuning.searched(uses_text=True)  # the TextEncoder's model: text is searched too
  assert set(tuned) == set(space)
  # Both trials scored the validation objective (DEFAULTS' among them), best first; the best
  # one's values are the ones written for the Trainer.
  [results_file] = glob.glob(os.path.join(results.uri, '*'))
  with open(results_file) as f:
    trials = json.load(f)
  assert len(trials) == 2, trials
  scores = [t['score'] for t in trials]
  assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
  assert {name: trials[0][name] for name in space} == tuned
  defaults = {name: model_lib.DEFAULTS[name] for name in space}
  assert defaults in [{name: t[name] for name in space} for t in trials]


@pytest.mark.e2e
def test_the_run_summary_prints_tuned_choices_and_numbers(e2e_run):
  """The end-of-run summary of a --tune run names every tuned value, the history encoder's
  string among the numbers (it once ended such a run with a traceback)."""
  summary = copy.deepcopy(e2e_run[1])
  summary['training']['tuned'] = {'history_encoder': 'attention', 'learning_rate': 0.01,
                                  'max_history': 50}
  printed = run_summary.format_summary(summary)
  assert ('tuned on validation (Tuner): history_encoder=attention, learning_rate=0.01, '
          'max_history=50') in printed
