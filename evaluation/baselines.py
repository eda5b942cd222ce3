"""Baselines scored on the exported split with the protocol of docs/contracts.md §2.

Every baseline follows the same conventions, kept in one place (`Catalog`, `Recommender` of
evaluation/recommenders.py, where the models are, and `block_ranks`):

- Fit on train + validation before scoring test (docs/contracts.md §2); hyperparameters are
  tuned on validation: fit on train, score the validation targets, keep the best Recall@10 (then
  NDCG@10, then grid order), refit on train + validation, score test.
- The catalog is the items of the data the model was fit on; a model that can score items by
  their text (the hybrid, lexical search) also ranks every item of the items file. A target
  outside the catalog counts as a miss (rank inf).
- The user's fit items are excluded from ranking (search excludes nothing).
- Ranks are 1-based; ties in score are broken by the catalog order: interaction count in the
  fit data (descending), then item id, so every ranking is deterministic.

Tasks: recommendation (`recommendation_ranks`), cold start (the test users whose target is not
in train + validation, `cold_start`), and search with the seeded query protocol of
`protocol.search_query` (`search_ranks`: the query alone ranks the full catalog).
"""

import csv
import dataclasses
import itertools
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import sparse

from contract import data as contract
from contract import protocol
# The recommenders, kept in their own module; their names stay importable from here.
from evaluation.recommenders import (  # pylint: disable=unused-import (re-exported)
    ALS, BM25, SEED, Catalog, Hybrid, ItemKNN, Pairs, Popularity, Recommender, TextIndex, TfIdf,
    history_matrix)

# Users (or queries) scored per block: bounds the dense score matrix to BLOCK x catalog floats.
BLOCK = 512
TEXT_COLUMNS = ('title', 'description', 'category', 'brand')


def _rank_metrics(ranks) -> Dict[str, float]:
  # trainers.metrics pulls in TensorFlow and TFMA (about 15 s to import); the rankings
  # themselves need only numpy, so the import waits until metrics are asked for.
  from trainers import metrics  # pylint: disable=g-import-not-at-top
  return metrics.rank_metrics(ranks)


def read_pairs(path: str) -> Pairs:
  """Reads a `user_id,item_id` split CSV."""
  with open(path, newline='') as f:
    return [(row['user_id'], row['item_id']) for row in csv.DictReader(f)]


@dataclasses.dataclass
class Split:
  """The exported split (docs/contracts.md §2): one validation and one test target per user."""
  train: Pairs
  valid: Pairs
  test: Pairs

  @property
  def fit(self) -> Pairs:
    """What the baselines are fit on before scoring test: train + validation."""
    return self.train + self.valid


def read_split(split_dir: str) -> Split:
  """Reads train.csv, valid.csv and test.csv of an exported split directory."""
  return Split(*(read_pairs(os.path.join(split_dir, f'{name}.csv'))
                 for name in ('train', 'valid', 'test')))


def item_texts(items_path: str) -> Dict[str, str]:
  """item_id -> its text (title, description, category, brand), read with the data contract."""
  items = contract.read_items(items_path)
  return dict(zip(items['item_id'],
                  items[list(TEXT_COLUMNS)].apply(' '.join, axis=1).str.strip()))


def item_titles(items_path: str) -> Dict[str, str]:
  """item_id -> title, read with the data contract."""
  items = contract.read_items(items_path)
  return dict(zip(items['item_id'], items['title']))


