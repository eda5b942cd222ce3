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
`k_served`, the number of items given; a k above the model's K (its signature's output shape)
is a 400 that says the maximum.

Every request gets a JSON answer: 4xx `{"error": ...}` naming the parameter, field or header for
bad input, 500 `{"error": ...}` for a fault of the service (its traceback is logged, never
sent). Limits (flags, see --help): request body bytes, id and query lengths, concurrent
connections (beyond them 503 with Retry-After, no new thread), and a read timeout that closes
slow or idle connections. With a token (`--token` or $REALTIME_TOKEN) every path but /healthz
needs `Authorization: Bearer <token>`.
"""

import argparse
import collections
import hmac
import http.server
import ipaddress
import itertools
import json
import logging
import os
import queue
import re
import signal
import socket
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

MAX_BODY_BYTES = 1 << 20  # the default of --max-body-bytes
MAX_EVENTS_PER_REQUEST = 1000
MAX_K = 1000  # the bound on k while the model's K is not known (see RealtimeService.served_k)
# --max-id-length and --max-query-length default to (and may only tighten) the data contract's
# limits: the stream consumer and the Beam pipeline parse events with them again.
MAX_ID_LENGTH = ev.MAX_ID_LENGTH
MAX_QUERY_LENGTH = ev.MAX_QUERY_LENGTH
MAX_CONNECTIONS = 64
READ_TIMEOUT_S = 30.0
TOKEN_ENV = 'REALTIME_TOKEN'
# An unread body up to this size is read and dropped after an early answer (404, 401, ...) so
# that the connection stays usable; a larger one closes the connection instead.
DISCARD_BODY_BYTES = 64 << 10
# How long the model's K (from its signature) is trusted before it is asked again, and how soon
# a failed look-up is retried.
SERVED_K_TTL_S = 60.0
SERVED_K_RETRY_S = 5.0

_DIGITS = re.compile(r'[0-9]+')

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


def parse_count(text: Optional[str]) -> Optional[int]:
  """The value of a decimal count of ASCII digits only, else None.

  str.isdigit and int() also take '²' or Arabic-Indic digits (and int() then fails on some of
  them), and int() refuses more than 4300 digits: neither may reach int() from a request.
  """
  if text is None:
    return None
  text = text.strip(' \t')
  if not _DIGITS.fullmatch(text):
    return None
  significant = text.lstrip('0')
  return int(significant or '0') if len(significant) <= 18 else 10**18


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
  """Ingest and recommend, independent of HTTP (the handler below only translates)."""

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
    self.default_k = default_k
    self.max_id_length = max_id_length
    self.max_query_length = max_query_length
    self._served_k: Optional[int] = None
    self._served_k_until = 0.0
    self._served_k_lock = threading.Lock()
    self._served_k_refreshing = False
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

  def served_k(self) -> Optional[int]:
    """The model's K (items per answer) from its signature's `item_ids` shape; None if unknown.

    Asked of the model server at most every SERVED_K_TTL_S (a pushed version may change it);
    a failed look-up is retried after SERVED_K_RETRY_S. One thread asks, the others use the
    value known meanwhile.
    """
    with self._served_k_lock:
      if time.monotonic() < self._served_k_until or self._served_k_refreshing:
        return self._served_k
      self._served_k_refreshing = True
    served = None
    try:
      signature_name = getattr(self.recommender, '_signature_name', 'serving_default')
      signature = self.recommender.metadata().get(signature_name)
      dims = signature.outputs['item_ids'].tensor_shape.dim if signature is not None else []
      if len(dims) == 2 and dims[1].size > 0:
        served = int(dims[1].size)
    except (grpc.RpcError, KeyError, AttributeError, ValueError, TypeError) as e:
      log.debug('model K unknown: %s', e)
    with self._served_k_lock:
      self._served_k_refreshing = False
      if served is not None:
        self._served_k = served
      self._served_k_until = time.monotonic() + (SERVED_K_TTL_S if served else SERVED_K_RETRY_S)
      return self._served_k

  def _learned_k(self, served: int):
    """The model answered fewer items than asked: that is its K (the output has K columns)."""
    with self._served_k_lock:
      self._served_k = served
      self._served_k_until = time.monotonic() + SERVED_K_TTL_S

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
    served = self.served_k()
    most = MAX_K if served is None else served
    if not 1 <= k <= most:
      self.counters.add('recommend_rejected')
      limit = (f'this model serves at most {served} items (its exported K)' if served else
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
      self._learned_k(len(ranked))
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


def _is_loopback(host: str) -> bool:
  """Whether binding `host` exposes the service only to this machine."""
  if host == 'localhost' or host.endswith('.localhost'):
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:  # a name: it may resolve to any address
    return False


def _handler(service: RealtimeService, max_body_bytes: int = MAX_BODY_BYTES,
             read_timeout_s: Optional[float] = READ_TIMEOUT_S, token: Optional[str] = None):
  """The request handler class of one service and its HTTP limits (HttpServer's arguments)."""
  expected = token.encode() if token else None

  class Handler(http.server.BaseHTTPRequestHandler):
    """Translates HTTP to RealtimeService calls; JSON in, JSON out, whatever the request."""

    protocol_version = 'HTTP/1.1'  # keep-alive: no TCP handshake per request
    disable_nagle_algorithm = True  # headers and body go out without waiting for an ACK
    # The socket's timeout (StreamRequestHandler.setup): a request line, headers or body that
    # stall this long, or a keep-alive connection idle this long, are closed and free their
    # thread and connection slot.
    timeout = read_timeout_s
    server_version = 'realtime'  # no Python version in the Server header
    sys_version = ''

    _body_done = True  # whether the current request's body was read (or needs no reading)
    _answered = False  # whether the current request's status line went out

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      log.debug('%s %s', self.address_string(), format % args)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None):
      """The base class's own errors (bad request line, headers too long or too many, an
      unsupported method, a timeout) as JSON, closing the connection: what was read of the
      request cannot be trusted to frame the next one."""
      del explain  # the short message is the answer
      self._body_done = True  # the headers, if any, may be the previous request's
      if self.request_version == 'HTTP/0.9':  # an unparsable request line: answer in HTTP/1.0
        self.request_version = 'HTTP/1.0'
      short = self.responses.get(code, ('error',))[0]
      body = {'error': message or short}
      try:
        self._send(code, body, close=True)
      except OSError:
        self.close_connection = True

    def _send(self, status: int, body: Any, content_type: str = 'application/json',
              close: bool = False, headers: Optional[Dict[str, str]] = None):
      if close:
        self._body_done = True  # not read: the server's lingering close drains it
      self._finish_body()
      data = (body if isinstance(body, str) else json.dumps(body)).encode()
      self.send_response(status)
      self.send_header('Content-Type', content_type)
      self.send_header('Content-Length', str(len(data)))
      if status == 503:
        self.send_header('Retry-After', '1')
      for name, value in (headers or {}).items():
        self.send_header(name, value)
      if close or self.close_connection:
        self.send_header('Connection', 'close')  # also sets close_connection
      self._answered = True
      self.end_headers()
      if self.command != 'HEAD':
        self.wfile.write(data)

    def _content_length(self) -> Tuple[Optional[int], Optional[str]]:
      """(the body's length, None when there is no body) or (None, why the header is bad)."""
      values = self.headers.get_all('Content-Length') or []
      if not values:
        return None, None
      lengths = {parse_count(value) for value in values}
      if None in lengths or len(lengths) > 1:
        shown = ', '.join(repr(value[:20]) for value in values[:3])
        return None, f"header 'Content-Length': expected one count of ASCII digits, got {shown}"
      return lengths.pop(), None

    def _finish_body(self):
      """Drops an unread body (a small one is read, else the connection closes), so that no
      body is taken for the next request on a kept-alive connection."""
      if self._body_done:
        return
      self._body_done = True
      if self.headers.get('Transfer-Encoding') is not None:
        self.close_connection = True  # chunked bodies are not read: their end is unknown here
        return
      length, error = self._content_length()
      if error or (length or 0) > DISCARD_BODY_BYTES:
        self.close_connection = True
        return
      try:
        while length:
          chunk = self.rfile.read(min(length, 16 << 10))
          if not chunk:
            break
          length -= len(chunk)
      except OSError:  # the client went away or stalled (the read timeout)
        self.close_connection = True
      if length:
        self.close_connection = True

    def _authorized(self) -> bool:
      scheme, _, credentials = self.headers.get('Authorization', '').strip().partition(' ')
      return scheme.lower() == 'bearer' and hmac.compare_digest(
          credentials.strip().encode('latin-1', 'replace'), expected)

    def _dispatch(self, handle):
      """Runs `handle(url)`; anything it raises is answered (500) and logged, never dropped."""
      self._body_done = False
      self._answered = False
      try:
        url = urllib.parse.urlsplit(self.path)
        if expected is not None and url.path != '/healthz' and not self._authorized():
          service.counters.add('http_unauthorized')
          return self._send(401, {'error': "this service needs the header 'Authorization: "
                                           "Bearer <token>' (its --token or $REALTIME_TOKEN)"},
                            headers={'WWW-Authenticate': 'Bearer'})
        return handle(url)
      except TimeoutError:  # the body stalled longer than the read timeout
        self.close_connection = True
        self._body_done = True
        if not self._answered:
          self._quietly(408, {'error': f'request body not received within {read_timeout_s} s'})
      except ConnectionError:  # the client went away; nobody to answer
        self.close_connection = True
      except Exception:  # pylint: disable=broad-except
        log.exception('%s %s failed', self.command, self.path[:200])
        service.counters.add('http_internal_errors')
        self.close_connection = True
        if not self._answered:
          self._quietly(500, {'error': 'internal error of the realtime service (logged there '
                                       'with its traceback); retry, or report it'})
      return None

    def _quietly(self, status: int, body: Dict[str, Any]):
      try:
        self._send(status, body, close=True)
      except OSError:
        pass

    def do_GET(self):  # pylint: disable=invalid-name
      self._dispatch(self._get)

    def do_POST(self):  # pylint: disable=invalid-name
      self._dispatch(self._post)

    def _get(self, url: urllib.parse.SplitResult):
      params = urllib.parse.parse_qs(url.query, keep_blank_values=True)
      if url.path == '/recommend':
        user = params.get('user', [''])[0].strip()
        if not user:
          return self._send(400, {'error': "parameter 'user' is required"})
        k_text = params.get('k', [str(service.default_k)])[0]
        k = parse_count(k_text)
        if k is None:
          return self._send(400, {'error': "parameter 'k': expected an integer of ASCII digits, "
                                           f'got {k_text[:40]!r}'})
        return self._send(*service.recommend(user, params.get('query', [''])[0], k))
      if url.path == '/stats':
        return self._send(200, service.stats())
      if url.path == '/metrics':
        return self._send(200, service.metrics(), 'text/plain; version=0.0.4')
      if url.path == '/healthz':
        return self._send(*service.health())
      return self._send(404, {'error': f'unknown path {url.path[:200]}; GET /recommend, /stats, '
                                       '/metrics, /healthz; POST /events'})

    def _post(self, url: urllib.parse.SplitResult):
      if url.path != '/events':
        return self._send(404, {'error': f'unknown path {url.path[:200]}; POST /events'})
      if self.headers.get('Transfer-Encoding') is not None:
        return self._send(411, {'error': "header 'Content-Length' is required (a chunked body "
                                         'is not accepted)'}, close=True)
      length, error = self._content_length()
      if error:
        return self._send(400, {'error': error}, close=True)
      if length is None:
        return self._send(411, {'error': "header 'Content-Length' is required"}, close=True)
      if length > max_body_bytes:
        shown = length if length < 10**18 else 'more than 10**18'
        return self._send(413, {'error': f'body of {shown} bytes, at most {max_body_bytes}'},
                          close=True)
      raw = self.rfile.read(length)
      self._body_done = True
      if len(raw) < length:
        return self._send(400, {'error': f'body of {len(raw)} bytes, shorter than its '
                                         f"header 'Content-Length' ({length})"}, close=True)
      try:
        payload = json.loads(raw)
      except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        service.counters.add('events_received')
        service.counters.add('events_malformed')
        service.counters.add('events_rejected')
        service.counters.add('malformed_field:json')
        reason = 'nested too deeply' if isinstance(e, RecursionError) else str(e)[:200]
        return self._send(400, {'error': f'body is not valid JSON: {reason}', 'accepted': 0})
      return self._send(*service.ingest(payload))

  return Handler


