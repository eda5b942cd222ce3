"""Load benchmark: the recommender over gRPC (the local model server) against the in-process call.

    python benchmarks/serving.py --catalogs 3512,100000,1000000 --concurrency 1,4 --seconds 10 \\
        --json serving_benchmark.json [--model output/serving/recommender]

For each catalog it measures, in one run and on one machine:

- `in-process`: `tf.saved_model.load(dir).signatures['serving_default']` called in this process
  on the same requests (tensors built beforehand; the outputs fetched as numpy), the floor any
  server adds to;
- `gRPC`: `python -m serving.model_server` (the local stand-in for tensorflow_model_server) as a
  subprocess on a free port, called through the tensorflow-serving-api PredictionService stub;
- `gRPC + batching`: the same server with `--enable_batching` and
  serving_config/batching_parameters_cpu.txt.

Load is closed-loop: `concurrency` client threads, each with its own gRPC channel and stub (so
each is its own HTTP/2 connection, like separate frontend processes, and no client-side channel
lock is shared), each sending its next request as soon as the previous answer arrives. Every
request is batch 1: one user, a history of 1-20 items, a query on one request in four. The first
24 calls of each row are not measured (graph optimisation, first-shape costs). The server
overhead is p50(gRPC) / p50(in-process) at concurrency 1. The paths are measured in turns of 1 s
(in a rotating order, each server already running) until each has had `--seconds`, so that load
from other processes on a shared machine falls on all paths alike.

Models: with `--model DIR` (a pushed SavedModel version, or the Pusher's base directory whose
newest version is taken) the pipeline's model is measured with its own users and items, plus a
synthetic model per `--catalogs` size (and with `--index`, the same model answering from the
Compressor's approximate index, compression.ivf, nprobe chosen on the first 128 requests of the
pool for index recall@10 >= --index-recall-target, 0.98 by default as the Compressor's, as
it chooses it on validation; the index's
table of nprobe x index recall x latency is printed after the load table). The synthetic
model (`SyntheticRecommender`) does the work
of trainers/model.py ExportModule.serve with the same serving_default signature: hash the user
and history ids to embedding rows, recency-weighted history pooling, a two-layer query MLP, a
brute-force [B, 64] x [64, N] float32 matmul over the whole candidate table, the history items
masked out with a dense [B, N] indicator, tf.math.top_k and a gather of the item ids. Synthetic
models carry warm-up records (servable/warmup.py), as pushed models will.

The client threads, the in-process model and the server share this machine's cores; the table
records how much CPU other processes took during each measurement (`other CPU`).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
if sys.path and os.path.abspath(sys.path[0] or '.') == _HERE:
  sys.path[0] = REPO  # `python benchmarks/serving.py`: import the `serving` package, not this file
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc

from compression import ivf
from compression import markdown as markdown_lib
from compression import quantization
from serving import client as client_lib
from servable import warmup

MODEL = 'recommender'
REAL_CATALOG = 3512  # items in the bundled sample's catalog (data/online_retail_sample)
EMBEDDING_DIM = 64
MAX_HISTORY = 20
TOP_K = 10
POOL_SIZE = 256
TOPICS = 1000  # themes of the synthetic catalog (SyntheticRecommender)
TOPIC_NOISE = 0.5  # an item: its theme's direction plus this much Gaussian noise per dimension
INDEX_QUERIES = 128  # requests of the pool nprobe is chosen on (as validation requests)
INDEX_RECALL_TARGET = 0.98  # the Compressor's default index_recall_target
SLICE_SECONDS = 1.0  # paths take turns in slices this long (module docstring)
WARM_REQUESTS = 24  # unmeasured calls before each row (the signature has no fixed shapes to trace)
_QUERIES = ['red lantern', 'christmas decoration', 'tea set', 'heart', 'cake tin']


class SyntheticRecommender(tf.Module):
  """ExportModule.serve's work over an N-item catalog of random embeddings (module docstring)."""

  def __init__(self, n_items: int, n_users: int = 100_000, seed: int = 0):
    super().__init__()
    rng = np.random.default_rng(seed)
    self.n_items, self.n_users = n_items, n_users
    self.index = None
    # Items around TOPICS random directions (a catalog has themes; uniform random vectors
    # would have no neighbourhoods for an index to find), unit length.
    topics = rng.standard_normal((TOPICS, EMBEDDING_DIM), dtype=np.float32)
    candidates = topics[rng.integers(TOPICS, size=n_items)] + TOPIC_NOISE * rng.standard_normal(
        (n_items, EMBEDDING_DIM), dtype=np.float32)
    candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
    self.candidates = tf.Variable(candidates, trainable=False, name='candidates')
    self.item_ids = tf.Variable(item_names(n_items), trainable=False, name='item_ids')
    self.user_embedding = tf.Variable(
        rng.standard_normal((n_users + 1, EMBEDDING_DIM), dtype=np.float32) * 0.1,
        name='user_embedding')
    self.position_logits = tf.Variable(rng.standard_normal(MAX_HISTORY, dtype=np.float32) * 0.1)
    dim = EMBEDDING_DIM
    self.w1 = tf.Variable(rng.standard_normal((3 * dim, 2 * dim), dtype=np.float32) * 0.1)
    self.b1 = tf.Variable(np.zeros(2 * dim, np.float32))
    self.w2 = tf.Variable(rng.standard_normal((2 * dim, dim), dtype=np.float32) * 0.1)
    self.b2 = tf.Variable(np.zeros(dim, np.float32))

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='user_id'),
                                tf.TensorSpec([None, None], tf.string, name='history'),
                                tf.TensorSpec([None], tf.string, name='query')])
  def serve(self, user_id, history, query):  # pylint: disable=unused-argument
    # `query` is unused (the synthetic model has no text tower).
    query_vector, history_idx = self.query_vectors(user_id, history)
    if self.index is not None:  # compression.ivf: the two-stage search, history excluded
      indices, scores = self.index.top_k(query_vector, history_idx.to_sparse(),
                                         tf.constant(TOP_K))
      return {'item_ids': tf.gather(self.item_ids, indices), 'scores': scores}
    # ExportModule.catalog_scores and serve: the full catalog, history excluded, top-k.
    scores = tf.matmul(query_vector, self.candidates, transpose_b=True)  # [B, N]
    excluded = tf.sparse.to_indicator(history_idx.to_sparse(), self.n_items)
    scores = tf.where(excluded, tf.constant(-np.inf, tf.float32), scores)
    top = tf.math.top_k(scores, k=TOP_K)
    return {'item_ids': tf.gather(self.item_ids, top.indices), 'scores': top.values}

  def query_vectors(self, user_id, history):
    """The query tower's [B, 64] output and the hashed history ids (ragged [B, (L)])."""
    history = tf.ragged.boolean_mask(history, tf.not_equal(history, ''))
    history_idx = tf.strings.to_hash_bucket_fast(history, self.n_items)  # ragged [B, L]
    user = tf.gather(self.user_embedding,
                     tf.strings.to_hash_bucket_fast(user_id, self.n_users))
    # TwoTowerModel.query_embedding: recency-weighted pooling of the last MAX_HISTORY items.
    recent = history_idx[:, -MAX_HISTORY:]
    lengths = recent.row_lengths()
    dense = recent.to_tensor(default_value=0, shape=[None, MAX_HISTORY])
    from_end = lengths[:, None] - 1 - tf.range(MAX_HISTORY, dtype=tf.int64)[None, :]
    valid = from_end >= 0
    weights = tf.nn.softmax(tf.where(valid, tf.gather(self.position_logits,
                                                      tf.maximum(from_end, 0)), -1e9), axis=1)
    weights *= tf.cast(valid, tf.float32)
    embedded = tf.gather(self.candidates, dense)
    pooled = tf.reduce_sum(weights[:, :, None] * embedded, axis=1)
    last = tf.gather(embedded, tf.maximum(lengths - 1, 0), batch_dims=1)
    last *= tf.cast(lengths > 0, tf.float32)[:, None]
    hidden = tf.nn.relu(tf.matmul(tf.concat([user, pooled, last], axis=1), self.w1) + self.b1)
    query_vector = tf.math.l2_normalize(tf.matmul(hidden, self.w2) + self.b2, axis=1)
    return query_vector, history_idx

  def add_index(self, pool, target: float) -> Dict:
    """Builds compression.ivf's index over the candidates and chooses nprobe on the pool's
    requests (index recall@10 >= target), as the Compressor does on validation; serve()
    then answers from it. Returns ivf.choose's report (without the index)."""
    requests = pool[:INDEX_QUERIES]
    user_id = tf.constant([tf.make_ndarray(r.inputs['user_id'])[0] for r in requests])
    width = max(tf.make_ndarray(r.inputs['history']).shape[1] for r in requests)
    history = tf.constant([list(tf.make_ndarray(r.inputs['history'])[0]) + [b''] * (
        width - tf.make_ndarray(r.inputs['history']).shape[1]) for r in requests])
    queries, history_idx = self.query_vectors(user_id, history)
    base = quantization.CandidateIndex(self.candidates.numpy(), quantized=False)
    report = ivf.choose(base, queries.numpy(), history_idx.to_sparse(), target, 0, seed=0,
                        latency_calls=20, mode=1)
    self.index = report.pop('index')
    return report


