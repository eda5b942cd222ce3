"""The real-time recommendation service: events in, fresh recommendations out, over HTTP.

    python -m serving.realtime.service --model-server localhost:8500 \\
        --items data/online_retail_sample/items.csv --redis redis://127.0.0.1:6379/0 \\
        --host 127.0.0.1 --port 8080          # or --embedded instead of --redis

    POST /events                       one JSON event or a JSON list (the data contract's fields)
    GET  /recommend?user=U&query=Q&k=10
    GET  /stats                        counters as JSON;  GET /metrics: the same for Prometheus
    GET  /healthz                      200, or 503 while Redis does not answer a PING

With Redis, `POST /events` appends the events to a Redis stream (202 once Redis has them) and a
consumer thread applies them to the feature store (serving/realtime/stream.py); with
`--embedded`, they are applied in process at once. `GET /recommend` reads the user's history
from the store, asks TF Serving over gRPC (serving.client.RecommenderClient, against
tensorflow_model_server or serving.model_server) and answers items with titles and scores.
Results are cached per (user, query, k) together with the history they were computed from, so
a history change invalidates them (the consumer also drops a changed user's entries at once).

When Redis is unreachable, `GET /recommend` keeps answering from the histories this process last
saw (`"source": "fallback"`), `POST /events` answers 503 (nothing acknowledged is lost: retry;
`"outcome": "unknown"` when Redis timed out after the events went out, since it may have written
them: a retry is safe, duplicates are dropped), and the service reconnects by itself. Malformed
events are answered 400 with the reason and counted in /stats. `GET /recommend` answers
`k_served`, the number of items given; a k above what the model serves (MAX_K through its
recommend_k signature, else its fixed K) is a 400 that says the maximum.

Every request gets a JSON answer: 4xx `{"error": ...}` naming the parameter, field or header for
bad input, 500 `{"error": ...}` for a fault of the service (its traceback is logged, never
sent). Limits (flags, see --help): request body bytes, id and query lengths, concurrent
connections (beyond them 503 with Retry-After, no new thread), and a read timeout that closes
slow or idle connections. With a token (`--token` or $REALTIME_TOKEN) every path but /healthz
needs `Authorization: Bearer <token>`.

This module is the service itself and its command line; its HTTP API (handler, limits, server)
is serving/realtime/http_api.py.
"""

import argparse
import collections
import itertools
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grpc
import redis

from servable import requests as requests_lib
from serving import client as client_lib
from serving.realtime import events as ev
from serving.realtime import metrics as metrics_lib
from serving.realtime import store as store_lib
from serving.realtime import stream as stream_lib
# The HTTP API and its limits (http_api.py), also under their names here, as before the split.
from serving.realtime.http_api import (  # pylint: disable=unused-import (re-exported)
    DISCARD_BODY_BYTES, MAX_BODY_BYTES, MAX_CONNECTIONS, READ_TIMEOUT_S, TOKEN_ENV, HttpServer,
    parse_count)

log = logging.getLogger('realtime.service')

MAX_EVENTS_PER_REQUEST = 1000
MAX_K = requests_lib.MAX_K  # the bound on k while the model's K is not known (served_k)
# --max-id-length and --max-query-length default to (and may only tighten) the data contract's
# limits: the stream consumer and the Beam pipeline parse events with them again.
MAX_ID_LENGTH = ev.MAX_ID_LENGTH
MAX_QUERY_LENGTH = ev.MAX_QUERY_LENGTH

Response = Tuple[int, Dict[str, Any]]


