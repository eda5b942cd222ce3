"""The real-time recommendation service: events in, fresh recommendations out, over HTTP.

    python -m serving.realtime.service --model-server localhost:8500 \\
        --items data/online_retail_sample/items.csv --redis redis://127.0.0.1:6379/0 \\
        --host 127.0.0.1 --port 8080          # or --embedded instead of --redis

    POST /events                       one JSON event or a JSON list (the data contract's fields)
    GET  /recommend?user=U&query=Q&k=10
    GET  /stats                        counters as JSON;  GET /metrics: the same for Prometheus
    GET  /healthz

With Redis, `POST /events` appends the events to a Redis stream (202 once Redis has them) and a
consumer thread applies them to the feature store (serving/realtime/stream.py); with
`--embedded`, they are applied in process at once. `GET /recommend` reads the user's history
from the store, asks TF Serving over gRPC (serving.client.RecommenderClient, against
tensorflow_model_server or serving.model_server) and answers items with titles and scores.
Results are cached per (user, query, k) together with the history they were computed from, so
a history change invalidates them (the consumer also drops a changed user's entries at once).

When Redis is unreachable, `GET /recommend` keeps answering from the histories this process last
saw (`"source": "fallback"`), `POST /events` answers 503 (nothing acknowledged is lost: retry),
and the service reconnects by itself. Malformed events are answered 400 with the reason and
counted in /stats.
"""

import argparse
import collections
import http.server
import itertools
import json
import logging
import signal
import sys
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grpc
import redis

from serving import client as client_lib
from serving.realtime import events as ev
from serving.realtime import store as store_lib
from serving.realtime import stream as stream_lib

log = logging.getLogger('realtime.service')

MAX_BODY_BYTES = 1 << 20
MAX_EVENTS_PER_REQUEST = 1000
MAX_K = 1000

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


class RealtimeService:
  """Ingest and recommend, independent of HTTP (the handler below only translates)."""

  def __init__(self, recommender: client_lib.RecommenderClient, catalog: store_lib.ItemCatalog,
               store, event_log: Optional[stream_lib.RedisEventLog] = None,
               consumer: Optional[stream_lib.StreamConsumer] = None,
               cache: Optional[ResultCache] = None, default_k: int = 10):
    """Wires the parts; `start()` starts the stream consumer.

    Args:
      recommender: the TF Serving client.
      catalog: item titles.
      store: an EmbeddedFeatureStore, or a RedisFeatureStore (then event_log and consumer too).
      event_log: where POST /events appends (Redis only).
      consumer: applies the log to the store (Redis only); its results invalidate the cache.
      cache: the result cache (default: 10,000 entries, 60 s).
      default_k: k when the request gives none.
    """
    self.recommender = recommender
    self.catalog = catalog
    self.store = store
    self.event_log = event_log
    self.consumer = consumer
    self.cache = cache if cache is not None else ResultCache()
    self.mirror = store_lib.HistoryMirror()
    self.counters = Counters()
    self.default_k = default_k
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
      return 503, {'error': f'event log unavailable ({e}); the events were not accepted, '
                            'retry (duplicates are dropped)', 'accepted': 0}
    self.counters.add('events_accepted', len(events))
    return 202, {'accepted': len(events), 'ids': ids}

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
    """GET /recommend: the model's top k for the user's fresh history."""
    k = self.default_k if k is None else k
    self.counters.add('recommend_requests')
    history, source = self.history(user)
    body = {'user': user, 'query': query, 'k': k, 'history': history, 'source': source,
            'cached': False}
    items = self.cache.get(user, query, k, history)
    if items is not None:
      self.counters.add('recommend_cache_hits')
      return 200, dict(body, items=items, cached=True)
    try:
      ranked = self.recommender.recommend(user, history, query, k)
    except grpc.RpcError as e:
      self.counters.add('recommend_model_errors')
      stale = self.cache.get(user, query, k, history, stale_ok=True)
      if stale is not None:
        self.counters.add('recommend_stale')
        return 200, dict(body, items=stale, cached='stale',
                         warning=f'model server: {e.code().name}: {e.details()}')
      return 503, {'error': f'model server: {e.code().name}: {e.details()}'}
    items = [{'item_id': item, 'title': self.catalog.title(item), 'score': round(score, 6)}
             for item, score in ranked]
    self.cache.put(user, query, k, history, items)
    return 200, dict(body, items=items)

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
    """The counters in Prometheus' text format."""
    stats = self.stats()
    lines = []
    for name, value in sorted(stats['counters'].items()):
      if name.startswith('malformed_field:'):
        lines.append(f'realtime_events_malformed_by_field_total{{field="{name.split(":", 1)[1]}"}}'
                     f' {value}')
      else:
        lines.append(f'realtime_{name}_total {value}')
    for name, value in sorted(stats.get('stream', {}).items()):
      if isinstance(value, bool):
        value = int(value)
      if isinstance(value, int):
        lines.append(f'realtime_stream_{name} {value}')
    if 'redis_up' in stats:
      lines.append(f'realtime_redis_up {int(stats["redis_up"])}')
    lines.append(f'realtime_cache_entries {stats["cache_entries"]}')
    return '\n'.join(lines) + '\n'


