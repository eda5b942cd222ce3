"""The evaluation protocol of docs/contracts.md §2, for one user's events.

Kept free of Beam and TensorFlow so that the split is easy to test against hand-made cases and
the same code runs in every Beam worker.
"""

import dataclasses
import random
import re
import zlib
from typing import Iterable, List, Optional, Tuple

# (timestamp, row index in the file, item_id, query) of one interaction.
Event = Tuple[int, int, str, str]

MIN_DISTINCT_ITEMS_FOR_EVAL = 3


@dataclasses.dataclass
class UserSplit:
  """One user's distinct items split per the protocol.

  Attributes:
    sequence: Distinct items with the (timestamp, query) of their first occurrence, in order.
    n_train: How many leading items of `sequence` are training history.
    valid: Index of the validation target in `sequence`, or None (fewer than 3 items).
    test: Index of the test target in `sequence`, or None.
  """
  sequence: List[Tuple[str, int, str]]
  n_train: int
  valid: Optional[int]
  test: Optional[int]


def split_user(events: Iterable[Event]) -> UserSplit:
  """Orders a user's events by (timestamp, row order), keeps first occurrences, splits them.

  Args:
    events: The user's interactions in any order (Beam gives no order).

  Returns:
    The UserSplit: users with fewer than 3 distinct items are training data only; otherwise
    the last distinct item is the test target and the one before it the validation target.
  """
  seen = set()
  sequence = []
  for timestamp, _, item, query in sorted(events, key=lambda e: (e[0], e[1])):
    if item not in seen:
      seen.add(item)
      sequence.append((item, timestamp, query))
  n = len(sequence)
  if n < MIN_DISTINCT_ITEMS_FOR_EVAL:
    return UserSplit(sequence, n, None, None)
  return UserSplit(sequence, n - 2, n - 2, n - 1)


# Search protocol for data without real queries (docs/contracts.md §2): each evaluated target
# gets one query of 2-3 words of its title, in title order, drawn with a seed made of the user
# and the item, so that every model (and every rerun) is scored on the same queries.
SEARCH_QUERY_WORDS = (2, 3)
_WORD = re.compile(r"[0-9a-z]+(?:'[0-9a-z]+)?")


def title_words(title: str) -> List[str]:
  """Lower-cased words of a title (letters and digits; apostrophes inside words kept)."""
  return _WORD.findall(title.lower())


def search_query(user: str, item: str, title: str) -> str:
  """The protocol's query for `user`'s target `item`: 2-3 words of `title`, or '' if none.

  Args:
    user: the user id (part of the seed).
    item: the target item id (part of the seed).
    title: the target's title.

  Returns:
    Words of the title in their order, joined by spaces; all of them when the title has fewer
    words than drawn.
  """
  words = title_words(title)
  rng = random.Random(zlib.crc32(f'{user}\t{item}'.encode()))
  count = min(len(words), rng.choice(SEARCH_QUERY_WORDS))
  return ' '.join(words[i] for i in sorted(rng.sample(range(len(words)), count)))
