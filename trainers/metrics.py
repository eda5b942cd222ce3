"""Full-catalog retrieval metrics (docs/contracts.md §2), from the rank of each example's target.

`rank` is 1-based among the catalog with the user's excluded items removed, and inf when the
target is not in the catalog (a miss); items tied with the target count as ahead of it when
serving would return them first (the model's eval_ranks; the baselines break ties by
popularity, then id), so a model that scores many items alike gains nothing from ties. Per example, at cut-off K:
  recall@K = 1 if rank <= K (one target per user, so recall = hit rate),
  ndcg@K   = 1 / log2(rank + 1) if rank <= K,
  mrr@K    = 1 / rank if rank <= K,
each averaged over the evaluated users. The same functions serve the TFMA metric (the
Evaluator) and the baselines, so every number in a run summary is computed one way.
"""

import dataclasses
import json
from typing import Dict, Iterable, List, Optional

import apache_beam as beam
import numpy as np
import tensorflow_model_analysis as tfma
# The model's Transform graph tokenizes with TF Text ops; TFMA loads the model where this
# module (the metric's) is imported, so register them here.
import tensorflow_text  # pylint: disable=unused-import
from tensorflow_model_analysis.metrics import metric_types

from trainers import features

KINDS = ('recall', 'ndcg', 'mrr')
# The mean of eval_ranks' index_recall output: how much of the exact top-10 serving_default's
# approximate index returns (1 for brute force).
INDEX_RECALL = 'index_recall'
INDEX_RECALL_METRIC = f'{INDEX_RECALL}@{features.INDEX_RECALL_K}'
REPORTED = (('recall', 10), ('ndcg', 10), ('mrr', 10), ('recall', 50), ('recall', 100))


def gain(kind: str, k: int, ranks) -> np.ndarray:
  """Per-example value of metric `kind`@`k` for an array of ranks."""
  ranks = np.asarray(ranks, np.float64)
  hit = ranks <= k
  safe = np.where(hit, ranks, 1.0)
  if kind == 'recall':
    return hit.astype(np.float64)
  if kind == 'ndcg':
    return np.where(hit, 1.0 / np.log2(safe + 1.0), 0.0)
  if kind == 'mrr':
    return np.where(hit, 1.0 / safe, 0.0)
  raise ValueError(f'unknown metric kind {kind!r}; expected one of {KINDS}')


def metric_name(kind: str, k: int) -> str:
  return f'{kind}@{k}'


def rank_metrics(ranks: Iterable[float]) -> Dict[str, float]:
  """The reported metrics of docs/contracts.md §2 for a list of target ranks, plus `users`."""
  ranks = np.asarray(list(ranks), np.float64)
  result = {metric_name(kind, k): float(gain(kind, k, ranks).mean()) if len(ranks) else 0.0
            for kind, k in REPORTED}
  result['users'] = int(len(ranks))
  return result


@dataclasses.dataclass
class _Accumulator:
  count: float = 0.0
  total: float = 0.0


def _output(element: metric_types.StandardMetricInputs, model_name: str,
            output: str = features.RANK_OUTPUT) -> np.ndarray:
  """One eval_ranks output of one model in an element (TFMA nests it per model/output)."""
  predictions = element.predictions
  if isinstance(predictions, dict) and model_name in predictions:
    predictions = predictions[model_name]
  if isinstance(predictions, dict):
    predictions = predictions[output]
  return np.asarray(predictions, np.float64).reshape(-1)


class _RetrievalCombiner(beam.CombineFn):
  """Averages gain(kind, k, rank) over examples; kind INDEX_RECALL: the index_recall output."""

  def __init__(self, key: metric_types.MetricKey, kind: str, k: int):
    self._key = key
    self._kind = kind
    self._k = k

  def _values(self, element: metric_types.StandardMetricInputs) -> np.ndarray:
    if self._kind == INDEX_RECALL:
      return _output(element, self._key.model_name, features.INDEX_RECALL_OUTPUT)
    return gain(self._kind, self._k, _output(element, self._key.model_name))

  def create_accumulator(self) -> _Accumulator:
    return _Accumulator()

  def add_input(self, accumulator: _Accumulator,
                element: metric_types.StandardMetricInputs) -> _Accumulator:
    values = self._values(element)
    accumulator.count += len(values)
    accumulator.total += float(values.sum())
    return accumulator

  def merge_accumulators(self, accumulators: Iterable[_Accumulator]) -> _Accumulator:
    result = _Accumulator()
    for accumulator in accumulators:
      result.count += accumulator.count
      result.total += accumulator.total
    return result

  def extract_output(self, accumulator: _Accumulator) -> Dict[metric_types.MetricKey, float]:
    value = accumulator.total / accumulator.count if accumulator.count else float('nan')
    return {self._key: value}


