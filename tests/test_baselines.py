"""Baselines of the quality benchmark (evaluation/baselines.py) on hand-made splits.

Fast: nothing here imports TensorFlow (trainers.metrics is replaced where metrics are needed).
"""

import importlib.util
import json
import math
import os

import numpy as np
import pytest

from evaluation import baselines
from contract import protocol
from conftest import REPO
from conftest import write_csv

# Catalog order (count desc, then id): a (3), b (3), c (2), d (1).
KNN_FIT = [('u1', 'a'), ('u1', 'b'), ('u2', 'a'), ('u2', 'b'), ('u2', 'c'),
           ('u3', 'b'), ('u3', 'c'), ('u4', 'a'), ('u4', 'd')]
COS_AB, COS_AC, COS_AD, COS_BC = 2 / 3, 1 / math.sqrt(6), 1 / math.sqrt(3), 2 / math.sqrt(6)


def test_catalog_orders_by_count_then_item_id_and_adds_text_only_items():
  catalog = baselines.Catalog(KNN_FIT, extra_items=['z', 'e'])
  assert catalog.items == ['a', 'b', 'c', 'd', 'e', 'z']
  assert catalog.counts.tolist() == [3, 3, 2, 1, 0, 0]
  assert catalog.positions(['c', 'nope']).tolist() == [2, -1]


def test_block_ranks_breaks_ties_by_catalog_order_and_skips_exclusions():
  scores = np.array([[3.0, 1.0, 3.0, 2.0]] * 3)
  exclude = baselines.sparse.csr_matrix(np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]))
  ranks = baselines.block_ranks(scores, np.array([2, 2, 2]), exclude)
  # Row 0: item 0 ties with the target and comes first. Row 1: item 0 is excluded. Row 2: the
  # target itself is "excluded", which never removes it.
  assert ranks.tolist() == [2.0, 1.0, 2.0]
  assert baselines.block_ranks(scores[:1], np.array([-1])).tolist() == [math.inf]


def test_popularity_ranks_unchanged_convention():
  fit = [('u1', 'a'), ('u2', 'a'), ('u2', 'b'), ('u3', 'c'), ('u3', 'b'), ('u4', 'b')]
  # Catalog: b (3), a (2), c (1); u2's a and b are excluded, so c is first for u2.
  assert baselines.popularity_ranks(fit, [('u2', 'c'), ('u1', 'c'), ('u9', 'a'),
                                          ('u1', 'new')]) == [1.0, 2.0, 2.0, math.inf]


def test_itemknn_scores_and_ranks_by_hand():
  model = baselines.ItemKNN(neighbours=0).fit(KNN_FIT)
  # u4 bought a and d: score(j) = cos(a, j) + cos(d, j).
  np.testing.assert_allclose(model.scores(['u4'])[0], [COS_AD, COS_AB, COS_AC, COS_AD],
                             rtol=1e-6)
  # a and d are excluded: b (2/3) then c (0.41). u3 (b, c): a scores 2/3 + 1/sqrt(6), d 0.
  # An unknown user gets the popularity order.
  ranks = baselines.recommendation_ranks(model, [('u4', 'c'), ('u4', 'b'), ('u3', 'a'),
                                                 ('u3', 'd'), ('u9', 'c'), ('u4', 'zz')])
  assert ranks.tolist() == [2.0, 1.0, 1.0, 2.0, 3.0, math.inf]