def _handler(service: RealtimeService):

  class Handler(http.server.BaseHTTPRequestHandler):
    """Translates HTTP to RealtimeService calls; JSON in, JSON out."""

    protocol_version = 'HTTP/1.1'  # keep-alive: no TCP handshake per request
    disable_nagle_algorithm = True  # headers and body go out without waiting for an ACK

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      log.debug('%s %s', self.address_string(), format % args)

    def _send(self, status: int, body: Any, content_type: str = 'application/json'):
      data = (body if isinstance(body, str) else json.dumps(body)).encode()
      self.send_response(status)
      self.send_header('Content-Type', content_type)
      self.send_header('Content-Length', str(len(data)))
      if status == 503:
        self.send_header('Retry-After', '1')
      self.end_headers()
      self.wfile.write(data)

    def do_GET(self):  # pylint: disable=invalid-name
      url = urllib.parse.urlsplit(self.path)
      params = urllib.parse.parse_qs(url.query, keep_blank_values=True)
      if url.path == '/recommend':
        user = params.get('user', [''])[0].strip()
        if not user:
          return self._send(400, {'error': "parameter 'user' is required"})
        k_text = params.get('k', [str(service.default_k)])[0]
        if not k_text.isdigit() or not 1 <= int(k_text) <= MAX_K:
          return self._send(400, {'error': f"parameter 'k': expected an integer from 1 to "
                                           f'{MAX_K}, got {k_text!r}'})
        return self._send(*service.recommend(user, params.get('query', [''])[0], int(k_text)))
      if url.path == '/stats':
        return self._send(200, service.stats())
      if url.path == '/metrics':
        return self._send(200, service.metrics(), 'text/plain; version=0.0.4')
      if url.path == '/healthz':
        return self._send(200, {'ok': True, 'store': service.store.name})
      return self._send(404, {'error': f'unknown path {url.path}; GET /recommend, /stats, '
                                       '/metrics, /healthz; POST /events'})

    def do_POST(self):  # pylint: disable=invalid-name
      path = urllib.parse.urlsplit(self.path).path
      if path != '/events':
        return self._send(404, {'error': f'unknown path {path}; POST /events'})
      length = self.headers.get('Content-Length')
      if length is None or not length.isdigit():
        return self._send(411, {'error': 'Content-Length is required'})
      if int(length) > MAX_BODY_BYTES:
        self.close_connection = True  # the body is not read
        return self._send(413, {'error': f'body of {length} bytes, at most {MAX_BODY_BYTES}'})
      raw = self.rfile.read(int(length))
      try:
        payload = json.loads(raw)
      except (ValueError, UnicodeDecodeError) as e:
        service.counters.add('events_received')
        service.counters.add('events_malformed')
        service.counters.add('events_rejected')
        service.counters.add('malformed_field:json')
        return self._send(400, {'error': f'body is not valid JSON: {e}', 'accepted': 0})
      return self._send(*service.ingest(payload))

  return Handler


class HttpServer:
  """The service's HTTP server in a background thread."""

  def __init__(self, service: RealtimeService, host: str = '127.0.0.1', port: int = 8080):
    """Binds (port 0: a free port, see `port`)."""
    http.server.ThreadingHTTPServer.request_queue_size = 128
    self._http = http.server.ThreadingHTTPServer((host, port), _handler(service))
    self._http.daemon_threads = True
    self.host, self.port = host, self._http.server_address[1]
    self.url = f'http://{host}:{self.port}'
    self._thread: Optional[threading.Thread] = None

  def start(self) -> 'HttpServer':
    self._thread = threading.Thread(target=self._http.serve_forever, name='realtime-http',
                                    daemon=True)
    self._thread.start()
    return self

  def serve_forever(self):
    self._http.serve_forever()

  def stop(self):
    self._http.shutdown()
    self._http.server_close()

  def stop_after_interrupt(self):
    """Closes the socket after serve_forever was interrupted in this thread (no shutdown)."""
    self._http.server_close()


def build_service(model_server: str, items: Optional[str] = None, redis_url: Optional[str] = None,
                  model_name: str = 'recommender', history_size: int = ev.DEFAULT_HISTORY_SIZE,
                  cache_size: int = 10_000, cache_ttl_s: float = 60.0,
                  prefix: str = store_lib.DEFAULT_PREFIX, consumer_name: Optional[str] = None,
                  claim_idle_ms: int = 30_000, model_timeout_s: float = 5.0) -> RealtimeService:
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
  """
  recommender = client_lib.RecommenderClient(model_server, model_name, timeout=model_timeout_s)
  catalog = store_lib.ItemCatalog.from_csv(items)
  cache = ResultCache(cache_size, cache_ttl_s)
  if redis_url is None:
    return RealtimeService(recommender, catalog, store_lib.EmbeddedFeatureStore(history_size),
                           cache=cache)
  store = store_lib.RedisFeatureStore(redis_url, history_size, prefix)
  stream = stream_lib.stream_key(prefix)
  return RealtimeService(
      recommender, catalog, store, stream_lib.RedisEventLog(redis_url, stream),
      stream_lib.StreamConsumer(store, stream, consumer=consumer_name,
                                claim_idle_ms=claim_idle_ms), cache=cache)


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
  parser.add_argument('--host', default='127.0.0.1')
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
  parser.add_argument('--log-level', default='INFO')
  return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level, format='%(asctime)s %(name)s %(levelname)s '
                      '%(message)s')
  service = build_service(args.model_server, args.items, args.redis, args.model_name,
                          args.history_size, args.cache_size, args.cache_ttl, args.prefix,
                          args.consumer_name)
  if args.wait_for_model > 0 and not service.recommender.wait_available(args.wait_for_model):
    log.warning('model %s at %s is not AVAILABLE after %.0f s; serving anyway (503 until it '
                'is)', args.model_name, args.model_server, args.wait_for_model)
  server = HttpServer(service, args.host, args.port)
  service.start()
  signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.stop).start())
  store = f'redis {args.redis}' if args.redis else 'embedded (in-process, not persisted)'
  log.info('realtime service on %s (store: %s; model %s at %s; %d item titles)', server.url,
           store, args.model_name, args.model_server, len(service.catalog))
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    server.stop_after_interrupt()
  finally:
    service.close()
  return 0


if __name__ == '__main__':
  sys.exit(main())
