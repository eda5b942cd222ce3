"""Real-time personalization (serving/realtime): events -> feature store -> fresh recommendations.

The service runs in this process, on the embedded store and on a private redis-server (started
here on a free port, with AOF persistence); the model is the tiny recommender of
serving_fixtures, served by the local model server in a subprocess. Tests that need Redis skip
when redis-server is not installed (.ci/run installs it).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import apache_beam as beam
import pandas as pd
import pytest
import redis
import requests
from apache_beam.testing import test_pipeline
from apache_beam.testing import util as beam_util
from prometheus_client.parser import text_string_to_metric_families

import serving_fixtures as fx
from contract import data as contract
from conftest import write_csv
from serving.realtime import beam as rt_beam
from serving.realtime import events as ev
from serving.realtime import service as service_lib
from serving.realtime import store as store_lib
from serving.realtime import stream as stream_lib

REDIS_SERVER = shutil.which('redis-server')
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None, reason='redis-server is not installed (apt-get install redis-server; '
    '.ci/run installs it)')
STORES = ['embedded', pytest.param('redis', marks=needs_redis)]


def _interruptible():
  """Runs in the child before exec: SIGINT delivered and at its default, so that Python installs
  its KeyboardInterrupt handler whatever the test process inherited or blocked (a full-suite
  run once left the service deaf to Ctrl-C, though it stops alone)."""
  signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition, timeout_s=15.0, what='condition'):
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.02)


class RedisProcess:
  """A private redis-server: free port, its own directory, AOF on and fsynced at every write."""

  def __init__(self, directory):
    self.directory = str(directory)
    os.makedirs(self.directory, exist_ok=True)
    self.port = fx.free_port()
    self.url = f'redis://127.0.0.1:{self.port}/0'
    self.process = None
    self.start()

  def start(self):
    self.process = subprocess.Popen(
        [REDIS_SERVER, '--port', str(self.port), '--bind', '127.0.0.1', '--dir', self.directory,
         '--appendonly', 'yes', '--appendfsync', 'always', '--save', '', '--daemonize', 'no'],
        stdout=open(os.path.join(self.directory, 'redis.log'), 'a'), stderr=subprocess.STDOUT)
    client = redis.Redis(port=self.port, socket_timeout=1)

    def up():
      try:
        return client.ping()
      except redis.RedisError:
        assert self.process.poll() is None, open(os.path.join(self.directory,
                                                              'redis.log')).read()[-2000:]
        return False

    wait_for(up, what='redis-server')
    client.close()

  def kill(self):
    self.process.send_signal(signal.SIGKILL)
    self.process.wait()

  def stop(self):
    if self.process.poll() is None:
      self.process.terminate()
      self.process.wait(timeout=10)


@pytest.fixture(scope='module')
def items_csv(tmp_path_factory):
  return write_csv(tmp_path_factory.mktemp('realtime_items') / 'items.csv',
                   ['item_id', 'title'], [(item, f'Title of {item}') for item in fx.ITEMS])


@pytest.fixture(scope='module')
def stack(tmp_path_factory, items_csv):
  """The local model server serving the tiny recommender, and the service's CLI next to it.

  Both are subprocesses started together, so that their TensorFlow imports overlap.
  """
  root = tmp_path_factory.mktemp('realtime_model')
  fx.publish(fx.save_model(str(root / 'saved'), seed=1), str(root / 'base'), 1)
  grpc_port, rest_port, cli_port = fx.free_port(), fx.free_port(), fx.free_port()
  env = dict(os.environ, PYTHONPATH=fx.REPO, TF_USE_LEGACY_KERAS='1', TF_CPP_MIN_LOG_LEVEL='2')
  logs = {name: str(root / f'{name}.log') for name in ('model_server', 'cli')}
  with open(logs['model_server'], 'w') as log:
    process = subprocess.Popen(
        fx.local_server_command() + [f'--model_name={fx.MODEL}',
                                     f'--model_base_path={root / "base"}',
                                     f'--port={grpc_port}', f'--rest_api_port={rest_port}'],
        stdout=log, stderr=subprocess.STDOUT, cwd=fx.REPO, env=env)
  server = fx.Server('local', grpc_port, rest_port, process=process,
                     log_path=logs['model_server'])
  with open(logs['cli'], 'w') as log:
    cli = subprocess.Popen(
        [sys.executable, '-m', 'serving.realtime.service', '--model-server', server.target,
         '--items', items_csv, '--embedded', '--host', '127.0.0.1', '--port', str(cli_port)],
        stdout=log, stderr=subprocess.STDOUT, cwd=fx.REPO, env=env, preexec_fn=_interruptible)
  try:
    with fx.client.RecommenderClient(server.target, fx.MODEL, timeout=2) as status:
      assert status.wait_available(180, alive=lambda: process.poll() is None), server.log()
    yield server, cli, f'http://127.0.0.1:{cli_port}', logs['cli']
  finally:
    if cli.poll() is None:
      cli.kill()
    server.stop()


@pytest.fixture(scope='module')
def model_server(stack):
  return stack[0]


@pytest.fixture
def redis_server(tmp_path):
  if REDIS_SERVER is None:
    pytest.skip('redis-server is not installed')
  server = RedisProcess(tmp_path / 'redis')
  yield server
  server.stop()


class Running:
  """A started service and its HTTP server; get/post return (status, JSON)."""

  def __init__(self, service, http):
    self.service, self.http, self.url = service, http, http.url
    self._session = requests.Session()

  def get(self, path='/recommend', **params):
    response = self._session.get(self.url + path, params=params, timeout=10)
    return response.status_code, response.json()

  def post(self, body, raw=False):
    response = self._session.post(self.url + '/events', data=body if raw else json.dumps(body),
                                  timeout=10)
    return response.status_code, response.json()

  def counters(self):
    return self.get('/stats')[1]['counters']

  def stop(self):
    self.http.stop()
    self.service.close()
    self._session.close()


@pytest.fixture
def start_service(model_server, items_csv):
  """Starts services on the embedded store (url None) or on Redis; stops them at the end."""
  started = []

  def start(redis_url=None, http_options=None, **kwargs):
    """`http_options`: HttpServer's keyword arguments (limits, token); the rest build_service's.
    """
    service = service_lib.build_service(model_server.target, items_csv, redis_url,
                                        consumer_name='test', **kwargs)
    http = service_lib.HttpServer(service, port=0, **(http_options or {})).start()
    started.append(Running(service.start(), http))
    return started[-1]

  yield start
  for running in started:
    running.stop()


@pytest.fixture
def service(request, start_service):
  """A service on each store kind (the redis one on a private redis-server)."""
  if request.param == 'embedded':
    yield start_service()
    return
  server = RedisProcess(request.getfixturevalue('tmp_path') / 'redis')
  yield start_service(server.url)
  server.stop()


def event(user, item, timestamp, **extra):
  return dict(user_id=user, item_id=item, timestamp=timestamp, **extra)


def wait_applied(running, user, item):
  """Waits until the user's history (as the service reads it) ends with the item."""
  wait_for(lambda: running.service.history(user)[0][-1:] == [item], what=f'{item} applied')


