"""The online feature store (each user's recent distinct items) and the item title cache.

Two stores with one interface (`history`, `apply`):

- `RedisFeatureStore`: per user a Redis list `<prefix>hist:<user>` of item ids, most recent last
  and capped at N (what `GET /recommend` reads, one LRANGE), and a hash `<prefix>hkey:<user>`
  holding each listed item's latest (timestamp, sequence), which the merge needs to place a late
  or replayed event correctly. Applied event keys are remembered for the dedup window as
  `<prefix>seen:<key>` with a TTL. `apply` writes all of it and acknowledges the stream entries
  in one MULTI/EXEC transaction (WATCHing the users' keys), so an event's effect and its
  acknowledgement are persisted together or not at all.
- `EmbeddedFeatureStore`: the same in process memory, for the zero-dependency demo and tests.

Both apply events with serving.realtime.events' plain functions (deduplicate, merge_entries).
"""

import collections
import dataclasses
import threading
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import redis
from redis import backoff as redis_backoff
from redis import retry as redis_retry

from serving import client as client_lib
from serving.realtime import events as ev

DEFAULT_PREFIX = 'rt:'
DEFAULT_DEDUP_TTL_S = 24 * 3600


class StoreUnavailable(Exception):
  """The feature store cannot be reached now (the caller falls back)."""


@dataclasses.dataclass
class ApplyResult:
  """What applying a batch of events did.

  Attributes:
    changed: user -> the new history (item ids, most recent last), for users whose history
      changed.
    applied: events that were new (not duplicates).
    duplicates: events dropped as duplicates (in the batch, or within the dedup window).
  """
  changed: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
  applied: int = 0
  duplicates: int = 0


def _merge_users(current: Dict[str, List[ev.Entry]], kept: Sequence[ev.Sequenced], size: int
                ) -> Dict[str, List[ev.Entry]]:
  """The new entries of each user whose history the kept events change."""
  new: Dict[str, List[ev.Entry]] = collections.defaultdict(list)
  for event, seq in kept:
    new[event.user_id].append(ev.entry(event, seq))
  merged = {}
  for user, entries in new.items():
    result = ev.merge_entries(current.get(user, []), entries, size)
    if result != sorted(current.get(user, [])):
      merged[user] = result
  return merged


class EmbeddedFeatureStore:
  """The feature store in this process's memory (lost when it exits)."""

  name = 'embedded'

  def __init__(self, history_size: int = ev.DEFAULT_HISTORY_SIZE, dedup_window: int = 1_000_000):
    """Creates an empty store.

    Args:
      history_size: N, the distinct items kept per user.
      dedup_window: how many recent event keys are remembered to drop duplicates.
    """
    self.history_size = history_size
    self._entries: Dict[str, List[ev.Entry]] = {}
    self._seen: 'collections.OrderedDict[str, None]' = collections.OrderedDict()
    self._dedup_window = dedup_window
    self._lock = threading.Lock()

  def history(self, user_id: str) -> List[str]:
    """The user's recent distinct items, most recent last ([] for an unknown user)."""
    return ev.history_items(self._entries.get(user_id, []))

  def apply(self, events: Sequence[ev.Sequenced]) -> ApplyResult:
    """Deduplicates and merges (event, sequence) pairs into the users' histories."""
    with self._lock:
      kept, duplicates = ev.deduplicate(events, seen=[
          e.dedup_key() for e, _ in events if e.dedup_key() in self._seen])
      merged = _merge_users(self._entries, kept, self.history_size)
      self._entries.update(merged)
      for event, _ in kept:
        self._seen[event.dedup_key()] = None
      while len(self._seen) > self._dedup_window:
        self._seen.popitem(last=False)
    return ApplyResult({u: ev.history_items(e) for u, e in merged.items()}, len(kept), duplicates)

  def ping(self) -> bool:
    return True

  def close(self):
    pass


