"""The real-time service answers every request cleanly (serving/realtime/service.py).

Real HTTP over sockets to the real server: http.client for well-formed requests, raw sockets
for malformed ones. The service runs in this process (start_service of test_realtime.py) on the
embedded store or on a private redis-server, in front of the tiny model of serving_fixtures;
the last test talks to the `python -m serving.realtime.service` process of the `stack` fixture.
"""

import http.client
import io
import json
import logging
import signal
import socket
import threading
import time

import pytest
import requests

# pylint: disable=unused-import
from test_realtime import items_csv, model_server, needs_redis, redis_server, stack
from test_realtime import start_service
# pylint: enable=unused-import
from test_realtime import event, wait_applied, wait_for, wait_for_cli
import serving_fixtures as fx
from serving.realtime import events as ev
from serving.realtime import service as service_lib


class _Unclosable(io.BytesIO):
  """Bytes that http.client.HTTPResponse can read response after response from."""

  def close(self):
    pass

  def makefile(self, *args, **kwargs):  # pylint: disable=unused-argument
    return self


def parse_responses(data):
  """[(status, headers with lower-case names, body bytes)] of responses one after another."""
  stream = _Unclosable(data)
  answers = []
  while stream.tell() < len(data):
    response = http.client.HTTPResponse(stream)
    response.begin()
    answers.append((response.status, {k.lower(): v for k, v in response.getheaders()},
                    response.read()))
  return answers


def exchange(port, data, timeout_s=10.0):
  """Sends raw bytes on a new connection and reads until the server closes it."""
  with socket.create_connection(('127.0.0.1', port), timeout=timeout_s) as sock:
    sock.sendall(data)
    received = b''
    while True:
      chunk = sock.recv(65536)
      if not chunk:
        return received
      received += chunk


def call(port, method, path, body=None, headers=None, connection=None):
  """One request on `connection` (default: a new one); (status, headers, JSON or text)."""
  conn = connection or http.client.HTTPConnection('127.0.0.1', port, timeout=10)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    headers = {k.lower(): v for k, v in response.getheaders()}
    is_json = headers.get('content-type') == 'application/json'
    return response.status, headers, json.loads(data) if is_json else data.decode()
  finally:
    if connection is None:
      conn.close()


def port_of(running):
  return running.http.port


# 1. Nothing uncaught: every bad request is a JSON 4xx, every fault a JSON 500.

def test_non_ascii_digits_are_a_400_naming_the_parameter_or_header(start_service):
  """'²' passes str.isdigit and then fails int(): it was a dropped connection."""
  running = start_service()
  port = port_of(running)
  for k in ['\u00b2', '\u0661', '1' * 5000, '-1', '', '1e3', '0', '000', ' ']:
    status, _, body = call(port, 'GET', '/recommend?user=u1&k=' + requests.utils.quote(k))
    assert status == 400 and "parameter 'k'" in body['error'], (k, body)
  for length in [b'\xb2', b'\xd9\xa1', b'-5', b'5, 6', b'1' * 5000]:
    answers = parse_responses(exchange(port, b'POST /events HTTP/1.1\r\nHost: t\r\n'
                                       b'Content-Length: ' + length + b'\r\n\r\n{}'))
    assert len(answers) == 1, length
    status, headers, data = answers[0]
    assert headers['connection'] == 'close', length
    if length.isdigit():  # a count, too large for any body (int() would refuse its digits)
      assert status == 413 and 'more than 10**18' in json.loads(data)['error']
    else:
      assert status == 400 and "header 'Content-Length'" in json.loads(data)['error'], length
  assert call(port, 'GET', '/recommend?user=u1&k=3')[0] == 200  # and it still serves
  assert call(port, 'GET', '/recommend?user=u1&k=0003')[2]['k'] == 3


def test_deeply_nested_json_is_a_400_not_a_recursion_error(start_service):
  running = start_service()
  for body in [b'[' * 100_000, b'{"a":' * 50_000]:
    status, _, answer = call(port_of(running), 'POST', '/events', body)
    assert status == 400 and answer == {'error': 'body is not valid JSON: nested too deeply',
                                        'accepted': 0}
  assert running.counters()['malformed_field:json'] == 2


