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
and the acknowledgements survive a restart together. A malformed entry (another producer may
write the stream) is copied to `<stream>:dead` with the reason, acknowledged and counted; it
never stops the consumer.
"""

import logging
import socket
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import redis

from serving.realtime import events as ev
from serving.realtime import store as store_lib

log = logging.getLogger('realtime.stream')

DEFAULT_GROUP = 'realtime'


def stream_key(prefix: str = store_lib.DEFAULT_PREFIX) -> str:
  return f'{prefix}events'


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
               on_applied: Callable[[store_lib.ApplyResult], None] = lambda result: None):
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
    """
    self.store = store
    self.stream = stream
    self.dead_stream = f'{stream}:dead'
    self.group = group
    self.consumer = consumer or socket.gethostname()
    self._batch_size = batch_size
    self._block_ms = block_ms
    self._claim_idle_ms = claim_idle_ms
    self._on_applied = on_applied
    self._client = store_lib.redis_client(store.url, timeout_s=block_ms / 1000 + 2)
    self._group_ready = False
    self._own_pending_done = False
    self._next_claim = 0.0
    self._claim_start = '0-0'
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self.connected = False
    self.counters: Dict[str, int] = {'entries': 0, 'applied': 0, 'duplicates': 0,
                                     'malformed': 0, 'reclaimed': 0, 'batches': 0,
                                     'redis_errors': 0}
    self.last_error = ''

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
        return entries
    answer = self._client.xreadgroup(self.group, self.consumer, {self.stream: '>'},
                                     count=self._batch_size, block=self._block_ms)
    return answer[0][1] if answer else []

  def _apply(self, entries: List[Tuple[str, Optional[Dict[str, str]]]]):
    events, dead = [], []
    for entry_id, fields in entries:
      if not fields:
        continue  # trimmed from the stream while pending: nothing left to apply
      try:
        events.append((ev.parse_event(fields), ev.stream_sequence(entry_id)))
      except ev.EventError as e:
        log.warning('malformed stream entry %s: %s', entry_id, e)
        dead.append((self.dead_stream, {**fields, 'error': str(e), 'entry_id': entry_id}))
    result = self.store.apply(events, ack=(self.stream, self.group,
                                           [entry_id for entry_id, _ in entries]),
                              dead_letters=dead)
    self.counters['entries'] += len(entries)
    self.counters['applied'] += result.applied
    self.counters['duplicates'] += result.duplicates
    self.counters['malformed'] += len(dead)
    self.counters['batches'] += 1
    self._on_applied(result)

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