class ResultCache:
  """Recent results per (user, query, k), each valid only for the history it was computed from."""

  def __init__(self, max_entries: int = 10_000, ttl_s: float = 60.0):
    """Creates an empty cache.

    Args:
      max_entries: least recently used entries beyond this are dropped; 0 disables the cache.
      ttl_s: an entry is not served after this long (bounds staleness when a new model
        version is pushed).
    """
    self.max_entries = max_entries
    self.ttl_s = ttl_s
    self._entries: 'collections.OrderedDict[tuple, tuple]' = collections.OrderedDict()
    self._by_user: Dict[str, set] = collections.defaultdict(set)
    self._lock = threading.Lock()

  def get(self, user: str, query: str, k: int, history: Sequence[str],
          stale_ok: bool = False) -> Optional[List[Dict[str, Any]]]:
    """The cached items, if computed from this history (any history with `stale_ok`)."""
    key = (user, query, k)
    with self._lock:
      found = self._entries.get(key)
      if found is None:
        return None
      cached_history, items, expires = found
      if not stale_ok and (cached_history != tuple(history) or time.monotonic() > expires):
        return None
      self._entries.move_to_end(key)
      return items

  def put(self, user: str, query: str, k: int, history: Sequence[str],
          items: List[Dict[str, Any]]):
    if self.max_entries <= 0:
      return
    key = (user, query, k)
    with self._lock:
      self._entries[key] = (tuple(history), items, time.monotonic() + self.ttl_s)
      self._entries.move_to_end(key)
      self._by_user[user].add(key)
      while len(self._entries) > self.max_entries:
        old, _ = self._entries.popitem(last=False)
        keys = self._by_user.get(old[0])
        if keys is not None:
          keys.discard(old)
          if not keys:
            del self._by_user[old[0]]

  def invalidate(self, user: str):
    """Drops the user's entries (their history changed)."""
    with self._lock:
      for key in self._by_user.pop(user, ()):
        self._entries.pop(key, None)

  def __len__(self):
    return len(self._entries)


class Counters:
  """Thread-safe counters for /stats and /metrics."""

  def __init__(self):
    self._values: Dict[str, int] = collections.Counter()
    self._lock = threading.Lock()

  def add(self, name: str, value: int = 1):
    with self._lock:
      self._values[name] += value

  def snapshot(self) -> Dict[str, int]:
    with self._lock:
      return dict(self._values)


def text_error(value: str, limit: int) -> Optional[str]:
  """Why `value` cannot be an id or a query (too long, not encodable as UTF-8), else None."""
  if len(value) > limit:
    return f'longer than {limit} characters ({len(value)})'
  if not value.isascii():
    try:
      value.encode()
    except UnicodeEncodeError:  # lone surrogates, e.g. from the JSON escape "\ud800"
      return 'not valid Unicode text (a lone surrogate: bytes that were not UTF-8)'
  return None


def _never_sent(error: Exception) -> bool:
  """Whether a Redis failure happened while connecting, so that no command reached Redis."""
  return isinstance(error, (redis.ConnectionError, redis.TimeoutError)) and (
      'connecting to' in str(error))