def test_lone_surrogates_are_a_400_naming_the_field_and_break_no_user(start_service):
  """JSON '"\\ud800"' decodes to a lone surrogate, which no store nor the model can encode."""
  running = start_service()
  port = port_of(running)
  for field in ['user_id', 'item_id', 'event_id', 'query']:
    raw = json.dumps(dict(event('s1', 'i01', 5), **{field: 'x\ud800'}))
    assert '\\ud800' in raw
    status, _, body = call(port, 'POST', '/events', raw)
    assert status == 400 and body['error'].startswith(f"field '{field}': not valid"), body
  # The service's own entry point refuses one too (it used to raise UnicodeEncodeError).
  status, body = running.service.recommend('s\ud800')
  assert status == 400 and body['error'].startswith("parameter 'user': not valid Unicode")
  # A history item that is not valid text (only a direct write can put one there) is skipped:
  # the user still gets answers, before and after the next valid event.
  running.service.store.apply([(ev.Event('s1', 'bad\udcff', 1), (1 << 40,))])
  status, _, body = call(port, 'GET', '/recommend?user=s1&k=3')
  assert status == 200 and body['history'] == [] and len(body['items']) == 3
  assert call(port, 'POST', '/events', json.dumps(event('s1', 'i02', 6)))[0] == 202
  status, _, body = call(port, 'GET', '/recommend?user=s1&k=3')
  assert status == 200 and body['history'] == ['i02']


def test_an_internal_fault_is_a_json_500_with_the_traceback_only_in_the_log(start_service,
                                                                            caplog):
  running = start_service()

  class BrokenCatalog:
    def title(self, item_id):
      raise RuntimeError(f'secret detail of {item_id}')

    def __len__(self):
      return 0

  running.service.catalog = BrokenCatalog()
  with caplog.at_level(logging.ERROR, logger='realtime.service'):
    status, headers, body = call(port_of(running), 'GET', '/recommend?user=f1&k=2')
  assert status == 500 and headers['content-type'] == 'application/json'
  assert 'internal error' in body['error'] and 'secret' not in json.dumps(body)
  assert any(r.exc_info and 'secret detail' in str(r.exc_info[1]) for r in caplog.records)
  assert running.service.counters.snapshot()['http_internal_errors'] == 1
  # Base-class errors (unsupported method, bad request line) are JSON as well.
  status, _, body = call(port_of(running), 'PUT', '/events', b'{}')
  assert status == 501 and 'PUT' in body['error']
  status, _, data = parse_responses(exchange(port_of(running), b'NONSENSE\r\n\r\n'))[0]
  assert status == 400 and 'Bad request syntax' in json.loads(data)['error']


# 2. Limits.

def test_long_ids_and_queries_are_refused_before_any_cache_or_store(start_service):
  running = start_service()
  port = port_of(running)
  status, _, body = call(port, 'GET', '/recommend?user=' + 'a' * 30_000)
  assert status == 400 and body['error'] == "parameter 'user': longer than 256 characters (30000)"
  status, _, body = call(port, 'GET', '/recommend?user=u1&query=' + 'q' * 1025)
  assert status == 400 and body['error'].startswith("parameter 'query': longer than 1024")
  assert len(running.service.cache) == 0 and len(running.service.mirror._histories) == 0
  assert 'recommend_requests' not in running.counters()
  status, _, body = call(port, 'POST', '/events', json.dumps(event('a' * 300, 'i01', 1)))
  assert status == 400 and body['error'].startswith("field 'user_id': longer than 256")
  # Tighter limits, as --max-id-length 8 --max-query-length 4 set them.
  tight = start_service(max_id_length=8, max_query_length=4)
  port = port_of(tight)
  assert call(port, 'GET', '/recommend?user=abcdefgh&k=1')[0] == 200
  status, _, body = call(port, 'GET', '/recommend?user=abcdefghi')
  assert status == 400 and body['error'].startswith("parameter 'user': longer than 8")
  batch = [event('u1', 'i01', 1), event('u1', 'i0123456789', 2), event('u1', 'i02', 3,
                                                                       query='long query')]
  status, _, body = call(port, 'POST', '/events', json.dumps(batch))
  assert status == 400 and body['accepted'] == 0
  assert body['errors'] == ["event 1: field 'item_id': longer than 8 characters",
                            "event 2: field 'query': longer than 4 characters"]
  counters = tight.counters()
  assert counters['events_received'] == 3 and counters['events_malformed'] == 2
  with pytest.raises(ValueError, match='max_id_length must be from 1 to 256'):
    service_lib.build_service('127.0.0.1:1', max_id_length=257)