# The plain functions.

@pytest.mark.parametrize('raw, reason', [
    ({'item_id': 'a', 'timestamp': 1}, "field 'user_id': required"),
    ({'user_id': ' ', 'item_id': 'a', 'timestamp': 1}, "field 'user_id': must not be empty"),
    ({'user_id': 'u', 'timestamp': 1}, "field 'item_id': required"),
    ({'user_id': 'u', 'item_id': 'a'}, "field 'timestamp': required"),
    ({'user_id': 'u', 'item_id': 'a', 'timestamp': 'yesterday'},
     "field 'timestamp': cannot parse 'yesterday' (expected int64 unix seconds or an ISO-8601"),
    ({'user_id': 'u', 'item_id': 'a', 'timestamp': 1, 'event_type': 'buy'},
     "field 'event_type': 'buy' is not one of view/click/add_to_cart/purchase"),
    ({'user_id': 'u', 'item_id': 'a', 'timestamp': 1, 'quantity': -2},
     "field 'quantity': expected a positive integer, got -2"),
    ({'user_id': 'u', 'item_id': ['a'], 'timestamp': 1}, "field 'item_id': expected a string"),
    (['not', 'an', 'object'], "field 'event': expected a JSON object"),
])
def test_invalid_events_give_a_one_line_reason_naming_the_field(raw, reason):
  with pytest.raises(ev.EventError) as error:
    ev.parse_event(raw)
  assert reason in str(error.value) and '\n' not in str(error.value)


