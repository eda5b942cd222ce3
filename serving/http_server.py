"""A threaded HTTP server with a bounded number of connections, for the REST and real-time APIs.

Both HTTP servers of serving/ (the local model server's REST API, serving/rest.py, and the
real-time service, serving/realtime/http_api.py) serve each connection on its own thread, at
most `max_connections` at once; a connection beyond them gets no thread but a prepared 503 and
is closed. What differs between the two is a parameter: the 503's bytes, whether it is written
at once by the accepting thread or in turn by one thread after reading the request, a callback
counting each refusal, a graceful (lingering) close, the listen backlog and where connection
errors are logged. The limits are those of docs/security.md; the flags, docs/serving.md and
docs/realtime.md.
"""

import http.server
import logging
import queue
import socket
import socketserver
import threading
import time
from typing import Callable, Optional

# Connections beyond the limit that wait for the refusing thread; beyond, closed unanswered.
BUSY_QUEUE_SIZE = 32


class JsonRefusals:
  """BaseHTTPRequestHandler mixin: http.server's own refusals (an unparsable request line,
  headers too long or too many, an unsupported method, a timeout) answered in JSON,
  {"error": short message}, and the connection closed: what was read of the request cannot
  be trusted to frame the next one. The handler writes the answer in `send_refusal(code,
  body)`, with Connection: close."""

  def send_error(self, code: int, message: Optional[str] = None,
                 explain: Optional[str] = None):
    del explain  # the short message is the answer
    if self.request_version == 'HTTP/0.9':  # no parsable request line: answer in HTTP/1.0
      self.request_version = 'HTTP/1.0'
    self.close_connection = True
    try:
      self.send_refusal(code, {'error': message or self.responses.get(code, ('error',))[0]})
    except OSError:
      pass

  def send_refusal(self, code: int, body: dict):
    raise NotImplementedError


class BoundedHTTPServer(http.server.ThreadingHTTPServer):
  """A thread per connection, at most `max_connections` at once; beyond, 503 and close."""

  daemon_threads = True

  def __init__(self, address, handler, max_connections: int, busy_response: bytes, *,
               busy_thread_name: Optional[str] = None,
               on_busy: Optional[Callable[[], None]] = None, lingering_close: bool = False,
               error_log: Optional[logging.Logger] = None,
               request_queue_size: int = socketserver.TCPServer.request_queue_size):
    """Binds and listens (port 0: a free port, see `server_address`).

    Args:
      address: (host, port) to listen on.
      handler: the BaseHTTPRequestHandler class serving each connection.
      max_connections: connections served at once, each by its own thread.
      busy_response: the bytes written to a connection beyond the limit (a whole HTTP answer,
        a 503) before it is closed.
      busy_thread_name: None: the accepting thread writes `busy_response` at once. Else a
        thread of this name answers the connections beyond the limit in turn, after reading
        what the client sent (up to its headers, 16 KiB or a second) so that closing does not
        reset the connection before the answer is read; beyond its small queue
        (BUSY_QUEUE_SIZE) they are closed unanswered.
      on_busy: called for each connection beyond the limit (e.g. to count it).
      lingering_close: close every connection gracefully: FIN first, then what the client
        still sends is read and dropped (up to 256 KiB or half a second).
      error_log: where a connection's unexpected error is logged (logger.exception); None:
        socketserver's default (the traceback on stderr).
      request_queue_size: the listen backlog.
    """
    self.max_connections = max_connections
    self.busy_response = busy_response
    self.request_queue_size = request_queue_size
    self._slots = threading.BoundedSemaphore(max_connections)
    self._on_busy = on_busy
    self._lingering_close = lingering_close
    self._error_log = error_log
    self._busy: 'Optional[queue.Queue[Optional[socket.socket]]]' = (
        None if busy_thread_name is None else queue.Queue(maxsize=BUSY_QUEUE_SIZE))
    super().__init__(address, handler)
    if self._busy is not None:
      threading.Thread(target=self._answer_busy, name=busy_thread_name, daemon=True).start()

  def process_request(self, request, client_address):
    if not self._slots.acquire(blocking=False):
      if self._on_busy is not None:
        self._on_busy()
      if self._busy is None:
        self._refuse(request, read_first=False)
        return
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
      self._refuse(request, read_first=True)

  def _refuse(self, request, read_first: bool):
    """Writes `busy_response` (after reading the request when `read_first`) and closes."""
    try:
      if read_first:
        request.settimeout(1.0)
        received = b''
        while b'\r\n\r\n' not in received and len(received) < 16 << 10:
          chunk = request.recv(4096)
          if not chunk:
            break
          received += chunk
      request.sendall(self.busy_response)
    except OSError:
      pass
    finally:
      self.shutdown_request(request)

  def handle_error(self, request, client_address):
    if self._error_log is None:
      super().handle_error(request, client_address)
    else:
      self._error_log.exception('connection from %s failed', client_address)

  def shutdown_request(self, request):
    """With `lingering_close`, closes gracefully: FIN first, then what the client still sends
    is read and dropped (up to 256 KiB or half a second), so that unread request bytes do not
    make the close a reset that could destroy the answer before the client reads it."""
    if not self._lingering_close:
      super().shutdown_request(request)
      return
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
    if self._busy is not None:
      self._busy.put(None)