class RealtimeService:
  """Ingest and recommend, independent of HTTP (http_api.py's handler only translates)."""

  def __init__(self, recommender: client_lib.RecommenderClient, catalog: store_lib.ItemCatalog,
               store, event_log: Optional[stream_lib.RedisEventLog] = None,
               consumer: Optional[stream_lib.StreamConsumer] = None,
               cache: Optional[ResultCache] = None, default_k: int = 10,
               max_id_length: int = MAX_ID_LENGTH, max_query_length: int = MAX_QUERY_LENGTH):
    """Wires the parts; `start()` starts the stream consumer.

    Args:
      recommender: the TF Serving client.
      catalog: item titles.
      store: an EmbeddedFeatureStore, or a RedisFeatureStore (then event_log and consumer too).
      event_log: where POST /events appends (Redis only).
      consumer: applies the log to the store (Redis only); its results invalidate the cache.
      cache: the result cache (default: 10,000 entries, 60 s).
      default_k: k when the request gives none.
      max_id_length: the longest user id (GET /recommend) and user, item or event id (events),
        at most the data contract's events.MAX_ID_LENGTH.
      max_query_length: the longest query, at most events.MAX_QUERY_LENGTH.

    Raises:
      ValueError: a limit is not positive or exceeds the data contract's.
    """
    for name, value, most in [('max_id_length', max_id_length, ev.MAX_ID_LENGTH),
                              ('max_query_length', max_query_length, ev.MAX_QUERY_LENGTH)]:
      if not 1 <= value <= most:
        raise ValueError(f'{name} must be from 1 to {most} (the data contract\'s limit, which '
                         f'the stream consumer applies again), got {value}')
    self.recommender = recommender
    self.catalog = catalog
    self.store = store
    self.event_log = event_log
    self.consumer = consumer
    self.cache = cache if cache is not None else ResultCache()
    self.mirror = store_lib.HistoryMirror()
    self.counters = Counters()
    self._metrics = metrics_lib.ServiceMetrics(self.stats)
    self.default_k = default_k
    self.max_id_length = max_id_length
    self.max_query_length = max_query_length
    self._sequence = itertools.count()
    self._started = time.time()
    if consumer is not None:
      consumer._on_applied = self._applied  # pylint: disable=protected-access

  @property
  def embedded(self) -> bool:
    return self.event_log is None

  def start(self) -> 'RealtimeService':
    if self.consumer is not None:
      self.consumer.start()
    return self

  def close(self):
    if self.consumer is not None:
      self.consumer.stop()
    if self.event_log is not None:
      self.event_log.close()
    self.store.close()
    self.recommender.close()

  def _applied(self, result: store_lib.ApplyResult):
    """After events are applied: fresh histories replace cached results and the mirror."""
    for user, history in result.changed.items():
      self.mirror.put(user, history)
      self.cache.invalidate(user)

  def ingest(self, payload: Any) -> Response:
    """POST /events: validates all events, then appends (Redis) or applies (embedded) them."""
    events, errors = ev.parse_events(payload, MAX_EVENTS_PER_REQUEST)
    if events and not errors:
      errors = self._limit_errors(events, isinstance(payload, list))
      if errors:  # the events that fail are counted as malformed only
        bad = {error.index or 0 for error in errors}
        events = [e for index, e in enumerate(events) if index not in bad]
    self.counters.add('events_received', len(events) + len(errors))
    if errors:
      self.counters.add('events_malformed', len(errors))
      self.counters.add('events_rejected', len(events) + len(errors))
      for error in errors:
        self.counters.add(f'malformed_field:{error.field}')
      return 400, {'error': str(errors[0]), 'errors': [str(e) for e in errors[:20]],
                   'accepted': 0}
    if self.embedded:
      result = self.store.apply([(event, (next(self._sequence),)) for event in events])
      self._applied(result)
      self.counters.add('events_accepted', len(events))
      self.counters.add('events_duplicate', result.duplicates)
      return 202, {'accepted': len(events), 'duplicates': result.duplicates}
    try:
      ids = self.event_log.append(events)
    except redis.RedisError as e:
      self.counters.add('events_unavailable', len(events))
      retry = (f'retry the same events: duplicates (same event_id, else same user_id, item_id, '
               f'timestamp and event_type) are dropped for {self.store.dedup_ttl_s} s')
      if _never_sent(e):
        return 503, {'error': f'event log unavailable ({e}); the events were not written; '
                              f'{retry}', 'accepted': 0, 'outcome': 'not_written'}
      # A timeout or a connection lost after the XADDs went out: Redis may have written any
      # of them, so the answer must not say they were refused.
      self.counters.add('events_outcome_unknown', len(events))
      return 503, {'error': f'event log did not confirm ({e}); the outcome is unknown: the '
                            f'events may have been written; {retry}', 'accepted': None,
                   'outcome': 'unknown'}
    self.counters.add('events_accepted', len(events))
    return 202, {'accepted': len(events), 'ids': ids}

  def _limit_errors(self, events: Sequence[ev.Event], batch: bool) -> List[ev.EventError]:
    """EventErrors for ids and queries beyond this service's limits (tighter than parse's)."""
    errors = []
    for index, event in enumerate(events):
      for field, limit in [('user_id', self.max_id_length), ('item_id', self.max_id_length),
                           ('event_id', self.max_id_length), ('query', self.max_query_length)]:
        if len(getattr(event, field)) > limit:
          errors.append(ev.EventError(field, f'longer than {limit} characters',
                                      index if batch else None))
          break
    return errors

  def health(self) -> Response:
    """GET /healthz: 200 while the store answers (Redis: a PING within its socket timeout)."""
    if self.embedded or self.store.ping():
      return 200, {'ok': True, 'store': self.store.name}
    timeout = self.store.client.connection_pool.connection_kwargs.get('socket_timeout')
    return 503, {'ok': False, 'store': self.store.name,
                 'error': f'redis at {self.store.url} did not answer PING within {timeout} s'}

  def history(self, user: str) -> Tuple[List[str], str]:
    """The user's history and where it came from: 'redis', 'embedded' or 'fallback'."""
    if self.embedded:
      return self.store.history(user), 'embedded'
    try:
      history = self.store.history(user)
    except store_lib.StoreUnavailable:
      self.counters.add('recommend_fallback')
      return self.mirror.get(user), 'fallback'
    self.mirror.put(user, history)
    return history, 'redis'

  def recommend(self, user: str, query: str = '', k: Optional[int] = None) -> Response:
    """GET /recommend (timed for /metrics): _recommend."""
    with self._metrics.recommend_latency.time():
      return self._recommend(user, query, k)

  def _recommend(self, user: str, query: str = '', k: Optional[int] = None) -> Response:
    """GET /recommend: the model's top k for the user's fresh history.

    Bad input (an empty or too long user, a too long query, text that is not valid Unicode, k
    beyond the model's K) is answered 400 naming the parameter, before any store or cache.
    """
    k = self.default_k if k is None else k
    for name, value, limit in [('user', user, self.max_id_length),
                               ('query', query, self.max_query_length)]:
      error = text_error(value, limit)
      if error:
        self.counters.add('recommend_rejected')
        return 400, {'error': f"parameter '{name}': {error}"}
    if not user.strip():
      self.counters.add('recommend_rejected')
      return 400, {'error': "parameter 'user' is required"}
    served = self.recommender.served_k()  # from the model's metadata, cached by the client
    most = MAX_K if served is None else served
    if not 1 <= k <= most:
      self.counters.add('recommend_rejected')
      limit = (f'this model serves at most {served} items' if served else
               f'at most {MAX_K}')
      return 400, {'error': f"parameter 'k': expected an integer from 1 to {most}: {limit}; "
                            f'got {k}', 'max_k': most}
    self.counters.add('recommend_requests')
    history, source = self.history(user)
    unusable = [item for item in history if text_error(item, ev.MAX_ID_LENGTH)]
    if unusable:  # never written by parse_event; one bad entry must not break the user for good
      log.warning('user %r: %d history items that are not valid text skipped', user[:64],
                  len(unusable))
      history = [item for item in history if item not in unusable]
    body = {'user': user, 'query': query, 'k': k, 'history': history, 'source': source,
            'cached': False}
    items = self.cache.get(user, query, k, history)
    if items is not None:
      self.counters.add('recommend_cache_hits')
      return 200, dict(body, items=items, cached=True, k_served=len(items))
    try:
      ranked = self.recommender.recommend(user, history, query, k)
    except grpc.RpcError as e:
      self.counters.add('recommend_model_errors')
      stale = self.cache.get(user, query, k, history, stale_ok=True)
      if stale is not None:
        self.counters.add('recommend_stale')
        return 200, dict(body, items=stale, cached='stale', k_served=len(stale),
                         warning=f'model server: {e.code().name}: {e.details()}')
      return 503, {'error': f'model server: {e.code().name}: {e.details()}'}
    if len(ranked) < k:  # K was unknown (no static shape, metadata failed) or changed
      self.recommender.learned_k(len(ranked))
    items = [{'item_id': item, 'title': self.catalog.title(item), 'score': round(score, 6)}
             for item, score in ranked]
    self.cache.put(user, query, k, history, items)
    return 200, dict(body, items=items, k_served=len(items))

  def stats(self) -> Dict[str, Any]:
    """Counters and the state of the store and the stream."""
    stats: Dict[str, Any] = {'store': self.store.name, 'uptime_s': round(time.time() -
                                                                         self._started, 1),
                             'counters': self.counters.snapshot(), 'cache_entries': len(self.cache),
                             'items_with_titles': len(self.catalog)}
    if self.consumer is not None:
      stats['redis_up'] = self.store.ping()
      stats['stream'] = dict(self.consumer.counters, connected=self.consumer.connected,
                             pending=self.consumer.pending(), lag=self.consumer.lag(),
                             last_error=self.consumer.last_error)
    return stats

  def metrics(self) -> str:
    """GET /metrics: serving/realtime/metrics.py's exposition of this service."""
    return self._metrics.exposition()

