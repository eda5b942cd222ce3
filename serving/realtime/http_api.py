"""The real-time service's HTTP API: requests parsed and checked, then answered as JSON.

`HttpServer` serves a RealtimeService (serving/realtime/service.py) on a thread per connection
(serving/http_server.py), at most --max-connections at once: beyond, 503 with Retry-After and no new
thread. The handler translates HTTP to the service's calls (GET /recommend, /stats, /metrics,
/healthz; POST /events) and answers every request in JSON, whatever it sent: 4xx naming the
parameter or header, 500 for a fault of the service (logged, never sent). It checks the token,
the body's framing and size (--max-body-bytes) and keeps a kept-alive connection's framing
sound; a read timeout (--read-timeout) closes stalled or idle connections. docs/realtime.md
describes the API, docs/security.md its limits.
"""

import functools
import hmac
import http.server
import ipaddress
import json
import logging
import re
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from serving.http_server import BoundedHTTPServer
from serving.http_server import JsonRefusals

if TYPE_CHECKING:  # service.py imports this module: for the annotations only
  from serving.realtime.service import RealtimeService

log = logging.getLogger('realtime.service')

MAX_BODY_BYTES = 1 << 20  # the default of --max-body-bytes
MAX_CONNECTIONS = 64
READ_TIMEOUT_S = 30.0
TOKEN_ENV = 'REALTIME_TOKEN'
# An unread body up to this size is read and dropped after an early answer (404, 401, ...) so
# that the connection stays usable; a larger one closes the connection instead.
DISCARD_BODY_BYTES = 64 << 10

_DIGITS = re.compile(r'[0-9]+')


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


def _is_loopback(host: str) -> bool:
  """Whether binding `host` exposes the service only to this machine."""
  if host == 'localhost' or host.endswith('.localhost'):
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:  # a name: it may resolve to any address
    return False


def _handler(service: 'RealtimeService', max_body_bytes: int = MAX_BODY_BYTES,
             read_timeout_s: Optional[float] = READ_TIMEOUT_S, token: Optional[str] = None):
  """The request handler class of one service and its HTTP limits (HttpServer's arguments)."""
  expected = token.encode() if token else None

  class Handler(JsonRefusals, http.server.BaseHTTPRequestHandler):
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

    def send_refusal(self, code: int, body: dict):
      """JsonRefusals' answer; the body is not read (the headers, if any, may be
      the previous request's)."""
      self._body_done = True
      self._send(code, body, close=True)

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


class HttpServer:
  """The service's HTTP server in a background thread."""

  def __init__(self, service: 'RealtimeService', host: str = '127.0.0.1', port: int = 8080,
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
    self._http = BoundedHTTPServer(
        (host, port), _handler(service, max_body_bytes, read_timeout_s, self.token),
        max_connections, _BUSY_RESPONSE, busy_thread_name='realtime-http-busy',
        on_busy=functools.partial(service.counters.add, 'http_connections_rejected'),
        lingering_close=True, error_log=log, request_queue_size=128)
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
