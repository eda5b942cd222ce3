"""The event log on Redis Streams: producers XADD, a consumer group applies and acknowledges.

    RedisEventLog.append    XADD of validated events (what POST /events does)
    StreamConsumer          XREADGROUP -> validate -> deduplicate -> merge into the feature store,
                            XACK in the same MULTI/EXEC as the writes (RedisFeatureStore.apply)

Delivery is at least once and the effect is exactly once: an entry is acknowledged only in the
transaction that applies it, so a consumer that dies (or a Redis that restarts) between reading
and applying leaves the entry pending, and the merge is idempotent. After a (re)connect the
consumer first re-reads its own pending entries (XREADGROUP from id 0); entries pending at a
consumer that never came back are taken over with XAUTOCLAIM once idle for `claim_idle_ms`.
With Redis persistence on (appendonly yes), the stream, the group's pending list, the histories
and the acknowledgements survive a restart together.

Poison entries never stop the consumer nor delay another entry: an entry that does not parse
(another producer may write the stream), or whose apply fails by itself with an error other
than Redis', is copied to the dead-letter stream (`<stream>:dead`) with its fields plus `error`
(the reason) and `entry_id`, acknowledged in the same MULTI/EXEC, and counted (`dead_lettered`);
the rest of its batch is applied. A Redis error leaves the batch pending (a transient fault,
retried), but an entry re-delivered `max_deliveries` times (XPENDING's delivery count) is then
applied alone, and dead-lettered if even that fails for a reason other than a lost connection.
"""

import logging
import re
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import redis

from serving.realtime import events as ev
from serving.realtime import store as store_lib

log = logging.getLogger('realtime.stream')

DEFAULT_GROUP = 'realtime'
DEFAULT_MAX_DELIVERIES = 5
DEAD_LETTER_MAXLEN = 100_000
# Error replies of a server that is unable for now (memory, a replica, loading, a failover):
# the entry is not the cause, so it stays pending whatever its delivery count.
_TRANSIENT_REPLY = re.compile(r'\b(OOM|READONLY|LOADING|BUSY|MASTERDOWN|NOREPLICAS|TRYAGAIN|'
                              r'CLUSTERDOWN|MISCONF|NOGROUP|NOSCRIPT|EXECABORT)\b')

Fields = Dict[str, str]


def stream_key(prefix: str = store_lib.DEFAULT_PREFIX) -> str:
  return f'{prefix}events'


def _transient(error: Exception) -> bool:
  """Whether a failure is Redis' (the entry may succeed later) rather than the entry's."""
  if not isinstance(error, redis.RedisError):
    return False
  if not isinstance(error, redis.ResponseError):
    return True  # connection lost, timeout, server loading
  return bool(_TRANSIENT_REPLY.search(str(error)))


class RedisEventLog:
  """Appends events to the stream."""

  def __init__(self, url: str, stream: str, maxlen: Optional[int] = 1_000_000,
               timeout_s: float = 0.5):
    """Connects lazily.

    Args:
      url: redis://host:port/db.
      stream: the stream's key.
      maxlen: approximate cap on the stream's length (XADD MAXLEN ~); entries beyond it are
        trimmed oldest first, so it must exceed any backlog the consumers may build up.
      timeout_s: socket timeout.
    """
    self.stream = stream
    self._maxlen = maxlen
    self.client = store_lib.redis_client(url, timeout_s)

  def append(self, events: Sequence[ev.Event]) -> List[str]:
    """XADDs the events in order; returns their entry ids.

    Raises:
      redis.RedisError: Redis failed; the caller must treat the events as not accepted (a
        retry is safe: duplicates are dropped by the consumer).
    """
    pipe = self.client.pipeline(transaction=False)
    for event in events:
      pipe.xadd(self.stream, event.to_fields(), maxlen=self._maxlen, approximate=True)
    return pipe.execute()

  def close(self):
    self.client.close()