def block_ranks(scores: np.ndarray, targets: np.ndarray,
                exclude: Optional[sparse.csr_matrix] = None) -> np.ndarray:
  """Rank of each row's target among the row's non-excluded catalog items.

  Args:
    scores: [rows, catalog] scores, columns in catalog (tie-break) order.
    targets: [rows] catalog position of each row's target, -1 when outside the catalog.
    exclude: Optional [rows, catalog] matrix whose non-zeros are removed from the ranking
      (the target itself is never removed).

  Returns:
    [rows] 1-based ranks as floats, inf for targets outside the catalog. An item is ahead of
    the target when it scores higher, or the same and comes earlier in the catalog.
  """
  ranks = np.full(len(targets), math.inf)
  inside = targets >= 0
  if not inside.any():
    return ranks
  s = scores[inside]
  t = targets[inside]
  target_score = s[np.arange(len(t)), t][:, None]
  columns = np.arange(s.shape[1])[None, :]
  ahead = (s > target_score) | ((s == target_score) & (columns < t[:, None]))
  if exclude is not None:
    ahead &= ~exclude[np.flatnonzero(inside)].toarray().astype(bool)
  ranks[inside] = ahead.sum(axis=1) + 1.0
  return ranks


def recommendation_ranks(model: Recommender, targets: Pairs) -> np.ndarray:
  """Rank of each (user, target) under a fitted model, the user's fit items excluded."""
  ranks = []
  for start in range(0, len(targets), BLOCK):
    block = targets[start:start + BLOCK]
    users = [user for user, _ in block]
    ranks.append(block_ranks(model.scores(users),
                             model.catalog.positions([item for _, item in block]),
                             model.exclusions(users)))
  return np.concatenate(ranks) if ranks else np.zeros(0)


def popularity_ranks(fit: Pairs, test: Pairs) -> List[float]:
  """Rank of each test target when the catalog is ordered by interaction count.

  Ties in count are broken by item id, so the ranking is deterministic.

  Args:
    fit: (user, item) pairs the baseline is fit on.
    test: (user, target) pairs to score.

  Returns:
    One 1-based rank per test pair (inf when the target is not in the catalog).
  """
  return recommendation_ranks(Popularity().fit(fit), test).tolist()


def search_queries(targets: Pairs, titles: Dict[str, str]) -> List[str]:
  """The protocol's seeded query for each (user, target): 2-3 words of the target's title.

  A target missing from the items file has no title and gets the empty query (still scored).
  """
  return [protocol.search_query(user, item, titles.get(item, '')) for user, item in targets]


def search_ranks(model, targets: Pairs, queries: Sequence[str]) -> np.ndarray:
  """Rank of each target when the model ranks its full catalog from the query alone.

  Args:
    model: A fitted model with `catalog` and `query_scores(queries)`.
    targets: (user, target) pairs; the user plays no part (no personalization, no exclusions).
    queries: One query per target (`search_queries`).

  Returns:
    1-based ranks, inf for targets outside the model's catalog.
  """
  ranks = []
  for start in range(0, len(targets), BLOCK):
    block = targets[start:start + BLOCK]
    ranks.append(block_ranks(model.query_scores(list(queries[start:start + BLOCK])),
                             model.catalog.positions([item for _, item in block])))
  return np.concatenate(ranks) if ranks else np.zeros(0)


def cold_start(fit: Pairs, targets: Pairs) -> np.ndarray:
  """Boolean mask of the targets that are not among the fit items (train + validation)."""
  seen = {item for _, item in fit}
  return np.array([item not in seen for _, item in targets], bool)


def _recall_at_10(ranks: np.ndarray) -> Tuple[float, float]:
  """(Recall@10, NDCG@10) for model selection, without importing trainers.metrics."""
  hit = ranks <= 10
  ndcg = np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 1.0) + 1.0), 0.0)
  return (float(hit.mean()) if len(ranks) else 0.0, float(ndcg.mean()) if len(ranks) else 0.0)


@dataclasses.dataclass
class Tuned:
  """Outcome of tuning one baseline on validation.

  Attributes:
    params: The chosen hyperparameters.
    valid: params -> (validation Recall@10, NDCG@10) for every grid point, as 'k=v,...' keys.
    seconds: Wall time of the tuning.
    best: (validation Recall@10, NDCG@10) of the chosen point.
  """
  params: Dict[str, float]
  valid: Dict[str, Tuple[float, float]]
  seconds: float
  best: Tuple[float, float] = (0.0, 0.0)