def item_names(n_items: int) -> List[str]:
  return [f'item{i:07d}' for i in range(n_items)]


def build_synthetic(n_items: int, base_path: str, pool=None,
                    target: float = INDEX_RECALL_TARGET) -> Tuple[str, Optional[Dict]]:
  """Saves a SyntheticRecommender with warm-up records as version 1 under `base_path`; with a
  request `pool`, with the approximate index (SyntheticRecommender.add_index). Returns the
  version directory and the index report (None without an index)."""
  path = os.path.join(base_path, '1')
  report_path = os.path.join(base_path, 'index.json')
  if not os.path.exists(os.path.join(path, 'saved_model.pb')):
    module = SyntheticRecommender(n_items)
    report = module.add_index(pool, target) if pool is not None else None
    staging = path + '.tmp'
    shutil.rmtree(staging, ignore_errors=True)
    tf.saved_model.save(module, staging, signatures={'serving_default': module.serve})
    warmup.write_warmup_requests(staging, warmup.default_requests(item_names(min(n_items, 200))))
    with open(report_path, 'w') as f:
      json.dump(report, f)
    os.rename(staging, path)
  with open(report_path) as f:
    return path, json.load(f)


def _chosen(report: Dict) -> Dict:
  """The row of ivf.choose's table at the chosen nprobe."""
  return next(r for r in report['rows'] if r['nprobe'] == report['nprobe'])


