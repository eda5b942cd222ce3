"""Metrics against hand-computed ranks, through numpy and through TFMA's Evaluator metric."""

import math

import apache_beam as beam
import numpy as np
import pytest
import tensorflow_model_analysis as tfma
from apache_beam.testing import util as beam_util
from tensorflow_model_analysis.metrics import metric_types

from evaluation import baselines
from trainers import metrics

RANKS = [1.0, 3.0, 10.0, 11.0, 60.0, math.inf]


def test_rank_metrics_match_hand_computation():
  result = metrics.rank_metrics(RANKS)
  assert result['users'] == 6
  assert result['recall@10'] == pytest.approx(3 / 6)
  assert result['ndcg@10'] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 6)
  assert result['mrr@10'] == pytest.approx((1 + 1 / 3 + 1 / 10) / 6)
  assert result['recall@50'] == pytest.approx(4 / 6)
  assert result['recall@100'] == pytest.approx(5 / 6)


def test_unknown_kind_is_rejected():
  with pytest.raises(ValueError, match='unknown metric kind'):
    metrics.RetrievalMetric(kind='precision')


def _assert_combines_to(metric, predictions, expected):
  """The metric's one TFMA computation, run by Beam over `predictions`, gives `expected`."""
  (computation,) = metric.computations()
  elements = [metric_types.StandardMetricInputs(predictions=p) for p in predictions]
  with beam.Pipeline() as pipeline:
    result = (pipeline | beam.Create(elements)
              | beam.CombineGlobally(computation.combiner))

    def check(outputs):
      (output,) = outputs
      (value,) = output.values()
      assert value == pytest.approx(expected)
    beam_util.assert_that(result, check)


def test_tfma_metric_combiner_matches_numpy():
  _assert_combines_to(metrics.RetrievalMetric('ndcg', 10),
                      [{'rank': np.array([r])} for r in RANKS],
                      metrics.rank_metrics(RANKS)['ndcg@10'])


def test_metric_configs_carry_the_recall_floor():
  configs = metrics.metric_configs(recall_floor=0.07)
  floors = [(t.threshold.value_threshold.lower_bound.value, list(t.slicing_specs))
            for c in configs for t in c.per_slice_thresholds]
  # On the overall slice only (a plain `threshold` would gate every slice).
  assert floors == [(0.07, [tfma.SlicingSpec()])]
  assert not any(c.HasField('threshold') for c in configs)
  assert [c.class_name for c in configs].count('RetrievalMetric') == 6
  assert any('"recall@100"' in c.config for c in configs)
  assert any('"index_recall@10"' in c.config for c in configs)


def test_the_index_recall_floor_gates_the_overall_slice():
  configs = metrics.metric_configs(min_index_recall=0.95)
  (config,) = [c for c in configs if c.per_slice_thresholds]
  assert '"index_recall@10"' in config.config
  (threshold,) = config.per_slice_thresholds
  assert threshold.threshold.value_threshold.lower_bound.value == 0.95
  assert list(threshold.slicing_specs) == [tfma.SlicingSpec()]


def test_index_recall_is_the_mean_of_the_index_recall_output():
  _assert_combines_to(metrics.RetrievalMetric('index_recall', 10),
                      [{'rank': np.array([r]), 'index_recall': np.array([v])}
                       for r, v in [(1.0, 1.0), (5.0, 0.8), (math.inf, 0.6)]], 0.8)


def test_popularity_ranks_exclude_the_users_items():
  fit = [('u1', 'a'), ('u2', 'a'), ('u3', 'a'), ('u1', 'b'), ('u2', 'b'), ('u3', 'c')]
  # Popularity order: a (3), b (2), c (1); u1 has seen a and b, so c ranks first for u1.
  test = [('u1', 'c'), ('u3', 'b'), ('u2', 'z')]
  assert baselines.popularity_ranks(fit, test) == [1.0, 1.0, math.inf]