def grid(**axes: Sequence) -> List[Dict]:
  """Every combination of the given hyperparameter values, in order."""
  names = list(axes)
  return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def _key(params: Dict) -> str:
  return ','.join(f'{k}={v}' for k, v in params.items())


def tune(evaluate: Callable[[Dict], np.ndarray], candidates: List[Dict]) -> Tuned:
  """Picks the candidate with the best validation Recall@10 (then NDCG@10, then grid order).

  Args:
    evaluate: params -> validation ranks (the model fit on train, scored on valid).
    candidates: Hyperparameter dicts to try.
  """
  start = time.time()
  valid = {}
  best, best_value = None, None
  for params in candidates:
    value = _recall_at_10(evaluate(params))
    valid[_key(params)] = value
    if best_value is None or value > best_value:
      best, best_value = params, value
  return Tuned(best, valid, time.time() - start, best_value)


# Validation grids: small, around the values that do well on Online Retail-like purchase data.
ITEMKNN_GRID = grid(neighbours=[10, 20, 50, 100, 200, 0], shrink=[0.0, 10.0, 100.0])
ALS_GRID = grid(factors=[128, 256], regularization=[0.1, 1.0], alpha=[2.0, 5.0],
                iterations=[15, 30])
TEXT_WEIGHTS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
BM25_GRID = grid(k1=[0.5, 1.2, 2.0], b=[0.25, 0.75, 1.0])


# Every baseline of evaluate_baselines, and the collaborative recommenders the pipeline's
# Baselines component runs (the classic recommenders a shop would otherwise use).
ALL_BASELINES = ('popularity', 'itemknn', 'als', 'hybrid', 'bm25')
RECOMMENDERS = ('popularity', 'itemknn', 'als')


def evaluate_baselines(split: Split, items_path: Optional[str],
                       log: Callable[[str], None] = lambda message: None,
                       names: Sequence[str] = ALL_BASELINES) -> Dict:
  """Tunes every baseline on validation, refits on train + validation, scores test.

  Args:
    split: The exported split.
    items_path: The items file (titles for the hybrid, lexical search and the search queries);
      None without those two.
    log: Called with one progress line per step.
    names: Which baselines (ALL_BASELINES; the hybrid needs ALS).

  Returns:
    {model name: {'recommendation': metrics | None, 'cold_start': metrics | None,
    'search': metrics | None, 'params': chosen hyperparameters, 'validation': grid results,
    'validation_recall@10': the chosen hyperparameters' validation Recall@10 (fit on train;
    None for search-only models), 'seconds': {'tune': s, 'fit': s, 'score': s}}}, metrics as
    trainers.metrics.rank_metrics.
  """
  unknown = set(names) - set(ALL_BASELINES)
  if unknown or ('hybrid' in names and 'als' not in names):
    raise ValueError(f'baselines {sorted(names)}: expected some of {ALL_BASELINES} '
                     '(the hybrid with ALS)')
  # Item text only for the models that read it (the hybrid, lexical search).
  uses_text = bool({'hybrid', 'bm25'} & set(names))
  texts = item_texts(items_path) if uses_text else {}
  titles = item_titles(items_path) if uses_text else {}
  cold = cold_start(split.fit, split.test)
  search_valid = search_queries(split.valid, titles) if uses_text else []
  search_test = search_queries(split.test, titles) if uses_text else []
  results = {}

  def report(name, tuned, model, search=False, recommend=True):
    """Fits `model` on train + validation, scores test, records the entry."""
    start = time.time()
    model.fit(split.fit)
    fitted = time.time()
    entry = {'params': tuned.params if tuned else {},
             'validation': tuned.valid if tuned else {},
             'validation_recall@10': tuned.best[0] if tuned and recommend else None,
             'recommendation': None, 'cold_start': None, 'search': None}
    if recommend:
      ranks = recommendation_ranks(model, split.test)
      entry['recommendation'] = _rank_metrics(ranks)
      entry['cold_start'] = _rank_metrics(ranks[cold])
    if search:
      entry['search'] = _rank_metrics(search_ranks(model, split.test, search_test))
    entry['seconds'] = {'tune': round(tuned.seconds, 2) if tuned else 0.0,
                        'fit': round(fitted - start, 2),
                        'score': round(time.time() - fitted, 2)}
    entry['cold_start_users'] = int(cold.sum())
    results[name] = entry
    log(f'{name}: {_key(entry["params"]) or "no hyperparameters"} '
        f'(tune {entry["seconds"]["tune"]:.1f} s, fit {entry["seconds"]["fit"]:.1f} s, '
        f'score {entry["seconds"]["score"]:.1f} s)')
    return model

  if 'popularity' in names:
    # Nothing to tune; its validation score is still the bar the gate compares against.
    popularity_tuned = tune(lambda params: recommendation_ranks(Popularity().fit(split.train),
                                                                split.valid), [{}])
    report('popularity', popularity_tuned, Popularity())
  if 'itemknn' in names:
    _itemknn(split, report)
  if 'als' in names:
    als, als_chosen, als_tuned = _als(split, report)
  if 'hybrid' in names:
    _hybrid(split, report, texts, als, als_chosen, als_tuned)
  if 'bm25' in names:
    bm25_tuned = tune(
        lambda params: search_ranks(BM25(texts, **params).fit(split.train), split.valid,
                                    search_valid), BM25_GRID)
    report('bm25', bm25_tuned, BM25(texts, **bm25_tuned.params), search=True, recommend=False)
  return results