def pipeline_version(model: str) -> str:
  """The SavedModel directory of --model: a version directory, or a base path's newest one."""
  if os.path.isfile(os.path.join(model, 'saved_model.pb')):
    return os.path.abspath(model)
  versions = [name for name in os.listdir(model) if name.isdigit()]
  if not versions:
    raise SystemExit(f'--model {model}: neither a SavedModel nor a directory of versions')
  return os.path.abspath(os.path.join(model, max(versions, key=int)))


def _read_lines(path: str) -> List[str]:
  with open(path) as f:
    return [line.rstrip('\n') for line in f if line.strip()]


def request_pool(users: Sequence[str], items: Sequence[str], seed: int = 1):
  """POOL_SIZE batch-1 PredictRequests: known and unknown users, histories of 1-20 items."""
  rng = np.random.default_rng(seed)
  pool = []
  for n in range(POOL_SIZE):
    user = users[rng.integers(len(users))] if users and n % 10 else f'new-user-{n}'
    history = [items[i] for i in rng.integers(len(items), size=rng.integers(1, MAX_HISTORY + 1))]
    query = _QUERIES[n % len(_QUERIES)] if n % 4 == 0 else ''
    pool.append(client_lib.predict_request([user], [history], [query], MODEL))
  return pool


def _cpu_jiffies(pids: Sequence[int]):
  """(busy, total) jiffies of the machine and the jiffies used by `pids` so far."""
  with open('/proc/stat') as f:
    fields = [int(x) for x in f.readline().split()[1:]]
  idle = fields[3] + fields[4]  # idle + iowait
  own = 0
  for pid in pids:
    try:
      with open(f'/proc/{pid}/stat') as f:
        stat = f.read().rsplit(')', 1)[1].split()
      own += int(stat[11]) + int(stat[12])  # utime + stime
    except OSError:
      pass
  return sum(fields[:8]) - idle, sum(fields[:8]), own