def _retrieval_computations(kind: str, k: int, name: str,
                            model_names: Optional[List[str]] = None,
                            output_names: Optional[List[str]] = None,
                            example_weighted: bool = False) -> metric_types.MetricComputations:
  del output_names  # the combiner picks the output it averages
  computations = []
  for model_name in model_names or ['']:
    key = metric_types.MetricKey(name=name, model_name=model_name,
                                 example_weighted=example_weighted)
    computations.append(metric_types.MetricComputation(
        keys=[key],
        preprocessors=[metric_types.StandardMetricInputsPreprocessor(
            include_filter={'predictions': {}}, include_default_inputs=False)],
        combiner=_RetrievalCombiner(key, kind, k)))
  return computations


class RetrievalMetric(tfma.metrics.Metric):
  """TFMA metric: mean of recall/ndcg/mrr@k over the `rank` predictions of eval_ranks."""

  def __init__(self, kind: str = 'recall', k: int = 10, name: Optional[str] = None):
    """Initializes the metric.

    Args:
      kind: 'recall', 'ndcg' or 'mrr'.
      k: Cut-off.
      name: Metric name; defaults to '<kind>@<k>'.
    """
    if kind not in KINDS + (INDEX_RECALL,):
      raise ValueError(f'unknown metric kind {kind!r}; expected one of {KINDS}')
    super().__init__(_retrieval_computations, kind=kind, k=k,
                     name=name or metric_name(kind, k))


metric_types.register_metric(RetrievalMetric)


def metric_configs(recall_floor: Optional[float] = None,
                   min_retention: Optional[float] = None,
                   min_index_recall: Optional[float] = None) -> List[tfma.MetricConfig]:
  """MetricConfigs for the reported metrics, with the blessing gate on recall@10.

  Args:
    recall_floor: absolute lower bound on the candidate's recall@10; None: no floor.
    min_retention: least share of the baseline model's recall@10 the candidate keeps (TFMA's
      relative change threshold: (candidate - baseline) / baseline >= min_retention - 1);
      None: no comparison. Needs a baseline model in the EvalConfig.
    min_index_recall: lower bound on index_recall@10 (serving_default's share of the exact
      top-10); None: reported, not gated.
  Both apply to the overall slice only: a plain `threshold` would apply to every slice, and
  small slices (cold start) are reported, not gated.
  """
  configs = []
  for kind, k in REPORTED:
    config = tfma.MetricConfig(class_name='RetrievalMetric', module=__name__,
                               config=json.dumps({'kind': kind, 'k': k,
                                                  'name': metric_name(kind, k)}))
    gated = (kind, k) == ('recall', 10) and (recall_floor is not None or
                                             min_retention is not None)
    if gated:
      threshold = config.per_slice_thresholds.add(slicing_specs=[tfma.SlicingSpec()]).threshold
      if recall_floor is not None:
        threshold.value_threshold.lower_bound.value = recall_floor
      if min_retention is not None:
        threshold.change_threshold.direction = tfma.MetricDirection.HIGHER_IS_BETTER
        threshold.change_threshold.relative.value = min_retention - 1.0
    configs.append(config)
  index_config = tfma.MetricConfig(
      class_name='RetrievalMetric', module=__name__,
      config=json.dumps({'kind': INDEX_RECALL, 'k': features.INDEX_RECALL_K,
                         'name': INDEX_RECALL_METRIC}))
  if min_index_recall is not None:
    index_config.per_slice_thresholds.add(slicing_specs=[tfma.SlicingSpec()]).threshold.\
        value_threshold.lower_bound.value = min_index_recall
  configs.append(index_config)
  configs.append(tfma.MetricConfig(class_name='ExampleCount'))
  return configs