def _itemknn(split: Split, report) -> None:
  # ItemKNN: one cosine matrix per shrinkage, cut to each neighbourhood size.
  knn_on_train = {}

  def knn_valid(params):
    if params['shrink'] not in knn_on_train:
      knn_on_train[params['shrink']] = ItemKNN(shrink=params['shrink']).fit(split.train)
    model = knn_on_train[params['shrink']].with_neighbours(params['neighbours'])
    return recommendation_ranks(model, split.valid)

  knn_tuned = tune(knn_valid, ITEMKNN_GRID)
  knn_on_train.clear()
  report('itemknn', knn_tuned, ItemKNN(**knn_tuned.params))


def _als(split: Split, report):
  # ALS; the fits on train are kept so that the hybrid's tuning reuses the chosen one.
  als_on_train = {}

  def als_valid(params):
    als_on_train[_key(params)] = ALS(**params).fit(split.train)
    return recommendation_ranks(als_on_train[_key(params)], split.valid)

  als_tuned = tune(als_valid, ALS_GRID)
  als_chosen = als_on_train[_key(als_tuned.params)]
  als_on_train.clear()
  als = report('als', als_tuned, ALS(**als_tuned.params))
  return als, als_chosen, als_tuned


def _hybrid(split: Split, report, texts, als, als_chosen, als_tuned) -> None:
  # The hybrid takes ALS's tuned factors; only the blend weight is tuned (no ALS refit).
  start = time.time()
  valid_hybrid = Hybrid(texts, als=als_chosen).fit(split.train)
  hybrid_tuned = tune(
      lambda params: recommendation_ranks(valid_hybrid.with_weight(params['text_weight']),
                                          split.valid),
      grid(text_weight=TEXT_WEIGHTS))
  hybrid_tuned.seconds = als_tuned.seconds + time.time() - start
  report('hybrid', Tuned({**als_tuned.params, **hybrid_tuned.params}, hybrid_tuned.valid,
                         hybrid_tuned.seconds, hybrid_tuned.best),
         Hybrid(texts, text_weight=hybrid_tuned.params['text_weight'], als=als), search=True)