def test_max_body_bytes_is_a_413_that_closes_the_connection(start_service):
  running = start_service(http_options={'max_body_bytes': 120})
  port = port_of(running)
  small = json.dumps(event('b1', 'i01', 1)).encode()
  assert len(small) <= 120 and call(port, 'POST', '/events', small)[0] == 202
  big = json.dumps([event('b1', 'i01', 1)] * 3).encode()
  answers = parse_responses(exchange(port, b'POST /events HTTP/1.1\r\nHost: t\r\n'
                                     b'Content-Length: %d\r\n\r\n' % len(big) + big))
  assert len(answers) == 1 and answers[0][0] == 413
  assert answers[0][1]['connection'] == 'close'
  assert json.loads(answers[0][2])['error'] == f'body of {len(big)} bytes, at most 120'


def test_connections_beyond_the_limit_get_a_503_and_no_thread(start_service):
  running = start_service(http_options={'max_connections': 2, 'read_timeout_s': 10})
  port = port_of(running)
  held = [http.client.HTTPConnection('127.0.0.1', port, timeout=10) for _ in range(2)]
  for conn in held:  # answered, and kept alive: each holds its slot and thread
    assert call(port, 'GET', '/healthz', connection=conn)[0] == 200
  threads = threading.active_count()
  extra = [socket.create_connection(('127.0.0.1', port), timeout=10) for _ in range(10)]
  for sock in extra:
    sock.sendall(b'GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n')
  assert threading.active_count() <= threads  # no thread per refused connection
  for sock in extra:
    received = b''
    while True:
      chunk = sock.recv(65536)
      if not chunk:
        break
      received += chunk
    sock.close()
    status, headers, data = parse_responses(received)[0]
    assert status == 503 and headers['retry-after'] == '1' and headers['connection'] == 'close'
    assert 'too many connections' in json.loads(data)['error']
  assert running.service.counters.snapshot()['http_connections_rejected'] == 10
  for conn in held:
    conn.close()

  def served():
    try:
      return call(port, 'GET', '/healthz')[0] == 200
    except (OSError, http.client.HTTPException):
      return False

  wait_for(served, timeout_s=5, what='a slot freed by a closed connection')


def test_the_read_timeout_closes_stalled_and_idle_connections(start_service):
  running = start_service(http_options={'max_connections': 1, 'read_timeout_s': 0.5})
  port = port_of(running)
  for partial in [b'GET /healthz HTTP/1.1\r\nHost:', b'POST /events HTTP/1.1\r\nHost: t\r\n'
                  b'Content-Length: 100\r\n\r\n{"user_id"']:
    deadline = time.monotonic() + 5
    while True:
      start = time.monotonic()
      received = exchange(port, partial)  # returns when the server closes
      assert time.monotonic() - start < 5
      status = parse_responses(received)[0][0] if received else None
      if status != 503:  # 503: the previous connection's thread has not freed the slot yet
        break
      assert time.monotonic() < deadline, 'the slot stayed taken'
      time.sleep(0.1)
    assert status in (None, 408)  # a stalled body is answered 408 before the close
  idle = _connect_when_free(port)  # the closed connections' slot is free again
  time.sleep(2.0)  # idle keep-alive beyond the timeout: closed, its only slot free again
  assert idle.sock.recv(1) == b''
  idle.close()
  _connect_when_free(port).close()


