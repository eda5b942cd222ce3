"""BaselineGate's decision and where its candidate number comes from (no pipeline run; the
e2e tests run the component in the DAG, both ways)."""

import json

import pytest

from components import baseline_gate
from evaluation import artifacts
from trainers import features

RESULTS = {'popularity': {'validation_recall@10': 0.04},
           'itemknn': {'validation_recall@10': 0.15},
           'als': {'validation_recall@10': 0.15}}


def test_best_baseline_is_the_highest_validation_recall_first_in_run_order():
  assert baseline_gate.best_baseline(RESULTS) == ('itemknn', 0.15)


@pytest.mark.parametrize('evaluator, candidate, lift, blessed, reason', [
    (True, 0.20, 1.0, True, 'beats the classic baselines'),
    (True, 0.15, 1.0, False, 'does not beat the classic baselines'),  # equal is not better
    (True, 0.20, 1.5, False, 'does not beat the classic baselines'),
    (True, 0.10, 0.0, True, 'baseline gate off (min_lift 0)'),
    (False, 0.30, 1.0, False, 'the Evaluator did not bless'),
])
def test_the_gate_needs_both_blessings(evaluator, candidate, lift, blessed, reason):
  gate = baseline_gate.decide(evaluator, candidate, 'src', RESULTS, lift)
  assert gate['blessed'] is blessed
  assert gate['reason'].startswith(reason)
  assert gate['best_baseline'] == 'itemknn'
  assert gate['lift'] == pytest.approx(candidate / 0.15)
  if evaluator and lift:
    assert f'{candidate:.4f} vs best baseline itemknn 0.1500' in gate['reason']


def _trainer_state(tmp_path, state):
  directory = tmp_path / 'model' / features.TRAINER_STATE_DIR
  directory.mkdir(parents=True)
  (directory / features.TRAINING_STATE_FILE).write_text(json.dumps(state))
  return str(tmp_path / 'model')


def test_candidate_is_the_compressed_models_validation_recall(tmp_path):
  report = tmp_path / 'report'
  report.mkdir()
  (report / artifacts.COMPRESSION_REPORT_JSON).write_text(json.dumps(
      {'compressed': {'quality': {features.EVAL_SPLIT: {'recall@10': 0.25}}}}))
  model = _trainer_state(tmp_path, {'validation': {'best_val_recall@10': 0.2,
                                                   'best_epoch': 3}})
  value, source = baseline_gate.candidate_validation_recall(model, str(report))
  assert value == 0.25 and 'compressed' in source


def test_without_compression_it_is_the_exported_trained_models(tmp_path):
  # The exported model is the best epoch's with the id shrinkage validation chose.
  model = _trainer_state(tmp_path, {'validation': {'best_val_recall@10': 0.2, 'best_epoch': 3},
                                    'validation_recall@10': 0.21})
  assert baseline_gate.candidate_validation_recall(model, None) == (
      0.21, 'trained model, eval split (Trainer, epoch 3)')
  older = _trainer_state(tmp_path / 'older', {'validation': {'best_val_recall@10': 0.2,
                                                             'best_epoch': 3}})
  assert baseline_gate.candidate_validation_recall(older, None)[0] == 0.2
