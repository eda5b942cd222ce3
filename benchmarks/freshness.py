"""Freshness and latency of the real-time service (serving/realtime): event -> new recommendation.

    python benchmarks/freshness.py [--model output/serving/recommender] [--redis URL | --embedded]
        [--events 200] [--requests 2000] [--threads 1,8] [--json FILE]

Starts, as subprocesses on free ports: the local model server (python -m serving.model_server)
on the model, a private redis-server (temporary directory, appendonly yes, appendfsync
everysec; unless --redis names one or --embedded is given, or redis-server is not installed),
and the service (python -m serving.realtime.service). This process is the client: keep-alive
HTTP connections, one per thread. It measures:

- freshness: POST /events with one event (a catalog item new to the user), then GET /recommend
  for that user again and again until the answer's history ends with that item: the time from
  sending the POST to receiving that answer, over `--events` events (users seeded first);
- POST /events latency (one event per request);
- GET /recommend latency, closed loop with `--threads` client threads, each sending its next
  request when the previous one is answered: cache misses (every request calls the model: each
  (user, k) is asked once) and cache hits (a small hot set asked again and again).

Model: `--model DIR` (a pushed version directory, or the Pusher's base directory whose newest
version is taken); by default output/serving/recommender when `make run` has pushed one, else the
tiny synthetic recommender of tests/serving_fixtures.py. Users and their histories are seeded from
data/online_retail_sample/interactions.csv when the model's items are in it.
"""

import argparse
import csv
import http.client
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
if sys.path and os.path.abspath(sys.path[0] or '.') == _HERE:
  sys.path[0] = REPO  # `python benchmarks/freshness.py`: import the repository's packages
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

SAMPLE = os.path.join(REPO, 'data', 'online_retail_sample')
HISTORY_SEED = 20  # events seeded per user before measuring


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def percentile(values: Sequence[float], q: float) -> float:
  """The nearest-rank percentile."""
  ordered = sorted(values)
  return ordered[min(len(ordered), max(1, math.ceil(q / 100 * len(ordered)))) - 1]


def resolve_model(path: Optional[str], workdir: str
                 ) -> Tuple[str, str, Optional[List[str]]]:
  """(base path for --model_base_path, description, the tiny model's items or None) for
  --model, the default, or the tiny model."""
  candidates = [path] if path else [os.path.join(REPO, 'output', 'serving', 'recommender')]
  for candidate in candidates:
    if candidate and os.path.isfile(os.path.join(candidate, 'saved_model.pb')):
      base = os.path.join(workdir, 'model')
      os.makedirs(base)
      shutil.copytree(candidate, os.path.join(base, '1'))
      return base, os.path.abspath(candidate), None
    if candidate and os.path.isdir(candidate) and any(
        name.isdigit() for name in os.listdir(candidate)):
      return os.path.abspath(candidate), os.path.abspath(candidate), None
  if path:
    raise SystemExit(f'error: {path}: neither a SavedModel nor a directory of versions')
  sys.path.insert(0, os.path.join(REPO, 'tests'))
  import serving_fixtures  # pylint: disable=g-import-not-at-top
  base = os.path.join(workdir, 'model')
  serving_fixtures.publish(serving_fixtures.save_model(os.path.join(workdir, 'tiny'), seed=1),
                           base, 1)
  return (base, 'tests/serving_fixtures.TinyRecommender (no pushed model found)',
          list(serving_fixtures.ITEMS))


def wait_http(url: str, process: subprocess.Popen, log_path: str, timeout_s: float = 300):
  deadline = time.monotonic() + timeout_s
  host, port = url.split('//')[1].split(':')
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise SystemExit(f'error: the service exited:\n{open(log_path).read()[-3000:]}')
    try:
      connection = http.client.HTTPConnection(host, int(port), timeout=1)
      connection.request('GET', '/healthz')
      if connection.getresponse().status == 200:
        return
    except OSError:
      pass
    time.sleep(0.2)
  raise SystemExit(f'error: the service did not answer in {timeout_s} s')


