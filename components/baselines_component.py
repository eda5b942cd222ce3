"""Baselines: the classic recommenders a shop would otherwise use, run in the DAG on the run's
own split (after SequenceExampleGen).

It tunes popularity, ItemKNN and implicit ALS on validation (fit on train, scored on the
validation targets), refits each on train + validation and scores test, with the protocol of
evaluation/baselines.py. Its artifact holds baselines.json: per baseline, its validation
Recall@10, its test metrics and its chosen hyperparameters. BaselineGate
(components/baseline_gate.py) and the run summary read it.
"""

import json
import os
from typing import Any, Dict

from tfx import v1 as tfx
from tfx.types import artifact

from components import example_gen
from evaluation import artifacts
from evaluation import baselines as baselines_lib



class BaselineMetrics(artifact.Artifact):
  """The Baselines component's baselines.json."""
  # '<namespace>.<Name>': the form Kubeflow Pipelines v2 requires of custom artifact types.
  TYPE_NAME = 'recommender.BaselineMetrics'


def run_baselines(split_dir: str) -> Dict[str, Dict[str, Any]]:
  """Every recommender baseline on an exported split: {name: {validation_recall@10, test
  (metrics), cold_start (metrics), params, seconds}}."""
  split = baselines_lib.read_split(split_dir)
  results = baselines_lib.evaluate_baselines(
      split, None, log=lambda line: print(f'  baseline {line}', flush=True),
      names=baselines_lib.RECOMMENDERS)
  return {name: {'validation_recall@10': entry['validation_recall@10'],
                 'test': entry['recommendation'], 'cold_start': entry['cold_start'],
                 'params': entry['params'], 'seconds': entry['seconds']}
          for name, entry in results.items()}


@tfx.dsl.components.component
def Baselines(  # pylint: disable=invalid-name
    split: tfx.dsl.components.InputArtifact[example_gen.SplitExport],
    baselines: tfx.dsl.components.OutputArtifact[BaselineMetrics],
    code: tfx.dsl.components.Parameter[str] = ''):
  """Tunes, fits and scores the classic recommenders on the exported split; `code`: the
  code fingerprint (cache key)."""
  del code
  results = run_baselines(split.uri)
  with open(os.path.join(baselines.uri, artifacts.BASELINES_FILE), 'w') as f:
    json.dump(results, f, indent=2)