_BUSY_BODY = json.dumps({'error': 'too many connections to the realtime service; retry'})
_BUSY_RESPONSE = ('HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n'
                  f'Content-Length: {len(_BUSY_BODY)}\r\nRetry-After: 1\r\n'
                  f'Connection: close\r\n\r\n{_BUSY_BODY}').encode()


class _ThreadingServer(http.server.ThreadingHTTPServer):
  """A thread per connection, at most `max_connections` of them; beyond, 503 and close.

  Connections beyond the limit get no thread of their own: one thread answers them in turn
  (it reads what the client sent for up to a second, so that closing does not reset the
  connection before the answer is read), and beyond its small queue they are closed at once.
  """

  daemon_threads = True
  request_queue_size = 128

  def __init__(self, address, handler, max_connections: int, counters: Counters):
    self.max_connections = max_connections
    self._slots = threading.BoundedSemaphore(max_connections)
    self._counters = counters
    self._busy: 'queue.Queue[Optional[socket.socket]]' = queue.Queue(maxsize=32)
    super().__init__(address, handler)
    self._busy_thread = threading.Thread(target=self._answer_busy, name='realtime-http-busy',
                                         daemon=True)
    self._busy_thread.start()

  def process_request(self, request, client_address):
    if not self._slots.acquire(blocking=False):
      self._counters.add('http_connections_rejected')
      try:
        self._busy.put_nowait(request)
      except queue.Full:  # overloaded: no answer, no lingering in the accepting thread
        self.close_request(request)
      return
    try:
      super().process_request(request, client_address)
    except BaseException:
      self._slots.release()
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()

  def _answer_busy(self):
    while True:
      request = self._busy.get()
      if request is None:
        return
      try:
        request.settimeout(1.0)
        received = b''
        while b'\r\n\r\n' not in received and len(received) < 16 << 10:
          chunk = request.recv(4096)
          if not chunk:
            break
          received += chunk
        request.sendall(_BUSY_RESPONSE)
      except OSError:
        pass
      finally:
        self.shutdown_request(request)

  def handle_error(self, request, client_address):
    log.exception('connection from %s failed', client_address)

  def shutdown_request(self, request):
    """Closes gracefully: FIN first, then what the client still sends is read and dropped (up
    to 256 KiB or half a second), so that unread request bytes do not make the close a reset
    that could destroy the answer before the client reads it."""
    try:
      request.shutdown(socket.SHUT_WR)
      request.settimeout(0.5)
      deadline, dropped = time.monotonic() + 0.5, 0
      while dropped < 256 << 10 and time.monotonic() < deadline:
        chunk = request.recv(64 << 10)
        if not chunk:
          break
        dropped += len(chunk)
    except OSError:
      pass
    self.close_request(request)

  def server_close(self):
    super().server_close()
    self._busy.put(None)