class Client:
  """One keep-alive HTTP connection to the service."""

  def __init__(self, url: str):
    host, port = url.split('//')[1].split(':')
    self._connection = http.client.HTTPConnection(host, int(port), timeout=30)
    self._connection.connect()
    self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

  def call(self, method: str, path: str, body=None) -> Tuple[int, Dict]:
    data = None if body is None else json.dumps(body).encode()
    headers = {'Content-Type': 'application/json'} if data else {}
    self._connection.request(method, path, body=data, headers=headers)
    response = self._connection.getresponse()
    return response.status, json.loads(response.read())

  def recommend(self, user: str, k: int = 10) -> Dict:
    status, body = self.call('GET', f'/recommend?user={user}&k={k}')
    if status != 200:
      raise RuntimeError(f'GET /recommend: {status} {body}')
    return body


def sample_histories(known_items: set, users: int, seed: int) -> Dict[str, List[dict]]:
  """Up to `users` users of the bundled sample with their last HISTORY_SEED events."""
  path = os.path.join(SAMPLE, 'interactions.csv')
  per_user: Dict[str, List[dict]] = {}
  if os.path.isfile(path):
    with open(path, newline='') as f:
      for row in csv.DictReader(f):
        if row['item_id'] in known_items:
          per_user.setdefault(row['user_id'], []).append(
              {'user_id': row['user_id'], 'item_id': row['item_id'],
               'timestamp': int(row['timestamp'])})
  rng = random.Random(seed)
  chosen = sorted(u for u, e in per_user.items() if len(e) >= 3)
  rng.shuffle(chosen)
  return {user: per_user[user][-HISTORY_SEED:] for user in chosen[:users]}