def test_itemknn_neighbourhood_and_shrinkage_by_hand():
  # One neighbour each: a -> b (2/3 beats 1/sqrt(3) and 1/sqrt(6)), d -> a.
  model = baselines.ItemKNN(neighbours=1).fit(KNN_FIT)
  np.testing.assert_allclose(model.scores(['u4'])[0], [COS_AD, COS_AB, 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(
      baselines.ItemKNN(neighbours=0).fit(KNN_FIT).with_neighbours(1).scores(['u4']),
      model.scores(['u4']))
  # Shrinkage 1: |U_a & U_b| / (sqrt(3) sqrt(3) + 1), and so on.
  shrunk = baselines.ItemKNN(neighbours=0, shrink=1.0).fit(KNN_FIT)
  np.testing.assert_allclose(
      shrunk.scores(['u3'])[0],
      [2 / 4 + 1 / (math.sqrt(6) + 1), 2 / (math.sqrt(6) + 1), 2 / (math.sqrt(6) + 1), 0.0],
      rtol=1e-6)


def _co_purchase_pairs():
  """x and y are bought together by 12 users; p is the most popular item (20 users)."""
  pairs = []
  for n in range(12):
    pairs += [(f'g{n:02d}', 'x'), (f'g{n:02d}', 'y')]
  for n in range(20):
    others = ['q', 'r', 's']
    pairs += [(f'h{n:02d}', 'p'), (f'h{n:02d}', others[n % 3]), (f'h{n:02d}', others[(n + 1) % 3])]
  return pairs + [('t', 'x')]


def test_als_is_seeded_and_ranks_the_co_purchased_item_first():
  pairs = _co_purchase_pairs()
  params = dict(factors=8, regularization=0.1, alpha=5.0, iterations=15)
  first = baselines.recommendation_ranks(baselines.ALS(**params).fit(pairs), [('t', 'y')])
  again = baselines.ALS(**params).fit(pairs)
  assert first.tolist() == [1.0]
  assert baselines.recommendation_ranks(baselines.Popularity().fit(pairs), [('t', 'y')])[0] > 1
  np.testing.assert_array_equal(again.scores(['t', 'g00']),
                                baselines.ALS(**params).fit(pairs).scores(['t', 'g00']))


TEXTS = {'a': 'red heart box', 'b': 'red heart candle', 'c': 'blue star mug',
         'd': 'green tree lamp', 'e': 'yellow sun clock', 'cold': 'red heart mug'}


def _hybrid_pairs():
  pairs = [('u', 'a'), ('u', 'b'), ('v', 'a'), ('v', 'c')]
  for n in range(10):
    pairs += [(f'w{n}', 'c'), (f'w{n}', 'd'), (f'w{n}', 'e')]
  return pairs


def test_hybrid_ranks_a_cold_item_through_its_title():
  pairs = _hybrid_pairs()
  hybrid = baselines.Hybrid(TEXTS, text_weight=0.5, factors=4, iterations=10).fit(pairs)
  assert 'cold' in hybrid.catalog.index  # in the items file, no interactions
  assert baselines.recommendation_ranks(hybrid, [('u', 'cold')]).tolist() == [1.0]
  als = baselines.ALS(factors=4, iterations=10).fit(pairs)
  assert baselines.recommendation_ranks(als, [('u', 'cold')]).tolist() == [math.inf]
  # A fitted ALS can be handed over; it has to be fit on the same pairs.
  reused = baselines.Hybrid(TEXTS, text_weight=0.5, als=als).fit(pairs)
  np.testing.assert_allclose(reused.scores(['u']), hybrid.scores(['u']), rtol=1e-5)
  with pytest.raises(ValueError):
    baselines.Hybrid(TEXTS, als=als).fit(pairs + [('new user', 'a')])
  # with_weight leaves the fitted model as it was.
  assert hybrid.with_weight(0.0).text_weight == 0.0 and hybrid.text_weight == 0.5


def test_lexical_search_ranks_the_item_whose_title_is_the_query_first():
  pairs = _hybrid_pairs()
  for model in (baselines.BM25(TEXTS).fit(pairs),
                baselines.Hybrid(TEXTS, factors=4, iterations=5).fit(pairs)):
    ranks = baselines.search_ranks(model, [('u', 'cold'), ('u', 'a'), ('u', 'e')],
                                   ['red heart mug', 'red heart box', 'clock'])
    assert ranks.tolist() == [1.0, 1.0, 1.0], type(model).__name__
    # A query without known words ranks by popularity: c (11) first, then d, e, a.
    assert baselines.search_ranks(model, [('u', 'a')], ['purple']).tolist() == [4.0]


def test_search_queries_follow_the_seeded_protocol():
  titles = {'a': 'Red Heart Box Large', 'b': 'Blue Star'}
  targets = [('u1', 'a'), ('u2', 'a'), ('u1', 'b'), ('u1', 'missing')]
  queries = baselines.search_queries(targets, titles)
  assert queries == [protocol.search_query(u, i, titles.get(i, '')) for u, i in targets]
  assert queries[2] == 'blue star' and queries[3] == ''
  assert all(set(q.split()) <= set(protocol.title_words(titles['a'])) for q in queries[:2])


def test_cold_start_is_targets_outside_train_and_validation():
  fit = [('u1', 'a'), ('u1', 'b'), ('u2', 'c')]
  assert baselines.cold_start(fit, [('u1', 'c'), ('u2', 'd'), ('u3', 'a')]).tolist() == [
      False, True, False]


def test_tune_picks_best_recall_then_first_in_grid():
  ranks = {1: np.array([1.0, 20.0]), 2: np.array([5.0, 5.0]), 3: np.array([1.0, 1.0]),
           4: np.array([1.0, 1.0])}
  tuned = baselines.tune(lambda p: ranks[p['n']], baselines.grid(n=[1, 2, 3, 4]))
  assert tuned.params == {'n': 3}
  assert tuned.valid['n=2'] == (1.0, pytest.approx(1 / math.log2(6)))


def _fake_rank_metrics(ranks):
  ranks = np.asarray(ranks, np.float64)
  return {'recall@10': float((ranks <= 10).mean()) if len(ranks) else 0.0,
          'users': int(len(ranks))}


def test_evaluate_baselines_covers_every_model_and_task(tmp_path, monkeypatch):
  monkeypatch.setattr(baselines, '_rank_metrics', _fake_rank_metrics)
  monkeypatch.setattr(baselines, 'ALS_GRID', baselines.grid(factors=[4, 8], iterations=[5]))
  items = write_csv(tmp_path / 'items.csv', ['item_id', 'title'], sorted(TEXTS.items()))
  pairs = _hybrid_pairs()
  split = baselines.Split(train=pairs, valid=[('u', 'c'), ('w0', 'a')],
                          test=[('u', 'cold'), ('w0', 'b'), ('v', 'd')])
  results = baselines.evaluate_baselines(split, items)
  assert list(results) == ['popularity', 'itemknn', 'als', 'hybrid', 'bm25']
  for name, entry in results.items():
    assert entry['cold_start_users'] == 1
    assert (entry['recommendation'] is None) == (name == 'bm25'), name
    assert (entry['search'] is None) == (name not in ('hybrid', 'bm25')), name
    if entry['recommendation']:
      assert entry['recommendation']['users'] == 3 and entry['cold_start']['users'] == 1
  assert results['popularity']['cold_start']['recall@10'] == 0.0
  # The hybrid reports ALS's tuned hyperparameters and its own blend weight.
  assert set(results['hybrid']['params']) == {'factors', 'iterations', 'text_weight'}
  assert results['hybrid']['params']['factors'] == results['als']['params']['factors']
  assert len(results['itemknn']['validation']) == len(baselines.ITEMKNN_GRID)


def _quality():
  spec = importlib.util.spec_from_file_location(
      'quality', os.path.join(REPO, 'benchmarks', 'quality.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_quality_fails_loudly_on_different_splits(tmp_path):
  quality = _quality()
  for run in ('bert', 'id_only'):
    (tmp_path / run).mkdir()
    for name in quality.SPLIT_FILES:
      write_csv(tmp_path / run / name, ['user_id', 'item_id'], [('u', 'a')])
  quality.check_same_split(str(tmp_path / 'bert'), str(tmp_path / 'id_only'))
  write_csv(tmp_path / 'id_only' / 'test.csv', ['user_id', 'item_id'], [('u', 'b')])
  with pytest.raises(SystemExit, match='different splits'):
    quality.check_same_split(str(tmp_path / 'bert'), str(tmp_path / 'id_only'))


def test_quality_table_says_na_for_missing_sections(tmp_path):
  quality = _quality()
  (tmp_path / 'run_summary.json').write_text(json.dumps(
      {'metrics': {'trained': {'recall@10': 0.25, 'ndcg@10': 0.125, 'recall@100': 0.5}}}))
  run = quality.read_two_tower(str(tmp_path))
  assert run['cold_start'] is None and run['search'] is None
  lines = quality.table([('two-tower', run)], cold_users=7).splitlines()
  assert 'cold-start Recall@10 (n=7)' in lines[0]
  assert lines[2] == '| two-tower | 0.2500 | 0.1250 | 0.5000 | n/a | n/a | n/a |'
  assert quality.read_two_tower(str(tmp_path), 'compressed')['recommendation'] is None
