"""BaselineGate: blesses only a model that beats the best classic baseline.

After the Evaluator, it blesses the candidate when the Evaluator did and, on validation, the
candidate's Recall@10 is more than `min_lift` x the best baseline's (the Baselines component's
artifact, components/baselines_component.py; `min_lift` 0: the Evaluator's blessing alone). The
candidate's validation Recall@10 is the Compressor's measure of the compressed SavedModel on the
eval split, or, without compression, the exported trained model's (training.json). Validation
decides, as it decides training and compression; the test split stays the Evaluator's. Its
output is a standard ModelBlessing that the Pusher's condition reads, with gate.json beside it:
both numbers, the baseline's name, and why.
"""

import json
import os
from typing import Any, Dict, Optional, Tuple

from tfx import v1 as tfx

from components import baselines_component
from components import compressor
from evaluation import artifacts
from trainers import features

# The candidate must do better than this multiple of the best baseline's validation
# Recall@10 (docs/evaluation.md, "Verdict and exit status").
DEFAULT_MIN_LIFT = 1.0


def best_baseline(results: Dict[str, Dict[str, Any]]) -> Tuple[str, float]:
  """(name, validation Recall@10) of the best baseline (ties: the first in run order)."""
  name = max(results, key=lambda n: results[n]['validation_recall@10'])
  return name, results[name]['validation_recall@10']


def candidate_validation_recall(trained_model_uri: str,
                                compression_report_uri: Optional[str]) -> Tuple[float, str]:
  """(validation Recall@10 of the model the Pusher would push, where that number comes
  from)."""
  if compression_report_uri:
    report = artifacts.read_compression_report(compression_report_uri)
    return (report['compressed']['quality'][features.EVAL_SPLIT]['recall@10'],
            'compressed model, eval split (Compressor report)')
  with open(os.path.join(trained_model_uri, features.TRAINER_STATE_DIR,
                         features.TRAINING_STATE_FILE)) as f:
    state = json.load(f)
  validation = state['validation']
  return (state.get('validation_recall@10', validation['best_val_recall@10']),
          f"trained model, eval split (Trainer, epoch {validation['best_epoch']})")


def decide(evaluator_blessed: bool, candidate: float, source: str,
           results: Dict[str, Dict[str, Any]], min_lift: float) -> Dict[str, Any]:
  """gate.json: whether the candidate is blessed, on which numbers, and why."""
  name, best = best_baseline(results)
  beats = candidate > min_lift * best
  checked = min_lift > 0
  comparison = (f'validation recall@10 {candidate:.4f} vs best baseline {name} {best:.4f} '
                f'(gate: more than {min_lift:g}x)')
  if not evaluator_blessed:
    reason = "the Evaluator did not bless the model (see its thresholds)"
  elif checked and not beats:
    reason = f'does not beat the classic baselines: {comparison}'
  else:
    reason = (f'beats the classic baselines: {comparison}' if checked else
              f'baseline gate off (min_lift 0): {comparison}')
  return {'blessed': bool(evaluator_blessed and (beats or not checked)),
          'evaluator_blessed': bool(evaluator_blessed), 'checked': checked,
          'candidate_validation_recall@10': candidate, 'candidate_source': source,
          'best_baseline': name, 'best_baseline_validation_recall@10': best,
          'min_lift': min_lift, 'lift': candidate / best if best else None,
          'reason': reason}


@tfx.dsl.components.component
def BaselineGate(  # pylint: disable=invalid-name
    evaluator_blessing: tfx.dsl.components.InputArtifact[
        tfx.types.standard_artifacts.ModelBlessing],
    baselines: tfx.dsl.components.InputArtifact[baselines_component.BaselineMetrics],
    trained_model: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Model],
    blessing: tfx.dsl.components.OutputArtifact[tfx.types.standard_artifacts.ModelBlessing],
    compression_report: tfx.dsl.components.InputArtifact[compressor.CompressionReport] = None,
    min_lift: tfx.dsl.components.Parameter[float] = DEFAULT_MIN_LIFT,
    code: tfx.dsl.components.Parameter[str] = ''):
  """The Evaluator's blessing, and the candidate beating the best baseline on validation."""
  del code
  candidate, source = candidate_validation_recall(
      trained_model.uri, compression_report.uri if compression_report else None)
  gate = decide(evaluator_blessing.get_int_custom_property('blessed') == 1, candidate, source,
                artifacts.read_baselines(baselines.uri), min_lift)
  with open(os.path.join(blessing.uri, artifacts.GATE_FILE), 'w') as f:
    json.dump(gate, f, indent=2)
  print(f"BaselineGate: {'blessed' if gate['blessed'] else 'NOT blessed'}: {gate['reason']}",
        flush=True)
  blessing.set_int_custom_property('blessed', int(gate['blessed']))