POISON_TIMESTAMPS = ['1e400', '+-5', '\u00b2', 'inf', 'nan', '-inf', '\u0661\u0662', '0x10',
                     '1' * 5000, 10**30, 10**5000, -5, '-5', float('inf'), float('nan'),
                     ev.MAX_TIMESTAMP, '9999-12-31', '1969-12-31T23:59:59Z']
POISON_QUANTITIES = ['+-2', '\u00b2', '1e400', 'inf', float('inf'), float('nan'), 2**63,
                     '9' * 5000, 10**5000, '\u0661', '2.0', 0, '-2', True]


@pytest.mark.parametrize('value', POISON_TIMESTAMPS, ids=lambda v: contract.shown(v)[:20])
def test_poison_timestamps_raise_only_event_error(value):
  """Overflowing, non-finite, non-ASCII or out-of-range timestamps: a one-line EventError."""
  for parse in (ev.parse_timestamp,
                lambda v: ev.parse_event({'user_id': 'u', 'item_id': 'i', 'timestamp': v})):
    with pytest.raises(ev.EventError) as error:
      parse(value)
    message = str(error.value)
    assert message.startswith("field 'timestamp': ") and '\n' not in message
    assert len(message) < 200 and error.value.field == 'timestamp'


@pytest.mark.parametrize('value', POISON_QUANTITIES, ids=lambda v: contract.shown(v)[:20])
def test_poison_quantities_raise_only_event_error(value):
  with pytest.raises(ev.EventError) as error:
    ev.parse_event({'user_id': 'u', 'item_id': 'i', 'timestamp': 1, 'quantity': value})
  message = str(error.value)
  assert message.startswith("field 'quantity': expected a positive integer")
  assert '\n' not in message and len(message) < 200


def test_accepted_ranges_keep_valid_values():
  assert ev.parse_timestamp(ev.MIN_TIMESTAMP) == 0
  assert ev.parse_timestamp(str(ev.MAX_TIMESTAMP - 1)) == ev.MAX_TIMESTAMP - 1
  assert ev.parse_timestamp('2099-12-31T23:59:59Z') == ev.MAX_TIMESTAMP - 1
  assert ev.parse_timestamp(' +1291192440 ') == ev.parse_timestamp(1291192440.9) == 1291192440
  for quantity, expected in [('+5', 5), (' 3 ', 3), (4.0, 4), (ev.MAX_QUANTITY, ev.MAX_QUANTITY)]:
    parsed = ev.parse_event({'user_id': 'u', 'item_id': 'i', 'timestamp': 1,
                             'quantity': quantity})
    assert parsed.quantity == expected
  with pytest.raises(ev.EventError, match="field 'user_id': not valid UTF-8"):
    ev.parse_event({b'user_id': b'\xff', b'item_id': b'i', b'timestamp': b'1'})


def test_event_defaults_and_timestamps_agree_with_the_file_contract():
  """Defaults as in the contract; timestamps parse as contract.data parses files."""
  parsed = ev.parse_event({'user_id': 13047, 'item_id': '84879', 'timestamp': '1291192440'})
  assert parsed == ev.Event('13047', '84879', 1291192440, 'purchase', 1, '')
  values = ['1291192440', '2010-12-01T08:26:00', '2010-12-01 08:26', '2010-12-01T08:26:00Z',
            '2010-12-01T08:26:00+01:00', '1291192440.7', '2010-12-01']
  expected = contract.parse_timestamps(pd.Series(values), 'x').tolist()
  assert [ev.parse_timestamp(v) for v in values] == expected


