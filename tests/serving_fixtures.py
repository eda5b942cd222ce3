"""Helpers for test_serving.py: a tiny recommender SavedModel with the serving contract, and
starting a model server (the local one in-process or as a subprocess, or tensorflow_model_server).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import List, Optional

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2

from serving import batching
from serving import client
from serving import model_server
from servable import warmup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = 'recommender'
ITEMS = [f'i{n:02d}' for n in range(30)]
USERS = ['u1', 'u2', 'u3']
K = 10


class TinyRecommender(tf.Module):
  """Brute-force top-K over a small catalog, the user's history excluded (docs/contracts.md §4).

  The score of an item is the dot product of its embedding with the user's embedding plus the
  sum of the known history items' embeddings; unknown users share one out-of-vocabulary row.
  """

  def __init__(self, seed: int):
    super().__init__()
    rng = np.random.default_rng(seed)
    self._item_ids = tf.constant(ITEMS)
    self._item_vectors = tf.constant(rng.normal(size=(len(ITEMS), 4)), tf.float32)
    self._user_vectors = tf.constant(rng.normal(size=(len(USERS) + 1, 4)), tf.float32)
    self._users = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(USERS, tf.range(len(USERS), dtype=tf.int64)),
        default_value=len(USERS))
    self._items = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(ITEMS, tf.range(len(ITEMS), dtype=tf.int64)),
        default_value=-1)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name='user_id'),
                                tf.TensorSpec([None, None], tf.string, name='history'),
                                tf.TensorSpec([None], tf.string, name='query')])
  def serve(self, user_id, history, query):  # pylint: disable=unused-argument
    history_idx = self._items.lookup(history)  # [B, H], -1 for "" and unknown items
    known = history_idx >= 0
    history_vectors = tf.gather(self._item_vectors, tf.maximum(history_idx, 0))
    query_vector = tf.gather(self._user_vectors, self._users.lookup(user_id)) + tf.reduce_sum(
        history_vectors * tf.cast(known, tf.float32)[..., None], axis=1)
    scores = tf.matmul(query_vector, self._item_vectors, transpose_b=True)  # [B, N]
    in_history = tf.reduce_any(
        tf.equal(history_idx[:, :, None], tf.range(len(ITEMS), dtype=tf.int64)) & known[..., None],
        axis=1)
    top = tf.math.top_k(tf.where(in_history, -np.inf, scores), k=K)
    return {'item_ids': tf.gather(self._item_ids, top.indices), 'scores': top.values}


def save_model(path: str, seed: int) -> str:
  """Saves a TinyRecommender with its serving_default signature at `path`."""
  module = TinyRecommender(seed)
  tf.saved_model.save(module, path, signatures={'serving_default': module.serve})
  return path


def publish(source: str, base_path: str, version: int) -> str:
  """Copies a SavedModel into `base_path/<version>` atomically: aside first, then a rename."""
  os.makedirs(base_path, exist_ok=True)
  staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(base_path)))
  shutil.copytree(source, os.path.join(staging, 'model'))
  final = os.path.join(base_path, str(version))
  os.rename(os.path.join(staging, 'model'), final)
  os.rmdir(staging)
  return final


def predict_request(user_ids: List[str], histories: List[List[str]], queries=None,
                    **model_spec) -> predict_pb2.PredictRequest:
  """client.predict_request for MODEL; `model_spec` sets version, version_label, ..."""
  request = client.predict_request(user_ids, histories, queries, model_name=MODEL)
  for key, value in model_spec.items():
    if key == 'version':
      request.model_spec.version.value = value
    else:
      setattr(request.model_spec, key, value)
  return request


def write_warmup(saved_model_dir: str, requests: List[predict_pb2.PredictRequest]) -> str:
  """Writes assets.extra/tf_serving_warmup_requests (servable.warmup, as the trainer does)."""
  return warmup.write_warmup_requests(saved_model_dir, requests)


def free_port() -> int:
  """A TCP port free right now on 127.0.0.1 (for servers that cannot bind port 0)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Server:
  """A running model server: its gRPC target and REST URL; `stop()` ends it."""

  def __init__(self, kind: str, grpc_port: int, rest_port: int, local=None, process=None,
               log_path: Optional[str] = None):
    self.kind = kind
    self.target = f'127.0.0.1:{grpc_port}'
    self.rest_url = f'http://127.0.0.1:{rest_port}'
    self.local = local
    self.process = process
    self.log_path = log_path

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def stop(self) -> Optional[int]:
    """Stops the server; returns a subprocess's exit code."""
    if self.local:
      self.local.stop(grace=0)
      return None
    self.process.terminate()
    try:
      return self.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
      self.process.kill()
      return self.process.wait()


def start_local(argv: List[str]) -> Server:
  """The local server in this process, on a free gRPC port and a free REST port."""
  args = model_server.parse_args(argv + ['--port=0', f'--rest_api_port={free_port()}'])
  local = model_server.ModelServer(args)
  return Server('local', local.grpc_port, local.rest_port, local=local)


def start_process(command: List[str], argv: List[str], log_path: str,
                  timeout_s: float = 120) -> Server:
  """A server subprocess (`command` + flags), returned once a version is AVAILABLE.

  Args:
    command: e.g. ['tensorflow_model_server'] or [sys.executable, '-m', 'serving.model_server'].
    argv: flags without --port / --rest_api_port, which are chosen here.
    log_path: where the server's stdout and stderr go.
    timeout_s: how long the first version may take to become available.
  """
  grpc_port, rest_port = free_port(), free_port()
  env = dict(os.environ, PYTHONPATH=REPO, TF_USE_LEGACY_KERAS='1', TF_CPP_MIN_LOG_LEVEL='2')
  with open(log_path, 'w') as log:
    process = subprocess.Popen(
        command + argv + [f'--port={grpc_port}', f'--rest_api_port={rest_port}'],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
  server = Server(command[0], grpc_port, rest_port, process=process, log_path=log_path)
  with client.RecommenderClient(server.target, MODEL, timeout=2) as status_client:
    if status_client.wait_available(timeout_s, alive=lambda: process.poll() is None):
      return server
  server.stop()
  raise RuntimeError(f'{command} did not serve {MODEL} in {timeout_s} s:\n{server.log()[-3000:]}')


def local_server_command() -> List[str]:
  return [sys.executable, '-m', 'serving.model_server']


def padding_batcher(fn, max_batch_size: int, name: str = 'test') -> batching.Batcher:
  """A Batcher on `fn` that pads variable-length inputs, as TF Serving's batching does, and
  waits up to 200 ms for a batch to fill (so concurrent test calls join one batch)."""
  params = batching.BatchingParameters()
  params.max_batch_size.value = max_batch_size
  params.batch_timeout_micros.value = 200_000
  params.num_batch_threads.value = 1
  params.pad_variable_length_inputs = True
  return batching.Batcher(fn, params, name)
