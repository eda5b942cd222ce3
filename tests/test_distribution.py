"""Training under MirroredStrategy (issue 6): 2 logical CPU devices stand in for 2 GPUs."""

import json
import os
import subprocess
import sys

import pytest

from evaluation import run_summary
from conftest import REPO, TWO_CPU_PIPELINE

pytestmark = pytest.mark.e2e



def test_mirrored_training_produces_a_blessed_model(e2e_data, tmp_path):
  output = tmp_path / 'out'
  command = [sys.executable, '-c', TWO_CPU_PIPELINE, 'run',
             '--interactions', str(e2e_data[0] / 'interactions.csv'),
             '--items', str(e2e_data[0] / 'items.csv'), '--output', str(output),
             # Both gates off: the 2-epoch id-only model of the slice is weak (the best epoch
             # on its 119 validation users can score 0 on test at 10) and loses to ItemKNN;
             # recall@100 below is the check that it learnt.
             '--epochs', '2', '--min-recall-at-10', '0', '--min-baseline-lift', '0',
             '--text-encoder', 'none',
             '--distribution', 'mirrored', '--no-compression']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 0, result.stderr[-3000:]
  with open(output / 'run_summary.json') as f:
    summary = json.load(f)
  assert summary['blessed'] is True and summary['pushed_model']
  assert summary['metrics']['trained']['recall@100'] > 0.05
  reader = run_summary.RunReader(str(output / 'pipeline_root' / 'metadata.db'), 'recommender')
  model_uri = reader.output_uri('Trainer', 'model')
  with open(os.path.join(model_uri, 'trainer_state', 'training.json')) as f:
    state = json.load(f)
  assert state['params']['distribution'] == 'mirrored'
  assert state['replicas'] == 2