def build_service(model_server: str, items: Optional[str] = None, redis_url: Optional[str] = None,
                  model_name: str = 'recommender', history_size: int = ev.DEFAULT_HISTORY_SIZE,
                  cache_size: int = 10_000, cache_ttl_s: float = 60.0,
                  prefix: str = store_lib.DEFAULT_PREFIX, consumer_name: Optional[str] = None,
                  claim_idle_ms: int = 30_000, model_timeout_s: float = 5.0,
                  max_id_length: int = MAX_ID_LENGTH,
                  max_query_length: int = MAX_QUERY_LENGTH) -> RealtimeService:
  """A RealtimeService on Redis (`redis_url`) or on the embedded store (None); not started.

  Args:
    model_server: TF Serving's gRPC host:port.
    items: the items CSV (titles); None for no titles.
    redis_url: redis://host:port/db, or None for the embedded store.
    model_name: the served model's name.
    history_size: N, the distinct items kept per user.
    cache_size: result cache entries (0: no cache).
    cache_ttl_s: result cache entry lifetime.
    prefix: Redis key prefix (stream `<prefix>events`, histories `<prefix>hist:<user>`).
    consumer_name: this instance's name in the consumer group (default: the host name).
    claim_idle_ms: pending entries of other consumers idle this long are taken over.
    model_timeout_s: deadline of each Predict call.
    max_id_length: the longest user, item or event id (at most events.MAX_ID_LENGTH).
    max_query_length: the longest query (at most events.MAX_QUERY_LENGTH).
  """
  recommender = client_lib.RecommenderClient(model_server, model_name, timeout=model_timeout_s)
  catalog = store_lib.ItemCatalog.from_csv(items)
  cache = ResultCache(cache_size, cache_ttl_s)
  limits = dict(max_id_length=max_id_length, max_query_length=max_query_length)
  if redis_url is None:
    return RealtimeService(recommender, catalog, store_lib.EmbeddedFeatureStore(history_size),
                           cache=cache, **limits)
  store = store_lib.RedisFeatureStore(redis_url, history_size, prefix)
  stream = stream_lib.stream_key(prefix)
  return RealtimeService(
      recommender, catalog, store, stream_lib.RedisEventLog(redis_url, stream),
      stream_lib.StreamConsumer(store, stream, consumer=consumer_name,
                                claim_idle_ms=claim_idle_ms), cache=cache, **limits)