class StreamConsumer:
  """One consumer of the group, applying entries to a RedisFeatureStore in a thread."""

  def __init__(self, store: store_lib.RedisFeatureStore, stream: str,
               group: str = DEFAULT_GROUP, consumer: Optional[str] = None, batch_size: int = 256,
               block_ms: int = 200, claim_idle_ms: int = 30_000,
               on_applied: Callable[[store_lib.ApplyResult], None] = lambda result: None,
               dead_stream: Optional[str] = None,
               max_deliveries: int = DEFAULT_MAX_DELIVERIES):
    """Sets the consumer up; `start()` runs it.

    Args:
      store: where events are applied (its client also reads the stream).
      stream: the stream's key.
      group: the consumer group.
      consumer: this consumer's name, stable across restarts of the same instance so that it
        re-reads its own pending entries (default: hostname).
      batch_size: entries per XREADGROUP.
      block_ms: how long XREADGROUP waits for new entries.
      claim_idle_ms: other consumers' pending entries idle this long are claimed.
      on_applied: called with each batch's ApplyResult (cache invalidation, mirrors).
      dead_stream: the dead-letter stream's key (default `<stream>:dead`).
      max_deliveries: an entry delivered this many times without being acknowledged is applied
        alone, and dead-lettered if that fails for any reason but a lost connection.
    """
    self.store = store
    self.stream = stream
    self.dead_stream = dead_stream or f'{stream}:dead'
    self.max_deliveries = max_deliveries
    self.group = group
    self.consumer = consumer or socket.gethostname()
    self._batch_size = batch_size
    self._block_ms = block_ms
    self._claim_idle_ms = claim_idle_ms
    self._on_applied = on_applied
    # surrogateescape: an entry that is not UTF-8 must not fail the whole XREADGROUP reply; its
    # fields fail parse_event (dead-lettered) and go back to Redis byte for byte.
    self._client = store_lib.redis_client(store.url, timeout_s=block_ms / 1000 + 2,
                                          encoding_errors='surrogateescape')
    self._redelivered = False
    self._group_ready = False
    self._own_pending_done = False
    self._next_claim = 0.0
    self._claim_start = '0-0'
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.connected = False
    self.counters: Dict[str, int] = {'entries': 0, 'applied': 0, 'duplicates': 0,
                                     'malformed': 0, 'dead_lettered': 0, 'reclaimed': 0,
                                     'batches': 0, 'redis_errors': 0}
    self.last_error = ''

  @property
  def dead_lettered(self) -> int:
    """Entries copied to the dead-letter stream (and acknowledged) by this consumer."""
    return self.counters['dead_lettered']

  def _ensure_group(self):
    try:
      # From the start of the stream: if Redis lost the group, everything is replayed, which
      # is safe because applying is idempotent.
      self._client.xgroup_create(self.stream, self.group, id='0', mkstream=True)
      log.info('created consumer group %s on %s', self.group, self.stream)
    except redis.ResponseError as e:
      if 'BUSYGROUP' not in str(e):
        raise
    self._group_ready = True

  def _read(self) -> List[Tuple[str, Dict[str, str]]]:
    if not self._own_pending_done:
      answer = self._client.xreadgroup(self.group, self.consumer, {self.stream: '0'},
                                       count=self._batch_size)
      entries = answer[0][1] if answer else []
      if entries:
        self.counters['reclaimed'] += len(entries)
        log.info('re-reading %d pending entries of consumer %s', len(entries), self.consumer)
      else:
        self._own_pending_done = True
      self._redelivered = True
      return entries
    if time.monotonic() >= self._next_claim:
      answer = self._client.xautoclaim(self.stream, self.group, self.consumer,
                                       self._claim_idle_ms, self._claim_start,
                                       count=self._batch_size)
      next_start, entries = answer[0], answer[1]  # Redis 7 adds the deleted ids
      self._claim_start = next_start
      if next_start == '0-0':
        self._next_claim = time.monotonic() + self._claim_idle_ms / 1000 / 2
      if entries:
        self.counters['reclaimed'] += len(entries)
        log.info('claimed %d entries idle > %d ms from other consumers', len(entries),
                 self._claim_idle_ms)
        self._redelivered = True
        return entries
    answer = self._client.xreadgroup(self.group, self.consumer, {self.stream: '>'},
                                     count=self._batch_size, block=self._block_ms)
    self._redelivered = False  # first deliveries
    return answer[0][1] if answer else []

  def _deliveries(self, entry_ids: Sequence[str]) -> Dict[str, int]:
    """How many times each entry was delivered (XPENDING), for entries at max_deliveries or more.
    """
    first = min(entry_ids, key=ev.stream_sequence)
    last = max(entry_ids, key=ev.stream_sequence)
    rows = self._client.xpending_range(self.stream, self.group, first, last,
                                       count=len(entry_ids) + self._batch_size,
                                       consumername=self.consumer)
    wanted = set(entry_ids)
    return {row['message_id']: row['times_delivered'] for row in rows
            if row['message_id'] in wanted and row['times_delivered'] >= self.max_deliveries}

  def _dead_letter(self, dead: Sequence[Tuple[str, Fields, str]], ack: Sequence[str] = ()):
    """XADDs entries to the dead-letter stream and XACKs them (and `ack`) in one MULTI/EXEC."""
    ids = [entry_id for entry_id, _, _ in dead] + list(ack)
    if not ids:
      return
    with self._client.pipeline(transaction=True) as pipe:
      for entry_id, fields, reason in dead:
        pipe.xadd(self.dead_stream, self._dead_fields(entry_id, fields, reason),
                  maxlen=DEAD_LETTER_MAXLEN, approximate=True)
      pipe.xack(self.stream, self.group, *ids)
      pipe.execute()
    self.counters['dead_lettered'] += len(dead)

  @staticmethod
  def _dead_fields(entry_id: str, fields: Fields, reason: str) -> Fields:
    log.warning('dead-lettering stream entry %s: %s', entry_id, reason)
    return {**fields, 'error': reason, 'entry_id': entry_id}

  def _apply_alone(self, entry_id: str, fields: Fields, pair: ev.Sequenced,
                   deliveries: Optional[int] = None) -> Optional[store_lib.ApplyResult]:
    """Applies one entry with its own XACK; dead-letters it if that fails because of the entry.

    Raises:
      redis.RedisError: a transient Redis failure; the entry stays pending. Without
        `deliveries` (an entry not yet re-delivered too often) any Redis error is transient.
    """
    try:
      return self.store.apply([pair], ack=(self.stream, self.group, [entry_id]))
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, redis.RedisError) and (deliveries is None or _transient(e)):
        raise
      reason = f'apply failed: {type(e).__name__}: {e}'.replace('\n', ' ')
      if deliveries is not None:
        reason = f'delivered {deliveries} times; {reason}'
      self._dead_letter([(entry_id, fields, reason)])
      return None

  def _apply(self, entries: List[Tuple[str, Optional[Fields]]]):
    """Applies a batch: poison entries are dead-lettered, the others applied and acknowledged.

    Raises:
      redis.RedisError: a transient Redis failure; the entries not yet applied stay pending.
    """
    suspects = self._deliveries([i for i, _ in entries]) if self._redelivered else {}
    events, dead, alone, empty = [], [], [], []
    for entry_id, fields in entries:
      if not fields:
        empty.append(entry_id)  # trimmed from the stream while pending: nothing left to apply
        continue
      try:
        pair = (ev.parse_event(fields), ev.stream_sequence(entry_id))
      except Exception as e:  # pylint: disable=broad-except
        # parse_event raises only EventError; anything else is a bug, and still this entry's.
        reason = str(e) if isinstance(e, ev.EventError) else f'{type(e).__name__}: {e}'
        dead.append((entry_id, fields, reason.replace('\n', ' ')))
        continue
      if entry_id in suspects:
        alone.append((entry_id, fields, pair, suspects[entry_id]))
      else:
        events.append((entry_id, fields, pair))
    self.counters['entries'] += len(entries)
    self.counters['batches'] += 1
    total = store_lib.ApplyResult()
    try:
      batch_ids = empty + [i for i, _, _ in dead] + [i for i, _, _ in events]
      try:
        result = self.store.apply(
            [pair for _, _, pair in events], ack=(self.stream, self.group, batch_ids),
            dead_letters=[(self.dead_stream, self._dead_fields(i, f, r)) for i, f, r in dead])
      except redis.RedisError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # One entry's apply fails (a bug, a corrupt key): find it by applying them one by one.
        log.warning('applying %d entries failed (%s: %s); applying them one by one',
                    len(events), type(e).__name__, e)
        self._dead_letter(dead, ack=empty)
        self.counters['malformed'] += len(dead)
        for entry_id, fields, pair in events:
          self._add(total, self._apply_alone(entry_id, fields, pair))
      else:
        # Counted once written: a reader of the counters then finds them in the dead stream.
        self.counters['dead_lettered'] += len(dead)
        self.counters['malformed'] += len(dead)
        self._add(total, result)
      for entry_id, fields, pair, deliveries in alone:
        log.warning('stream entry %s delivered %d times: applying it alone', entry_id,
                    deliveries)
        self._add(total, self._apply_alone(entry_id, fields, pair, deliveries))
    finally:
      self.counters['applied'] += total.applied
      self.counters['duplicates'] += total.duplicates
      self._on_applied(total)

  @staticmethod
  def _add(total: store_lib.ApplyResult, result: Optional[store_lib.ApplyResult]):
    if result is not None:
      total.changed.update(result.changed)
      total.applied += result.applied
      total.duplicates += result.duplicates

  def run_once(self) -> int:
    """Reads and applies one batch; returns the number of entries (0 when there were none).

    Raises:
      redis.RedisError: Redis failed; the batch stays pending and is re-read after reconnect.
    """
    try:
      if not self._group_ready:
        self._ensure_group()
      entries = self._read()
      if entries:
        self._apply(entries)
      self.connected = True
      return len(entries)
    except redis.ResponseError as e:
      if 'NOGROUP' in str(e):  # Redis came back without the group (no persistence)
        self._group_ready = False
      raise
    except redis.RedisError:
      self._group_ready = False
      self._own_pending_done = False  # entries read before the failure may be unapplied
      self.connected = False
      raise

  def _run(self):
    delay = 0.05
    while not self._stop.is_set():
      try:
        self.run_once()
        delay = 0.05
      except redis.RedisError as e:
        self.counters['redis_errors'] += 1
        if str(e) != self.last_error:
          log.warning('stream consumer: %s (retrying)', e)
        self.last_error = str(e)
        self._stop.wait(delay)
        delay = min(1.0, delay * 2)
      except Exception:  # pylint: disable=broad-except
        # A bug on one batch must not stop the stream: the batch stays pending and is
        # retried once XAUTOCLAIM finds it idle.
        self.counters['errors'] = self.counters.get('errors', 0) + 1
        log.exception('stream consumer: unexpected error (the batch stays pending)')
        self._stop.wait(1.0)

  def start(self) -> 'StreamConsumer':
    self._thread = threading.Thread(target=self._run, name='stream-consumer', daemon=True)
    self._thread.start()
    return self

  def stop(self):
    self._stop.set()
    if self._thread:
      self._thread.join(timeout=self._block_ms / 1000 + 5)
    self._client.close()

  def pending(self) -> Optional[int]:
    """Entries delivered to the group and not yet acknowledged (None if Redis is down)."""
    try:
      return self._client.xpending(self.stream, self.group)['pending']
    except redis.RedisError:
      return None

  def lag(self) -> Optional[int]:
    """Entries not yet delivered to the group (None if unknown)."""
    try:
      for group in self._client.xinfo_groups(self.stream):
        if group['name'] == self.group:
          return group.get('lag')
    except redis.RedisError:
      return None
    return None