class Measurement:
  """Latencies, errors, time and CPU use of one (path, concurrency), over its time slices."""

  def __init__(self):
    self.latencies: List[float] = []
    self.errors = 0
    self.elapsed = 0.0
    self.cpu = np.zeros(3)  # machine busy, machine total, our processes (jiffies)

  def summary(self) -> Dict:
    ms = np.array(self.latencies) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99]) if len(ms) else (np.nan,) * 3
    busy, total, own = self.cpu
    return {'requests': int(len(ms)), 'errors': self.errors, 'qps': len(ms) / self.elapsed,
            'p50_ms': float(p50), 'p95_ms': float(p95), 'p99_ms': float(p99),
            # share of all cores busy with processes other than this one and the servers
            'other_cpu': float(max(0.0, (busy - own) / total)) if total else 0.0}


def closed_loop(calls: Sequence[Callable], pool, seconds: float, pids: Sequence[int],
                into: Measurement, offset: int = 0):
  """One thread per call, each calling back to back for `seconds`; adds to `into`."""
  concurrency = len(calls)
  latencies: List[List[float]] = [[] for _ in range(concurrency)]
  errors = [0] * concurrency
  barrier = threading.Barrier(concurrency + 1)
  stop_at = [0.0]

  def worker(index: int):
    call, own = calls[index], latencies[index]
    n = offset + index * (len(pool) // concurrency)
    barrier.wait()
    while True:
      start = time.perf_counter()
      if start >= stop_at[0]:
        return
      try:
        call(pool[n % len(pool)])
        own.append(time.perf_counter() - start)
      except grpc.RpcError:
        errors[index] += 1
      n += 1

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
  for thread in threads:
    thread.start()
  before = _cpu_jiffies(pids)
  started = time.perf_counter()
  stop_at[0] = started + seconds
  barrier.wait()
  for thread in threads:
    thread.join()
  into.elapsed += time.perf_counter() - started
  into.cpu += np.array(_cpu_jiffies(pids)) - np.array(before)
  into.latencies += [x for own in latencies for x in own]
  into.errors += sum(errors)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class LocalServer:
  """`python -m serving.model_server` on a free port, serving one base path."""

  def __init__(self, base_path: str, extra_flags: Sequence[str], log_path: str):
    self.port = _free_port()
    self._channels: List[grpc.Channel] = []
    env = dict(os.environ, PYTHONPATH=REPO)
    with open(log_path, 'w') as log:
      self.process = subprocess.Popen(
          [sys.executable, '-m', 'serving.model_server', f'--model_name={MODEL}',
           f'--model_base_path={base_path}', f'--port={self.port}', '--rest_api_port=0',
           '--file_system_poll_wait_seconds=0', *extra_flags],
          stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    self.target = f'127.0.0.1:{self.port}'
    with client_lib.RecommenderClient(self.target, MODEL, timeout=5) as status:
      if not status.wait_available(300, alive=lambda: self.process.poll() is None):
        self.stop()
        with open(log_path) as f:
          raise RuntimeError(f'model server did not serve {base_path}:\n{f.read()[-3000:]}')

  def make_call(self) -> Callable:
    """A Predict call on a channel of its own."""
    channel = grpc.insecure_channel(self.target)
    self._channels.append(channel)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    return lambda request: stub.Predict(request, timeout=30)

  def stop(self):
    for channel in self._channels:
      channel.close()
    self.process.terminate()
    try:
      self.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()


def in_process_call(version_dir: str) -> Callable[[], Callable]:
  """A make_call for the SavedModel's serving_default in this process (tensors cached)."""
  function = tf.saved_model.load(version_dir).signatures['serving_default']
  tensors: Dict[int, Dict[str, tf.Tensor]] = {}

  def call(request):
    inputs = tensors.get(id(request))
    if inputs is None:
      inputs = tensors[id(request)] = {k: tf.constant(tf.make_ndarray(v))
                                       for k, v in request.inputs.items()}
    return {k: v.numpy() for k, v in function(**inputs).items()}

  return lambda: call


def _same_top_k(server: LocalServer, local: Callable, pool) -> bool:
  call = server.make_call()
  return all(np.array_equal(tf.make_ndarray(call(r).outputs['item_ids']), local(r)['item_ids'])
             for r in pool[:16])


def benchmark_model(name: str, catalog: int, version_dir: str, pool, args, log_dir: str
                    ) -> List[Dict]:
  """The rows of one model: in-process, gRPC and gRPC + batching at each concurrency.

  The three paths are measured in turns of SLICE_SECONDS (in a rotating order) until each has
  had `args.seconds`, so that load from other processes falls on all of them alike.
  """
  make_local = in_process_call(version_dir)
  base_path = os.path.dirname(version_dir)
  servers = {}
  try:
    for path, flags in [('gRPC', []),
                        ('gRPC + batching', ['--enable_batching=true',
                                             f'--batching_parameters_file={args.batching}'])]:
      servers[path] = LocalServer(base_path, flags,
                                  os.path.join(log_dir, f'{name}-{len(servers)}.log'))
    makers = {'in-process': make_local, **{p: s.make_call for p, s in servers.items()}}
    same = {p: _same_top_k(s, make_local(), pool) for p, s in servers.items()}
    pids = [os.getpid()] + [s.process.pid for s in servers.values()]
    rows = []
    for concurrency in args.concurrency:
      calls = {path: [make() for _ in range(concurrency)] for path, make in makers.items()}
      for path_calls in calls.values():  # not measured: first-call costs, connections
        for request in pool[:WARM_REQUESTS]:
          path_calls[0](request)
        for call in path_calls[1:]:
          call(pool[0])
      measured = {path: Measurement() for path in calls}
      slices = max(1, int(round(args.seconds / SLICE_SECONDS)))
      order = list(calls)
      for turn in range(slices):
        for path in order[turn % 3:] + order[:turn % 3]:
          closed_loop(calls[path], pool, args.seconds / slices, pids, measured[path],
                      offset=turn * 17)
      for path in order:
        row = {'model': name, 'catalog': catalog, 'path': path, 'concurrency': concurrency,
               **measured[path].summary()}
        if path in same:
          row['same_top_k_as_in_process'] = same[path]
        rows.append(row)
        _print_row(row)
    rows.sort(key=lambda row: (order.index(row['path']), row['concurrency']))
  finally:
    for server in servers.values():
      server.stop()
  return rows


def _print_row(row: Dict):
  print(f'  {row["model"]:>22} {row["path"]:<16} c={row["concurrency"]} '
        f'qps={row["qps"]:8.1f} p50={row["p50_ms"]:7.2f} p95={row["p95_ms"]:7.2f} '
        f'p99={row["p99_ms"]:7.2f} ms errors={row["errors"]} other_cpu={row["other_cpu"]:.0%}',
        flush=True)


def overheads(rows: List[Dict]) -> Dict[str, Dict]:
  """Per model: p50(gRPC) / p50(in-process) at concurrency 1 (and with batching)."""
  result = {}
  for row in rows:
    if row['concurrency'] != 1:
      continue
    result.setdefault(row['model'], {'catalog': row['catalog']})[row['path']] = row['p50_ms']
  for values in result.values():
    for path in ('gRPC', 'gRPC + batching'):
      if path in values and values.get('in-process'):
        values[f'{path} / in-process'] = values[path] / values['in-process']
  return result


def markdown(rows: List[Dict], ratio: Dict[str, Dict]) -> str:
  lines = ['| model | items | path | clients | QPS | p50 ms | p95 ms | p99 ms | errors | '
           'other CPU |', '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["model"]} | {r["catalog"]:,} | {r["path"]} | {r["concurrency"]} | '
                 f'{r["qps"]:.0f} | {r["p50_ms"]:.2f} | {r["p95_ms"]:.2f} | {r["p99_ms"]:.2f} | '
                 f'{r["errors"]} | {r["other_cpu"]:.0%} |')
  lines += ['', '| model | items | p50 in-process ms | p50 gRPC ms | overhead (gRPC / in-process) '
            '| overhead with batching |', '|---|---:|---:|---:|---:|---:|']
  for model, v in ratio.items():
    lines.append(f'| {model} | {v["catalog"]:,} | {v.get("in-process", float("nan")):.2f} | '
                 f'{v.get("gRPC", float("nan")):.2f} | '
                 f'{v.get("gRPC / in-process", float("nan")):.2f}x | '
                 f'{v.get("gRPC + batching / in-process", float("nan")):.2f}x |')
  return '\n'.join(lines)


def _ints(text: str) -> List[int]:
  return [int(x.replace('_', '')) for x in text.split(',') if x]


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', help='a pushed SavedModel version or the Pusher base directory '
                      '(output/serving/recommender); measured besides the synthetic catalogs')
  parser.add_argument('--catalogs', type=_ints, default=[REAL_CATALOG, 100_000, 1_000_000],
                      help='synthetic catalog sizes (items), comma-separated')
  parser.add_argument('--concurrency', type=_ints, default=[1, 4],
                      help='closed-loop client threads, comma-separated')
  parser.add_argument('--seconds', type=float, default=10, help='measured seconds per row')
  parser.add_argument('--batching', default=os.path.join(REPO, 'serving_config',
                                                         'batching_parameters_cpu.txt'),
                      help='BatchingParameters file of the batching rows')
  parser.add_argument('--index', action='store_true',
                      help="also measure each synthetic catalog with the Compressor's "
                           'approximate top-K index (compression.ivf)')
  parser.add_argument('--index-recall-target', type=float, default=INDEX_RECALL_TARGET,
                      help='index recall@10 that chooses nprobe (default: %(default)s, the '
                           "Compressor's index_recall_target)")
  parser.add_argument('--json', help='write the rows and overheads to this file')
  parser.add_argument('--workdir', help='keep the synthetic models here (default: a temporary '
                      'directory, removed at the end)')
  args = parser.parse_args(argv)
  if 1 not in args.concurrency:
    parser.error('--concurrency must include 1 (the overhead ratio is taken there)')

  workdir = args.workdir or tempfile.mkdtemp(prefix='serving_benchmark_')
  os.makedirs(workdir, exist_ok=True)
  load_before = os.getloadavg()
  started = time.time()
  rows, indexes = [], {}
  try:
    models = []
    if args.model:
      version_dir = pipeline_version(args.model)
      items = _read_lines(os.path.join(version_dir, 'assets', 'item_id_vocab'))
      users_path = os.path.join(version_dir, 'assets', 'user_id_vocab')
      users = _read_lines(users_path) if os.path.exists(users_path) else []
      models.append(('pipeline', len(items), version_dir, request_pool(users, items)))
    for n_items in args.catalogs:
      print(f'building the synthetic model of {n_items:,} items', flush=True)
      pool = request_pool([f'user{u}' for u in range(1000)], item_names(n_items))
      version_dir, _ = build_synthetic(n_items, os.path.join(workdir, f'synthetic_{n_items}'))
      models.append((f'synthetic {n_items:,}', n_items, version_dir, pool))
      if args.index:
        version_dir, report = build_synthetic(
            n_items, os.path.join(workdir, f'synthetic_{n_items}_index'), pool,
            args.index_recall_target)
        print(f"  index: {report['n_lists']} lists, nprobe {report['nprobe']}: index recall@10 "
              f"{_chosen(report)['index_recall@10']:.4f} on the first {INDEX_QUERIES} requests, "
              f"built in {report['build_seconds']:.1f} s", flush=True)
        indexes[f'synthetic {n_items:,} + index'] = report
        models.append((f'synthetic {n_items:,} + index', n_items, version_dir, pool))
    for name, catalog, version_dir, pool in models:
      print(f'{name}: {catalog:,} items ({version_dir})', flush=True)
      rows += benchmark_model(name, catalog, version_dir, pool, args, workdir)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  ratio = overheads(rows)
  print()
  print(markdown(rows, ratio))
  for name, report in indexes.items():
    print(f'\n### {name}\n')
    print('\n'.join(markdown_lib.index_markdown(report)[2:]))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'command': ' '.join(sys.argv), 'cpus': os.cpu_count(),
                 'load_average_before': load_before, 'load_average_after': os.getloadavg(),
                 'wall_s': time.time() - started, 'rows': rows, 'overhead_p50': ratio,
                 'indexes': indexes}, f,
                indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