def random_events(seed, count=300):
  """(event, sequence) pairs with repeated items, equal timestamps and exact duplicates."""
  rng = random.Random(seed)
  pairs = []
  for index in range(count):
    if pairs and rng.random() < 0.1:
      pairs.append((pairs[rng.randrange(len(pairs))][0], (index,)))  # a duplicate, later
    else:
      pairs.append((ev.Event(f'u{rng.randrange(6)}', f'i{rng.randrange(40)}',
                             1000 + index // 4, rng.choice(ev.EVENT_TYPES)), (index,)))
  return pairs


def test_last_n_merge_does_not_depend_on_arrival_order_or_batching():
  """Shuffled or batched application (as consumers see the stream) == the reference."""
  pairs = random_events(seed=3)
  expected = ev.last_n_histories(pairs, size=8)
  assert all(len(h) == len(set(h)) <= 8 for h in expected.values())

  def applied(ordered, batch):
    store = store_lib.EmbeddedFeatureStore(history_size=8)
    for start in range(0, len(ordered), batch):
      store.apply(ordered[start:start + batch])
    return {user: store.history(user) for user in expected}

  for batch in (1, 37, 1000):  # in arrival order, duplicates included
    assert applied(pairs, batch) == expected
  # In any order: a sequence is the arrival order, so shuffles leave the duplicates out (the
  # first arrival of a key is the one that counts).
  distinct, _ = ev.deduplicate(pairs)
  rng = random.Random(0)
  for _ in range(5):
    shuffled = distinct[:]
    rng.shuffle(shuffled)
    assert applied(shuffled, 37) == expected
  # Most recent last; an item the user comes back to moves to the end; duplicates don't count.
  user_pairs = [(ev.Event('u', item, ts), (n,)) for n, (item, ts) in
                enumerate([('a', 1), ('b', 2), ('c', 2), ('a', 3), ('c', 2)])]
  assert ev.last_n_histories(user_pairs, size=3) == {'u': ['b', 'c', 'a']}
  assert ev.last_n_histories(user_pairs, size=2) == {'u': ['c', 'a']}


def test_beam_transforms_give_the_plain_functions_histories():
  """LastNHistories on the DirectRunner (beam.Create) == events.last_n_histories."""
  pairs = random_events(seed=5)
  messages = [(json.dumps(e.to_json()).encode(), seq) for e, seq in pairs]
  messages += [(b'{not json', (10_000,)), (json.dumps({'user_id': 'u1'}).encode(), (10_001,))]
  # The Beam source appends each event's position in its message to the sequence.
  expected = ev.last_n_histories([(e, seq + (0,)) for e, seq in pairs], size=8)
  with test_pipeline.TestPipeline(options=beam.options.pipeline_options.PipelineOptions(
      ['--direct_num_workers=1'])) as pipeline:
    outputs = (pipeline | beam.Create(messages, reshuffle=True)
               | rt_beam.LastNHistories(size=8))
    beam_util.assert_that(outputs['histories'], beam_util.equal_to(list(expected.items())),
                          label='histories')
    beam_util.assert_that(outputs['invalid'] | beam.Map(lambda r: r.split(':')[0]),
                          beam_util.equal_to(['not JSON', "field 'item_id'"]), label='invalid')


def test_event_source_builds_the_kafka_and_pubsub_reads():
  """The production reads are built (not applied: Kafka's needs a Java expansion service)."""
  from apache_beam.io import ReadFromPubSub  # pylint: disable=g-import-not-at-top
  from apache_beam.io.kafka import ReadFromKafka  # pylint: disable=g-import-not-at-top
  args, _ = rt_beam.parse_args(['--source', 'kafka', '--bootstrap-servers', 'broker:9092',
                                '--topic', 'interactions', '--redis', 'redis://r:6379/0'])
  assert isinstance(rt_beam.event_source(args), ReadFromKafka)
  args, _ = rt_beam.parse_args(['--source', 'pubsub', '--subscription',
                                'projects/shop-prod/subscriptions/interactions',
                                '--redis', 'redis://r:6379/0'])
  assert isinstance(rt_beam.event_source(args), ReadFromPubSub)


# The service.

@pytest.mark.parametrize('service', STORES, indirect=True)
def test_an_event_changes_the_users_next_recommendation(service):
  status, before = service.get(user='u1', k=5)
  assert status == 200 and before['history'] == [] and len(before['items']) == 5
  assert before['items'][0]['title'] == f'Title of {before["items"][0]["item_id"]}'
  top = before['items'][0]['item_id']
  assert service.post(event('u1', top, '2011-12-09T12:50:00'))[0] == 202
  wait_applied(service, 'u1', top)
  status, after = service.get(user='u1', k=5)
  assert status == 200 and after['history'] == [top] and after['cached'] is False
  assert after['source'] == service.service.store.name
  assert [i['item_id'] for i in after['items']] != [i['item_id'] for i in before['items']]
  assert top not in [i['item_id'] for i in after['items']]  # the model excludes the history
  # The same request again is served from the cache; another event invalidates it.
  assert service.get(user='u1', k=5)[1]['cached'] is True
  second = after['items'][0]['item_id']
  service.post([event('u1', second, 1323435001)])
  wait_applied(service, 'u1', second)
  status, third = service.get(user='u1', k=5)
  assert third['cached'] is False and third['history'] == [top, second]


@pytest.mark.parametrize('service', STORES, indirect=True)
def test_malformed_events_are_rejected_counted_and_do_not_stop_the_stream(service):
  status, body = service.post({'user_id': 'u2', 'item_id': 'i01', 'timestamp': 'yesterday'})
  assert status == 400 and "field 'timestamp': cannot parse 'yesterday'" in body['error']
  status, body = service.post([event('u2', 'i01', 5), {'user_id': 'u2', 'timestamp': 6}])
  assert status == 400 and body['error'].startswith("event 1: field 'item_id': required")
  assert body['accepted'] == 0  # a batch is accepted whole or not at all
  status, body = service.post('{"user_id": ', raw=True)
  assert status == 400 and body['error'].startswith('body is not valid JSON')
  counters = service.counters()
  assert counters['events_malformed'] == 3 and counters['events_rejected'] == 4
  assert counters['malformed_field:timestamp'] == 1 and counters['malformed_field:item_id'] == 1
  metrics = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
             for family in text_string_to_metric_families(
                 requests.get(service.url + '/metrics', timeout=5).text)
             for sample in family.samples}
  assert metrics[('realtime_events_malformed_total', ())] == 3
  assert metrics[('realtime_events_malformed_by_field_total', (('field', 'timestamp'),))] == 1
  assert ('realtime_recommend_latency_seconds_count', ()) in metrics
  if service.service.store.name == 'redis':
    # Another producer writes a bad entry straight into the stream: dead-lettered, counted.
    client = service.service.store.client
    client.xadd(service.service.consumer.stream, {'user_id': 'u2', 'item_id': 'i09'})
    wait_for(lambda: service.service.consumer.counters['malformed'] == 1, what='dead letter')
    dead = client.xrange(service.service.consumer.dead_stream)
    assert len(dead) == 1 and "field 'timestamp': required" in dead[0][1]['error']
    assert service.get('/stats')[1]['stream']['pending'] == 0
  assert service.post(event('u2', 'i02', 7))[0] == 202
  wait_applied(service, 'u2', 'i02')
  assert service.get(user='u2')[1]['history'] == ['i02']


def test_unknown_users_and_empty_histories_get_recommendations(start_service):
  service = start_service()
  for user in ['u3', 'never-seen-before']:  # a known user without events, an unknown user
    status, body = service.get(user=user, query='red lantern')
    assert status == 200 and body['history'] == [] and len(body['items']) == fx.K
  status, body = service.post(event('never-seen-before', 'not-in-the-catalog', 1))
  assert status == 202
  status, body = service.get(user='never-seen-before', k=3)
  assert status == 200 and body['history'] == ['not-in-the-catalog'] and len(body['items']) == 3
  assert service.get()[0] == 400 and service.get(user='u1', k='0')[0] == 400


def test_duplicate_events_are_dropped(start_service):
  """A retried event (same fields, or same event_id) counts once and keeps its place."""
  service = start_service()
  service.post([event('d1', 'i01', 100), event('d1', 'i02', 100), event('d1', 'i03', 90,
                                                                         event_id='e-3')])
  status, body = service.post([event('d1', 'i01', 100), event('d1', 'i04', 95, event_id='e-3')])
  assert status == 202 and body['duplicates'] == 2
  assert service.get(user='d1')[1]['history'] == ['i03', 'i01', 'i02']


@needs_redis
def test_a_redis_restart_loses_no_acknowledged_event(start_service, redis_server):
  """kill -9 of Redis: answers go on from the fallback, and every 202'd event comes back."""
  service = start_service(redis_server.url)
  rng = random.Random(7)
  sent = [event(f'r{n % 5}', rng.choice(fx.ITEMS), 1_300_000_000 + n // 3) for n in range(40)]
  for start in range(0, 30, 10):
    assert service.post(sent[start:start + 10])[0] == 202
  wait_for(lambda: service.service.consumer.counters['entries'] == 30, what='30 applied')
  assert service.get(user='r0')[1]['source'] == 'redis'
  # Acknowledged by the log (202), possibly not applied yet, when Redis dies.
  assert service.post(sent[30:])[0] == 202
  redis_server.kill()
  status, body = service.get(user='r0')
  assert status == 200 and body['source'] == 'fallback' and body['items']
  assert service.post(event('r0', 'i00', 1))[0] == 503
  redis_server.start()
  expected = ev.last_n_histories([(ev.parse_event(e), (n,)) for n, e in enumerate(sent)])
  fresh = store_lib.RedisFeatureStore(redis_server.url)
  wait_for(lambda: all(fresh.history(u) == h for u, h in expected.items()), timeout_s=20,
           what='histories back in Redis')
  wait_for(lambda: service.get(user='r0')[1]['source'] == 'redis', what='service reconnected')
  for user, history in expected.items():
    status, body = service.get(user=user)
    assert status == 200 and body['history'] == history and body['source'] == 'redis'
  assert service.get('/stats')[1]['stream']['pending'] == 0
  assert service.post(event('r0', 'i00', 1_400_000_000))[0] == 202  # and it takes events again


@needs_redis
def test_pending_entries_are_applied_after_a_consumer_restart(redis_server):
  """Entries read but not acknowledged (the consumer died) are applied by its next run."""
  store = store_lib.RedisFeatureStore(redis_server.url)
  stream = stream_lib.stream_key()
  stream_lib.RedisEventLog(redis_server.url, stream).append(
      [ev.Event('p1', 'i01', 1), ev.Event('p1', 'i02', 2), ev.Event('p2', 'i03', 3)])
  crashed = stream_lib.StreamConsumer(store, stream, consumer='a')
  crashed._ensure_group()
  crashed._own_pending_done = True
  # pylint: disable=protected-access
  assert len(crashed._read()) == 3  # read, then "crash" before applying
  assert store.history('p1') == [] and crashed.pending() == 3
  restarted = stream_lib.StreamConsumer(store, stream, consumer='a')
  assert restarted.run_once() == 3  # its own pending entries first
  assert store.history('p1') == ['i01', 'i02'] and store.history('p2') == ['i03']
  assert restarted.pending() == 0
  # Another consumer's pending entries are claimed once idle (XAUTOCLAIM).
  stream_lib.RedisEventLog(redis_server.url, stream).append([ev.Event('p2', 'i04', 4)])
  crashed._read()
  other = stream_lib.StreamConsumer(store, stream, consumer='b', claim_idle_ms=0)
  other.run_once()  # no own pending
  assert other.run_once() == 1 and store.history('p2') == ['i03', 'i04']


GOOD = {'user_id': 'g1', 'item_id': 'i01', 'timestamp': '10'}
POISON_ENTRIES = [  # (the field named in the reason, the entry's fields)
    ('timestamp', dict(GOOD, timestamp='1e400')), ('timestamp', dict(GOOD, timestamp='+-5')),
    ('timestamp', dict(GOOD, timestamp='\u00b2')), ('timestamp', dict(GOOD, timestamp='-5')),
    ('timestamp', dict(GOOD, timestamp=str(10**30))), ('quantity', dict(GOOD, quantity='+-2')),
    ('user_id', dict(GOOD, user_id=b'\xff\xfe')),  # not UTF-8
]


def drain(consumer, runs=4):
  """Runs the consumer until it finds no entry (its first run reads its own pending ones)."""
  total = 0
  for _ in range(runs):
    total += consumer.run_once()
  return total


def dead_letters(redis_url, dead_stream):
  client = redis.Redis.from_url(redis_url)  # bytes: the fields as the producer wrote them
  try:
    return [(entry_id.decode(), fields) for entry_id, fields in client.xrange(dead_stream)]
  finally:
    client.close()


@needs_redis
@pytest.mark.parametrize('field, poison', POISON_ENTRIES,
                         ids=[contract.shown(p[field]) for field, p in POISON_ENTRIES])
def test_a_poison_entry_is_dead_lettered_and_its_batch_applied(redis_server, field, poison):
  """A bad entry between two good ones: the good ones applied, the bad one dead-lettered once."""
  store = store_lib.RedisFeatureStore(redis_server.url)
  stream = stream_lib.stream_key()
  ids = [store.client.xadd(stream, fields) for fields in
         [GOOD, poison, dict(GOOD, user_id='g2', item_id='i02', timestamp='11')]]
  consumer = stream_lib.StreamConsumer(store, stream, consumer='a')
  assert drain(consumer) == 3
  assert store.history('g1') == ['i01'] and store.history('g2') == ['i02']
  dead = dead_letters(redis_server.url, consumer.dead_stream)
  assert len(dead) == 1 and dead[0][1][b'entry_id'].decode() == ids[1]
  assert f"field '{field}': ".encode() in dead[0][1][b'error']
  original = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in poison.items()}
  assert {k: v for k, v in dead[0][1].items() if k not in (b'error', b'entry_id')} == original
  assert consumer.pending() == 0 and consumer.dead_lettered == 1
  assert consumer.counters['dead_lettered'] == consumer.counters['malformed'] == 1
  store.client.xadd(stream, dict(GOOD, item_id='i03', timestamp='12'))  # later ones still apply
  assert drain(consumer, runs=1) == 1 and store.history('g1') == ['i01', 'i03']


@needs_redis
def test_a_pending_poison_entry_does_not_block_the_stream_after_a_redis_restart(redis_server):
  """The issue's scenario: read, crash, Redis restarts; the re-read batch must not stick."""
  store = store_lib.RedisFeatureStore(redis_server.url)
  stream = stream_lib.stream_key()
  for fields in [GOOD, dict(GOOD, timestamp='1e400'), dict(GOOD, item_id='i02', timestamp='11')]:
    store.client.xadd(stream, fields)
  crashed = stream_lib.StreamConsumer(store, stream, consumer='a')
  # pylint: disable=protected-access
  crashed._ensure_group()
  crashed._own_pending_done = True
  assert len(crashed._read()) == 3 and crashed.pending() == 3  # read, then "crash"
  redis_server.kill()
  redis_server.start()
  store = store_lib.RedisFeatureStore(redis_server.url)
  restarted = stream_lib.StreamConsumer(store, stream, consumer='a')
  assert restarted.pending() == 3  # the AOF kept the pending list
  store.client.xadd(stream, dict(GOOD, item_id='i03', timestamp='12'))  # accepted afterwards
  assert drain(restarted) == 4
  assert store.history('g1') == ['i01', 'i02', 'i03']
  assert restarted.pending() == 0 and restarted.dead_lettered == 1
  assert b'not a finite number' in dead_letters(redis_server.url,
                                                restarted.dead_stream)[0][1][b'error']


@needs_redis
def test_an_entry_whose_apply_fails_alone_is_dead_lettered(redis_server, monkeypatch):
  """A non-Redis failure of one entry's apply: the entry is found and dead-lettered at once."""
  store = store_lib.RedisFeatureStore(redis_server.url)
  stream = stream_lib.stream_key()
  for item in ['i01', 'boom', 'i02']:
    store.client.xadd(stream, dict(GOOD, item_id=item))
  apply = store.apply

  def failing_apply(events, **kwargs):
    if any(event.item_id == 'boom' for event, _ in events):
      raise ValueError('a bug')
    return apply(events, **kwargs)

  monkeypatch.setattr(store, 'apply', failing_apply)
  consumer = stream_lib.StreamConsumer(store, stream, consumer='a')
  assert drain(consumer) == 3
  assert store.history('g1') == ['i01', 'i02'] and consumer.pending() == 0
  dead = dead_letters(redis_server.url, f'{stream}:dead')
  assert len(dead) == 1 and dead[0][1][b'item_id'] == b'boom'
  assert dead[0][1][b'error'] == b'apply failed: ValueError: a bug'
  assert consumer.dead_lettered == 1 and consumer.counters['malformed'] == 0


@needs_redis
def test_an_entry_failing_with_a_redis_error_stays_pending_until_max_deliveries(redis_server):
  """A Redis error keeps the batch pending; an entry that keeps failing is capped."""
  store = store_lib.RedisFeatureStore(redis_server.url)
  stream = stream_lib.stream_key()
  store.client.set(store.entries_key('wrong'), 'not a hash')  # WRONGTYPE for this user's apply
  for user in ['g1', 'wrong', 'g2']:
    store.client.xadd(stream, dict(GOOD, user_id=user))
  consumer = stream_lib.StreamConsumer(store, stream, consumer='a', claim_idle_ms=0,
                                       max_deliveries=3, dead_stream='dead-letters')
  assert consumer.run_once() == 0  # no own pending entries
  for _ in range(2):  # delivered once, then claimed again: the whole batch stays pending
    with pytest.raises(redis.ResponseError, match='WRONGTYPE'):
      consumer.run_once()
    assert consumer.pending() == 3 and store.history('g1') == []
  assert consumer.run_once() == 3  # the third delivery: each applied alone
  assert store.history('g1') == ['i01'] and store.history('g2') == ['i01']
  dead = dead_letters(redis_server.url, 'dead-letters')
  assert len(dead) == 1 and dead[0][1][b'user_id'] == b'wrong'
  assert dead[0][1][b'error'].startswith(b'delivered 3 times; apply failed: ResponseError')
  assert consumer.pending() == 0 and consumer.dead_lettered == 1


def wait_for_cli(stack):
  """Waits until the `stack` fixture's service process answers /healthz; returns its URL."""
  _, process, url, log_path = stack

  def up():
    assert process.poll() is None, open(log_path).read()
    try:
      return requests.get(url + '/healthz', timeout=1).ok
    except requests.ConnectionError:
      return False

  wait_for(up, timeout_s=120, what='the service')
  return url


def test_cli_serves_on_the_embedded_store(stack):
  """`python -m serving.realtime.service --embedded ...` answers events and recommendations."""
  _, process, _, log_path = stack
  url = wait_for_cli(stack)
  assert requests.post(url + '/events', json=event('c1', 'i05', 1), timeout=5).status_code == 202
  body = requests.get(url + '/recommend', params={'user': 'c1', 'k': 2}, timeout=5).json()
  assert body['history'] == ['i05'] and len(body['items']) == 2
  assert body['source'] == 'embedded'
  process.send_signal(signal.SIGINT)  # Ctrl-C stops it cleanly
  try:
    code = process.wait(timeout=60)
  except subprocess.TimeoutExpired:
    process.kill()
    code = 'still running 60 s after SIGINT'
  assert code == 0, open(log_path).read()[-2000:]
