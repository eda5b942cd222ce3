"""Baselines scored on the exported split with the protocol of GUIDE §3.

Baselines are fit on train + validation before scoring test (GUIDE §3 step 5); the catalog is
the items of the data they were fit on; the user's fit items are excluded from ranking.
"""

import collections
import csv
import math
import os
from typing import Dict, List, Tuple

from trainers import metrics

Pairs = List[Tuple[str, str]]


def read_pairs(path: str) -> Pairs:
  """Reads a `user_id,item_id` split CSV."""
  with open(path, newline='') as f:
    return [(row['user_id'], row['item_id']) for row in csv.DictReader(f)]


def popularity_ranks(fit: Pairs, test: Pairs) -> List[float]:
  """Rank of each test target when the catalog is ordered by interaction count.

  Ties in count are broken by item id, so the ranking is deterministic.

  Args:
    fit: (user, item) pairs the baseline is fit on.
    test: (user, target) pairs to score.

  Returns:
    One 1-based rank per test pair (inf when the target is not in the catalog).
  """
  counts = collections.Counter(item for _, item in fit)
  order = sorted(counts, key=lambda item: (-counts[item], item))
  position = {item: index for index, item in enumerate(order)}
  seen: Dict[str, set] = collections.defaultdict(set)
  for user, item in fit:
    seen[user].add(item)
  ranks = []
  for user, target in test:
    if target not in position:
      ranks.append(math.inf)
      continue
    ahead = sum(1 for item in seen[user] if position[item] < position[target])
    ranks.append(float(position[target] + 1 - ahead))
  return ranks


def popularity(split_dir: str) -> Dict[str, float]:
  """Popularity baseline metrics on the test split of an exported split directory."""
  fit = read_pairs(os.path.join(split_dir, 'train.csv')) + read_pairs(
      os.path.join(split_dir, 'valid.csv'))
  test = read_pairs(os.path.join(split_dir, 'test.csv'))
  return metrics.rank_metrics(popularity_ranks(fit, test))