class HttpServer:
  """The service's HTTP server in a background thread."""

  def __init__(self, service: RealtimeService, host: str = '127.0.0.1', port: int = 8080,
               max_body_bytes: int = MAX_BODY_BYTES, max_connections: int = MAX_CONNECTIONS,
               read_timeout_s: Optional[float] = READ_TIMEOUT_S, token: Optional[str] = None):
    """Binds (port 0: a free port, see `port`).

    Args:
      service: what the requests call.
      host: the address to listen on; one that is not loopback without a token is warned of.
      port: the TCP port.
      max_body_bytes: the largest POST /events body (413 beyond, and the connection closes).
      max_connections: connections served at once, each by its thread; beyond, 503 with
        Retry-After and the connection closes.
      read_timeout_s: a request (line, headers, body) that stalls this long, or a keep-alive
        connection idle this long, is closed; None: never (not for exposed services).
      token: when set, every path but /healthz needs `Authorization: Bearer <token>` (401).
    """
    if max_body_bytes < 1 or max_connections < 1 or (read_timeout_s is not None and
                                                     read_timeout_s <= 0):
      raise ValueError('max_body_bytes, max_connections and read_timeout_s must be positive')
    self.token = token or None
    self._http = _ThreadingServer(
        (host, port), _handler(service, max_body_bytes, read_timeout_s, self.token),
        max_connections, service.counters)
    self.host, self.port = host, self._http.server_address[1]
    self.url = f'http://{host}:{self.port}'
    self._thread: Optional[threading.Thread] = None
    if self.token is None and not _is_loopback(host):
      log.warning('SECURITY: the realtime service listens on %s:%d without a token: anyone who '
                  'can reach it can read recommendations and write events; set --token or $%s',
                  host, self.port, TOKEN_ENV)

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