def _bounded(kind, low, high=None):
  """An argparse type: `kind` values from low to high (None: no upper bound)."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'expected {kind.__name__}, got {text!r}') from None
    if not value >= low or (high is not None and value > high):
      raise argparse.ArgumentTypeError(
          f'expected from {low} to {high}, got {text}' if high is not None else
          f'expected at least {low}, got {text}')
    return value

  parse.__name__ = kind.__name__
  return parse


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m serving.realtime.service',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--model-server', default='127.0.0.1:8500',
                      help='TF Serving gRPC host:port (tensorflow_model_server or '
                           'python -m serving.model_server)')
  parser.add_argument('--model-name', default='recommender')
  parser.add_argument('--items', help='items CSV of the data contract (titles of the results)')
  store = parser.add_mutually_exclusive_group()
  store.add_argument('--redis', metavar='URL', help='redis://host:port/db: event stream and '
                     'feature store in Redis')
  store.add_argument('--embedded', action='store_true',
                     help='in-process store, no Redis (the default when --redis is not given)')
  parser.add_argument('--host', default='127.0.0.1',
                      help='address to listen on (default: %(default)s; any other than a '
                      'loopback address without --token is warned of)')
  parser.add_argument('--port', type=int, default=8080)
  parser.add_argument('--history-size', type=int, default=ev.DEFAULT_HISTORY_SIZE,
                      help='distinct items kept per user')
  parser.add_argument('--cache-size', type=int, default=10_000, help='result cache entries '
                      '(0: off)')
  parser.add_argument('--cache-ttl', type=float, default=60.0, help='result cache lifetime, s')
  parser.add_argument('--prefix', default=store_lib.DEFAULT_PREFIX, help='Redis key prefix')
  parser.add_argument('--consumer-name', help='name in the consumer group (default: host name; '
                      'keep it stable across restarts of one instance)')
  parser.add_argument('--wait-for-model', type=float, default=120.0,
                      help='seconds to wait for the model to be AVAILABLE before serving')
  limits = parser.add_argument_group('limits and access')
  limits.add_argument('--max-body-bytes', type=_bounded(int, 1), default=MAX_BODY_BYTES,
                      help='largest POST /events body; 413 beyond (default: %(default)s)')
  limits.add_argument('--max-id-length', type=_bounded(int, 1, ev.MAX_ID_LENGTH),
                      default=MAX_ID_LENGTH,
                      help='longest user id (GET /recommend) and user_id, item_id, event_id '
                      "(POST /events), in characters; 400 beyond; at most the data contract's "
                      f'{ev.MAX_ID_LENGTH}, which the stream consumer applies again (default: '
                      '%(default)s)')
  limits.add_argument('--max-query-length', type=_bounded(int, 1, ev.MAX_QUERY_LENGTH),
                      default=MAX_QUERY_LENGTH,
                      help="longest query, in characters; 400 beyond; at most the data "
                      f"contract's {ev.MAX_QUERY_LENGTH} (default: %(default)s)")
  limits.add_argument('--max-connections', type=_bounded(int, 1), default=MAX_CONNECTIONS,
                      help='connections served at once (a thread each); beyond, 503 with '
                      'Retry-After and the connection closes (default: %(default)s)')
  limits.add_argument('--read-timeout', type=_bounded(float, 0.001), default=READ_TIMEOUT_S,
                      help='seconds a request line, headers or body may stall, and a keep-alive '
                      'connection may stay idle, before the connection is closed (default: '
                      '%(default)s)')
  limits.add_argument('--token', default=os.environ.get(TOKEN_ENV) or None,
                      help='shared secret: every path but /healthz then needs the header '
                      f'"Authorization: Bearer <token>", else 401 (default: ${TOKEN_ENV}, '
                      'else none; prefer the variable: flags show in ps)')
  parser.add_argument('--log-level', default='INFO')
  args = parser.parse_args(argv)
  args.token = args.token or None
  return args


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level, format='%(asctime)s %(name)s %(levelname)s '
                      '%(message)s')
  service = build_service(args.model_server, args.items, args.redis, args.model_name,
                          args.history_size, args.cache_size, args.cache_ttl, args.prefix,
                          args.consumer_name, max_id_length=args.max_id_length,
                          max_query_length=args.max_query_length)
  if args.wait_for_model > 0 and not service.recommender.wait_available(args.wait_for_model):
    log.warning('model %s at %s is not AVAILABLE after %.0f s; serving anyway (503 until it '
                'is)', args.model_name, args.model_server, args.wait_for_model)
  server = HttpServer(service, args.host, args.port, args.max_body_bytes, args.max_connections,
                      args.read_timeout, args.token)
  service.start()
  signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.stop).start())
  store = f'redis {args.redis}' if args.redis else 'embedded (in-process, not persisted)'
  log.info('realtime service on %s (store: %s; model %s at %s; %d item titles; token %s; at '
           'most %d connections, %g s read timeout)', server.url, store, args.model_name,
           args.model_server, len(service.catalog), 'required' if args.token else 'off',
           args.max_connections, args.read_timeout)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    server.stop_after_interrupt()
  finally:
    service.close()
  return 0


if __name__ == '__main__':
  sys.exit(main())