def _connect_when_free(port, timeout_s=5.0):
  """A kept-alive connection whose GET /healthz got 200. A closed connection's thread frees
  its slot as it finishes (a graceful close drains the socket briefly), so a new connection
  may find the only slot taken for a moment: retried until `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while True:
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    status = call(port, 'GET', '/healthz', connection=conn)[0]
    if status == 200:
      return conn
    conn.close()
    assert time.monotonic() < deadline, f'the slot stayed taken (last status {status})'
    time.sleep(0.1)


# 3. k, bodies left on a connection, /healthz and the 503 of POST /events on Redis.

def test_k_above_the_models_k_is_a_400_saying_the_maximum(start_service):
  running = start_service()
  port = port_of(running)
  status, _, body = call(port, 'GET', f'/recommend?user=u1&k={fx.K + 1}')
  assert status == 400 and body['max_k'] == fx.K
  assert f'this model serves at most {fx.K} items' in body['error']
  status, _, body = call(port, 'GET', f'/recommend?user=u1&k={fx.K}')
  assert status == 200 and len(body['items']) == body['k_served'] == fx.K


def test_an_early_answer_leaves_no_body_on_a_kept_alive_connection(start_service):
  """A 404 (or 401, 411, 413) answered before the body is read must not leave the body to be
  parsed as the next request: read and dropped when small, else the connection closes."""
  port = port_of(start_service())
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
  try:  # a 404 and a GET with a body, each followed by a request on the same connection
    assert call(port, 'POST', '/nope', b'x' * 5000, connection=conn)[0] == 404
    assert call(port, 'GET', '/healthz', connection=conn)[0] == 200
    assert call(port, 'GET', '/recommend?user=u1&k=1', b'{"x": 1}', connection=conn)[0] == 200
    assert call(port, 'GET', '/stats', connection=conn)[0] == 200
  finally:
    conn.close()
  # Pipelined: each answer once, none taken from the body before it.
  data = (b'POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nabcd'
          b'GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n')
  assert [a[0] for a in parse_responses(exchange(port, data))] == [404, 200]
  # A body too large to drop, no length, or a chunked body: the connection closes.
  for headers, status in [(b'Content-Length: 100000\r\n', 404), (b'', 411),
                          (b'Transfer-Encoding: chunked\r\n', 411)]:
    path = b'/nope' if status == 404 else b'/events'
    data = (b'POST ' + path + b' HTTP/1.1\r\nHost: t\r\n' + headers +
            b'\r\n4\r\nabcd\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n')
    answers = parse_responses(exchange(port, data))
    assert [a[0] for a in answers] == [status] and answers[0][1]['connection'] == 'close'
  # A 401 drops the body too.
  port = port_of(start_service(http_options={'token': 't0k'}))
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
  try:
    assert call(port, 'POST', '/events', b'{"user_id": 1}', connection=conn)[0] == 401
    assert call(port, 'GET', '/healthz', connection=conn)[0] == 200
  finally:
    conn.close()


@needs_redis
def test_healthz_is_503_while_redis_hangs(start_service, redis_server):
  running = start_service(redis_server.url)
  port = port_of(running)
  assert call(port, 'GET', '/healthz')[0] == 200
  redis_server.process.send_signal(signal.SIGSTOP)
  try:
    start = time.monotonic()
    status, headers, body = call(port, 'GET', '/healthz')
    assert time.monotonic() - start < 3
    assert status == 503 and body['ok'] is False and 'did not answer PING' in body['error']
    assert headers['retry-after'] == '1'
  finally:
    redis_server.process.send_signal(signal.SIGCONT)
  wait_for(lambda: call(port, 'GET', '/healthz')[0] == 200, what='healthy again')


@needs_redis
def test_a_redis_timeout_on_post_says_the_outcome_is_unknown(start_service, redis_server):
  """The XADD went out, Redis hung: it may be written, so the 503 must not say 'not accepted'.
  """
  running = start_service(redis_server.url)
  port = port_of(running)
  sent = json.dumps(event('t1', 'i07', 1_300_000_000, event_id='evt-1'))
  # The event log's connection is open (on a new one, the hang would come before the XADD).
  assert call(port, 'POST', '/events', json.dumps(event('t0', 'i01', 1)))[0] == 202
  redis_server.process.send_signal(signal.SIGSTOP)
  try:
    status, _, body = call(port, 'POST', '/events', sent)
  finally:
    redis_server.process.send_signal(signal.SIGCONT)
  assert status == 503 and body['outcome'] == 'unknown' and body['accepted'] is None
  assert 'may have been written' in body['error'] and 'not accepted' not in body['error']
  assert 'duplicates (same event_id' in body['error']
  wait_applied(running, 't1', 'i07')  # it was written after all
  status, _, body = call(port, 'POST', '/events', sent)  # the retry the answer asks for
  assert status == 202
  wait_for(lambda: running.service.consumer.counters['duplicates'] == 1, what='dedup')
  assert running.service.history('t1')[0] == ['i07']
  # Redis down, nothing listening: that answer says the events were not written.
  redis_server.kill()
  answers = [call(port, 'POST', '/events', sent)[2] for _ in range(2)]
  assert answers[-1]['outcome'] == 'not_written' and answers[-1]['accepted'] == 0
  assert 'were not written' in answers[-1]['error']


# 4. Exposure.

def test_a_token_guards_every_path_but_healthz(start_service):
  running = start_service(http_options={'token': 's3cret-token'})
  port = port_of(running)
  body = json.dumps(event('a1', 'i01', 1))
  for method, path in [('GET', '/recommend?user=a1'), ('GET', '/stats'), ('GET', '/metrics'),
                       ('POST', '/events'), ('GET', '/nope')]:
    for headers in [{}, {'Authorization': 'Bearer wrong'}, {'Authorization': 's3cret-token'},
                    {'Authorization': 'Bearer s3cret-token-and-more'},
                    {'Authorization': 'Bearer s\u00e9cret'}]:
      status, answer_headers, answer = call(port, method, path,
                                            body if method == 'POST' else None, headers)
      assert status == 401 and answer_headers['www-authenticate'] == 'Bearer', (path, headers)
      assert 'Authorization: Bearer <token>' in answer['error']
  assert call(port, 'GET', '/healthz')[0] == 200
  good = {'Authorization': 'Bearer s3cret-token'}
  assert call(port, 'POST', '/events', body, good)[0] == 202
  assert call(port, 'GET', '/recommend?user=a1&k=2', headers=good)[0] == 200
  assert call(port, 'GET', '/metrics', headers={'Authorization': 'bearer s3cret-token'})[0] == 200
  assert running.service.counters.snapshot()['http_unauthorized'] == 25


def test_the_token_comes_from_the_flag_or_the_environment(monkeypatch):
  monkeypatch.delenv(service_lib.TOKEN_ENV, raising=False)
  assert service_lib.parse_args([]).token is None
  monkeypatch.setenv(service_lib.TOKEN_ENV, 'from-env')
  assert service_lib.parse_args([]).token == 'from-env'
  assert service_lib.parse_args(['--token', 'from-flag']).token == 'from-flag'
  monkeypatch.setenv(service_lib.TOKEN_ENV, '')
  assert service_lib.parse_args([]).token is None


def test_a_non_loopback_host_without_a_token_is_warned_of(start_service, caplog):
  running = start_service()

  def warnings(host, token=None):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='realtime.service'):
      service_lib.HttpServer(running.service, host, 0, token=token).stop_after_interrupt()
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

  exposed = warnings('0.0.0.0')
  assert len(exposed) == 1 and '\n' not in exposed[0]
  assert 'without a token' in exposed[0] and '--token' in exposed[0]
  assert warnings('0.0.0.0', token='t') == []
  assert warnings('127.0.0.1') == [] and warnings('localhost') == []


def test_the_limits_are_flags_with_documented_defaults(capsys):
  args = service_lib.parse_args([])
  assert (args.max_body_bytes, args.max_id_length, args.max_query_length,
          args.max_connections, args.read_timeout) == (1 << 20, 256, 1024, 64, 30.0)
  with pytest.raises(SystemExit):
    service_lib.parse_args(['--help'])
  text = ' '.join(capsys.readouterr().out.split())
  for flag, default in [('--max-body-bytes', '1048576'), ('--max-id-length', '256'),
                        ('--max-query-length', '1024'), ('--max-connections', '64'),
                        ('--read-timeout', '30.0')]:
    assert flag in text and f'(default: {default})' in text.split(flag, 2)[-1][:400], flag
  for bad in [['--max-id-length', '257'], ['--max-connections', '0'], ['--read-timeout', '-1'],
              ['--max-body-bytes', '\u00b2']]:
    with pytest.raises(SystemExit):
      service_lib.parse_args(bad)


def test_the_cli_process_answers_malformed_requests(stack):
  """`python -m serving.realtime.service`: the same answers, and it keeps serving."""
  _, process, _, log_path = stack
  url = wait_for_cli(stack)
  port = int(url.rsplit(':', 1)[1])
  status, _, body = call(port, 'GET', '/recommend?user=c9&k=%C2%B2')
  assert status == 400 and "parameter 'k'" in body['error']
  status, _, data = parse_responses(exchange(port, b'POST /events HTTP/1.1\r\nHost: t\r\n'
                                             b'Content-Length: \xb2\r\n\r\n'))[0]
  assert status == 400 and "header 'Content-Length'" in json.loads(data)['error']
  assert call(port, 'POST', '/events', b'[' * 100_000)[0] == 400
  assert call(port, 'GET', '/recommend?user=c9&k=2')[0] == 200
  assert process.poll() is None and 'Traceback' not in open(log_path).read()