def closed_loop(url: str, threads: int, jobs: List[Tuple[str, int]]) -> Tuple[List[float], float]:
  """Runs the (user, k) jobs over `threads` keep-alive clients; (latencies in ms, wall s)."""
  latencies: List[float] = []
  lock = threading.Lock()
  chunks = [jobs[i::threads] for i in range(threads)]
  clients = [Client(url) for _ in range(threads)]
  barrier = threading.Barrier(threads + 1)

  def work(client: Client, chunk):
    mine = []
    barrier.wait()
    for user, k in chunk:
      start = time.perf_counter()
      client.recommend(user, k)
      mine.append((time.perf_counter() - start) * 1000)
    with lock:
      latencies.extend(mine)

  workers = [threading.Thread(target=work, args=(c, chunk)) for c, chunk in zip(clients, chunks)]
  for worker in workers:
    worker.start()
  barrier.wait()
  start = time.perf_counter()
  for worker in workers:
    worker.join()
  return latencies, time.perf_counter() - start


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', help='pushed SavedModel version dir, or the Pusher base dir')
  parser.add_argument('--items', default=os.path.join(SAMPLE, 'items.csv'))
  store = parser.add_mutually_exclusive_group()
  store.add_argument('--redis', help='redis://host:port/db of a running Redis (default: start a '
                     'private redis-server when installed)')
  store.add_argument('--embedded', action='store_true', help='the in-process store, no Redis')
  parser.add_argument('--events', type=int, default=200, help='events for the freshness test')
  parser.add_argument('--requests', type=int, default=2000, help='GET /recommend per run')
  parser.add_argument('--threads', default='1,8', help='client threads, comma-separated')
  parser.add_argument('--users', type=int, default=500, help='users seeded with histories')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', help='also write the results here')
  args = parser.parse_args(argv)

  from serving import client as client_lib  # pylint: disable=g-import-not-at-top
  workdir = tempfile.mkdtemp(prefix='freshness_')
  processes: List[subprocess.Popen] = []
  env = dict(os.environ, PYTHONPATH=REPO)
  try:
    base, model_description, items = resolve_model(args.model, workdir)
    if items is None:
      items = list(client_lib.read_titles(args.items))
    grpc_port = free_port()
    log_paths = {name: os.path.join(workdir, f'{name}.log')
                 for name in ('model_server', 'redis', 'service')}
    processes.append(subprocess.Popen(
        [sys.executable, '-m', 'serving.model_server', '--model_name=recommender',
         f'--model_base_path={base}', f'--port={grpc_port}', '--rest_api_port=0'],
        stdout=open(log_paths['model_server'], 'w'), stderr=subprocess.STDOUT, env=env,
        cwd=REPO))
    redis_url, store_description = args.redis, f'Redis at {args.redis}'
    if args.embedded:
      redis_url, store_description = None, 'embedded (in-process)'
    elif not redis_url and shutil.which('redis-server'):
      port = free_port()
      processes.append(subprocess.Popen(
          ['redis-server', '--port', str(port), '--bind', '127.0.0.1', '--dir', workdir,
           '--appendonly', 'yes', '--appendfsync', 'everysec', '--save', ''],
          stdout=open(log_paths['redis'], 'w'), stderr=subprocess.STDOUT))
      redis_url = f'redis://127.0.0.1:{port}/0'
      store_description = 'Redis (private redis-server, appendonly yes, appendfsync everysec)'
    elif not redis_url:
      store_description = 'embedded (in-process; redis-server is not installed)'
    with client_lib.RecommenderClient(f'127.0.0.1:{grpc_port}') as model:
      if not model.wait_available(300, alive=lambda: processes[0].poll() is None):
        raise SystemExit(f'error: the model server did not serve the model:\n'
                         f'{open(log_paths["model_server"]).read()[-3000:]}')
    service_port = free_port()
    processes.append(subprocess.Popen(
        [sys.executable, '-m', 'serving.realtime.service', '--model-server',
         f'127.0.0.1:{grpc_port}', '--items', args.items, '--host', '127.0.0.1', '--port',
         str(service_port), '--log-level', 'WARNING'] +
        (['--redis', redis_url] if redis_url else ['--embedded']),
        stdout=open(log_paths['service'], 'w'), stderr=subprocess.STDOUT, env=env, cwd=REPO))
    url = f'http://127.0.0.1:{service_port}'
    wait_http(url, processes[-1], log_paths['service'])
    results = run(url, args, set(items))
    report(results, args, model_description, store_description)
    if args.json:
      with open(args.json, 'w') as f:
        json.dump({'model': model_description, 'store': store_description, 'rows': results}, f,
                  indent=2)
  finally:
    for process in reversed(processes):
      process.terminate()
      try:
        process.wait(timeout=20)
      except subprocess.TimeoutExpired:
        process.kill()
    shutil.rmtree(workdir, ignore_errors=True)
  return 0