def redis_client(url: str, timeout_s: float = 0.25,
                 encoding_errors: str = 'strict') -> redis.Redis:
  """A client that fails fast (no retries) so that callers can fall back at once.

  `encoding_errors='surrogateescape'` decodes replies that are not UTF-8 instead of failing them
  (the bytes go back to Redis unchanged).
  """
  return redis.Redis.from_url(url, decode_responses=True, encoding_errors=encoding_errors,
                              socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                              retry=redis_retry.Retry(redis_backoff.NoBackoff(), 0))


class RedisFeatureStore:
  """The feature store in Redis (layout in the module docstring)."""

  name = 'redis'

  def __init__(self, url: str, history_size: int = ev.DEFAULT_HISTORY_SIZE,
               prefix: str = DEFAULT_PREFIX, dedup_ttl_s: int = DEFAULT_DEDUP_TTL_S,
               timeout_s: float = 0.25, retry_after_s: float = 0.5):
    """Connects lazily (the first command opens the connection; later ones reconnect).

    Args:
      url: redis://host:port/db.
      history_size: N, the distinct items kept per user.
      prefix: prefix of every key.
      dedup_ttl_s: how long applied event keys are remembered to drop duplicates.
      timeout_s: socket timeout of each command.
      retry_after_s: after a failed command, `history` fails at once for this long instead of
        waiting on a dead server again (a circuit breaker; requests fall back meanwhile).
    """
    self.url = url
    self.history_size = history_size
    self.prefix = prefix
    self.dedup_ttl_s = dedup_ttl_s
    self.client = redis_client(url, timeout_s)
    self._retry_after_s = retry_after_s
    self._down_until = 0.0

  def hist_key(self, user_id: str) -> str:
    return f'{self.prefix}hist:{user_id}'

  def entries_key(self, user_id: str) -> str:
    return f'{self.prefix}hkey:{user_id}'

  def seen_key(self, event: ev.Event) -> str:
    return f'{self.prefix}seen:{event.dedup_key()}'

  def _guard(self):
    if time.monotonic() < self._down_until:
      raise StoreUnavailable(f'redis at {self.url} was unreachable less than '
                             f'{self._retry_after_s} s ago')

  def _failed(self, error: Exception) -> StoreUnavailable:
    self._down_until = time.monotonic() + self._retry_after_s
    return StoreUnavailable(f'redis at {self.url}: {error}')

  def history(self, user_id: str) -> List[str]:
    """The user's recent distinct items, most recent last ([] for an unknown user).

    Raises:
      StoreUnavailable: Redis did not answer (now, or within the last retry_after_s).
    """
    self._guard()
    try:
      return self.client.lrange(self.hist_key(user_id), 0, -1)
    except redis.RedisError as e:
      raise self._failed(e) from e

  def entries(self, user_id: str) -> List[ev.Entry]:
    """The user's history entries ((timestamp, sequence, item), oldest first)."""
    raw = self.client.hgetall(self.entries_key(user_id))
    return sorted(ev.decode_entry(item, text) for item, text in raw.items())

  def apply(self, events: Sequence[ev.Sequenced],
            ack: Optional[Tuple[str, str, Sequence[str]]] = None,
            dead_letters: Iterable[Tuple[str, Dict[str, str]]] = ()) -> ApplyResult:
    """Deduplicates and merges events into Redis; acknowledges stream entries in the same EXEC.

    Args:
      events: (event, sequence) pairs.
      ack: (stream, group, entry ids) to XACK in the transaction.
      dead_letters: (stream, fields) entries to XADD in the transaction (malformed events).

    Raises:
      redis.RedisError: Redis failed; nothing of the batch was applied nor acknowledged.
    """
    kept, in_batch = ev.deduplicate(events)
    dead_letters = list(dead_letters)
    users = sorted({event.user_id for event, _ in kept})
    with self.client.pipeline() as pipe:
      while True:
        try:
          if users:
            # Another consumer of the group may apply events of the same users meanwhile.
            pipe.watch(*[self.entries_key(u) for u in users])
          reader = self.client.pipeline(transaction=False)
          for user in users:
            reader.hgetall(self.entries_key(user))
          for event, _ in kept:
            reader.exists(self.seen_key(event))
          answers = reader.execute() if users else []
          current = {user: sorted(ev.decode_entry(i, t) for i, t in raw.items())
                     for user, raw in zip(users, answers)}
          new = [pair for pair, seen in zip(kept, answers[len(users):]) if not seen]
          merged = _merge_users(current, new, self.history_size)
          pipe.multi()
          self._write(pipe, merged)
          for event, _ in new:
            pipe.set(self.seen_key(event), '1', ex=self.dedup_ttl_s)
          for stream, fields in dead_letters:
            pipe.xadd(stream, fields, maxlen=100_000, approximate=True)
          if ack and ack[2]:
            pipe.xack(ack[0], ack[1], *ack[2])
          pipe.execute()
          break
        except redis.WatchError:
          continue
    return ApplyResult({u: ev.history_items(e) for u, e in merged.items()}, len(new),
                       in_batch + len(kept) - len(new))

  def merge(self, entries_by_user: Dict[str, Sequence[ev.Entry]]) -> Dict[str, List[str]]:
    """Merges already combined entries (e.g. a Beam pane's) into the users' histories.

    Returns:
      user -> the new history, for users whose history changed.
    """
    users = sorted(entries_by_user)
    if not users:
      return {}
    with self.client.pipeline() as pipe:
      while True:
        try:
          pipe.watch(*[self.entries_key(u) for u in users])
          reader = self.client.pipeline(transaction=False)
          for user in users:
            reader.hgetall(self.entries_key(user))
          current = {user: sorted(ev.decode_entry(i, t) for i, t in raw.items())
                     for user, raw in zip(users, reader.execute())}
          merged = {}
          for user in users:
            result = ev.merge_entries(current[user], entries_by_user[user], self.history_size)
            if result != current[user]:
              merged[user] = result
          pipe.multi()
          self._write(pipe, merged)
          pipe.execute()
          return {u: ev.history_items(e) for u, e in merged.items()}
        except redis.WatchError:
          continue

  def _write(self, pipe, merged: Dict[str, List[ev.Entry]]):
    for user, entries in merged.items():
      pipe.delete(self.hist_key(user), self.entries_key(user))
      pipe.rpush(self.hist_key(user), *ev.history_items(entries))
      pipe.hset(self.entries_key(user), mapping={e[2]: ev.encode_entry(e) for e in entries})

  def ping(self) -> bool:
    """Whether Redis answers now (this also ends the circuit breaker's wait)."""
    try:
      self.client.ping()
    except redis.RedisError:
      return False
    self._down_until = 0.0
    return True

  def close(self):
    self.client.close()


class HistoryMirror:
  """The last histories this process read or wrote, answered while Redis is unreachable."""

  def __init__(self, max_users: int = 100_000):
    self._histories: 'collections.OrderedDict[str, Tuple[str, ...]]' = collections.OrderedDict()
    self._max_users = max_users
    self._lock = threading.Lock()

  def put(self, user_id: str, history: Sequence[str]):
    with self._lock:
      self._histories[user_id] = tuple(history)
      self._histories.move_to_end(user_id)
      while len(self._histories) > self._max_users:
        self._histories.popitem(last=False)

  def get(self, user_id: str) -> List[str]:
    return list(self._histories.get(user_id, ()))


class ItemCatalog:
  """Item metadata for rendering results: titles from the contract's items file."""

  def __init__(self, titles: Optional[Dict[str, str]] = None):
    self._titles = dict(titles or {})

  @classmethod
  def from_csv(cls, path: Optional[str]) -> 'ItemCatalog':
    return cls(client_lib.read_titles(path) if path else {})

  def title(self, item_id: str) -> str:
    """The item's title, '' for an item not in the file."""
    return self._titles.get(item_id, '')

  def __len__(self):
    return len(self._titles)