def run(url: str, args: argparse.Namespace, model_items: set) -> List[Dict]:
  """Seeds users, then measures freshness, POST latency and GET latency; one dict per row."""
  rng = random.Random(args.seed)
  client = Client(url)
  histories = sample_histories(model_items, args.users, args.seed)
  if not histories:  # the tiny model: synthetic users over its items
    items = sorted(model_items)
    histories = {f'user{n}': [{'user_id': f'user{n}', 'item_id': rng.choice(items),
                               'timestamp': 1_300_000_000 + i} for i in range(HISTORY_SEED)]
                 for n in range(args.users)}
  for start in range(0, len(histories), 25):
    batch = [e for user in list(histories)[start:start + 25] for e in histories[user]]
    status, body = client.call('POST', '/events', batch)
    assert status == 202, body
  users = list(histories)
  catalog = sorted(model_items)
  for user in users:  # seeded and applied (with Redis, the consumer works asynchronously)
    deadline = time.monotonic() + 30
    while not client.recommend(user)['history'] and time.monotonic() < deadline:
      time.sleep(0.01)
  rows = []

  # Freshness: POST one event, then GET until the answer reflects it.
  fresh, polls, post_ms = [], [], []
  now = 1_400_000_000
  for n in range(args.events):
    user = rng.choice(users)
    history = set(client.recommend(user)['history'])
    item = rng.choice([i for i in catalog if i not in history])
    start = time.perf_counter()
    status, body = client.call('POST', '/events', {'user_id': user, 'item_id': item,
                                                   'timestamp': now + n})
    post_ms.append((time.perf_counter() - start) * 1000)
    assert status == 202, body
    count = 0
    while True:
      count += 1
      answer = client.recommend(user)
      if answer['history'][-1:] == [item]:
        break
      if time.perf_counter() - start > 30:
        raise RuntimeError(f'event {n} not reflected after 30 s')
    fresh.append((time.perf_counter() - start) * 1000)
    polls.append(count)
    assert item not in {i['item_id'] for i in answer['items']}  # the model excludes history
  rows.append({'measure': 'event -> fresh recommendation (POST, then GET until reflected)',
               'threads': 1, 'n': len(fresh), 'p50_ms': percentile(fresh, 50),
               'p99_ms': percentile(fresh, 99), 'max_ms': max(fresh),
               'note': f'{sum(p == 1 for p in polls)}/{len(polls)} reflected by the first GET'})
  rows.append({'measure': 'POST /events (1 event)', 'threads': 1, 'n': len(post_ms),
               'p50_ms': percentile(post_ms, 50), 'p99_ms': percentile(post_ms, 99),
               'max_ms': max(post_ms), 'note': ''})

  # GET /recommend latency: cache misses (each (user, k) once) and hits (a hot set). k stays
  # below the model's exported K (10): the service refuses more with a 400.
  combos = [(user, k) for k in range(1, 10) for user in users]
  rng.shuffle(combos)
  warm = [(user, 10) for user in users[:50]]
  closed_loop(url, 2, warm * 4)  # connections, threads and the model's first calls
  for threads in [int(t) for t in args.threads.split(',')]:
    jobs, combos = combos[:args.requests], combos[args.requests:]
    if len(jobs) < args.requests:
      raise SystemExit('error: not enough distinct (user, k) pairs; lower --requests')
    latencies, wall = closed_loop(url, threads, jobs)
    rows.append({'measure': 'GET /recommend, cache miss (model call)', 'threads': threads,
                 'n': len(latencies), 'p50_ms': percentile(latencies, 50),
                 'p99_ms': percentile(latencies, 99), 'max_ms': max(latencies),
                 'note': f'{len(latencies) / wall:.0f} req/s'})
    hot = [(user, 10) for user in users[:20]]
    latencies, wall = closed_loop(url, threads, (hot * (args.requests // len(hot) + 1))
                                  [:args.requests])
    rows.append({'measure': 'GET /recommend, cache hit', 'threads': threads,
                 'n': len(latencies), 'p50_ms': percentile(latencies, 50),
                 'p99_ms': percentile(latencies, 99), 'max_ms': max(latencies),
                 'note': f'{len(latencies) / wall:.0f} req/s'})
  status, stats = client.call('GET', '/stats')
  rows.append({'measure': 'stats', 'stats': stats})
  return rows


def report(rows: List[Dict], args: argparse.Namespace, model: str, store: str):
  print(f'\nmodel: {model}\nstore: {store}\nmachine: {os.cpu_count()} CPU cores, load average '
        f'{" ".join(f"{x:.1f}" for x in os.getloadavg())} at the end\n')
  print('| measurement | client threads | requests | p50 ms | p99 ms | max ms | note |')
  print('|---|---|---|---|---|---|---|')
  for row in rows:
    if 'stats' in row:
      continue
    print(f'| {row["measure"]} | {row["threads"]} | {row["n"]} | {row["p50_ms"]:.1f} | '
          f'{row["p99_ms"]:.1f} | {row["max_ms"]:.1f} | {row["note"]} |')
  counters = next(row['stats'] for row in rows if 'stats' in row)['counters']
  print(f'\nservice counters: {json.dumps(counters, sort_keys=True)}')


if __name__ == '__main__':
  sys.exit(main())
