"""gRPC client of the recommender, for tensorflow_model_server and serving.model_server alike.

    python -m serving.client recommend --user 12346 --history 85123A,71053 --query "red lantern" \\
        -k 10 --items data/online_retail_sample/items.csv
    python -m serving.client status
    python -m serving.client metadata

It speaks only the tensorflow-serving-api stubs and the serving contract (docs/contracts.md
§4): inputs `user_id` [B], `history` [B, H] padded with "", `query` [B]; outputs `item_ids`
and `scores` [B, K]. `k` asks the model's recommend_k signature for k items (a model
without it gives its fixed K, cut to k).
"""

import argparse
import csv
import logging
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_service_pb2_grpc
from tensorflow_serving.apis import prediction_service_pb2_grpc

from servable import requests as requests_lib
from servable.requests import predict_request


# How long the served model's metadata (recommend_k or not, its K) is trusted; a failed
# look-up is retried sooner.
METADATA_TTL_S = 30.0
METADATA_RETRY_S = 5.0

log = logging.getLogger('serving.client')


class RecommenderClient:
  """Calls Predict, GetModelStatus and GetModelMetadata of one served model."""

  def __init__(self, target: str = '127.0.0.1:8500', model_name: str = 'recommender',
               signature_name: str = 'serving_default', timeout: float = 10.0):
    """Opens a channel (connections are made on the first call).

    Args:
      target: host:port of the gRPC server.
      model_name: the served model's name.
      signature_name: the signature Predict and metadata use.
      timeout: seconds each call may take.
    """
    self._model_name = model_name
    self._signature_name = signature_name
    self._timeout = timeout
    self._channel = grpc.insecure_channel(target)
    self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
    self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
    # From the served model's metadata (_refresh): whether recommend() calls recommend_k, the
    # most items it answers, and until when that is trusted.
    self._takes_k = False
    self._served_k: Optional[int] = None
    self._known_until = 0.0
    self._lock = threading.Lock()
    self._refreshing = False

  def recommend(self, user_id: str, history: Sequence[str], query: str = '',
                k: Optional[int] = None) -> List[Tuple[str, float]]:
    """The model's top items for one user, best first.

    Args:
      user_id: the user; unknown users are normal traffic.
      history: the user's items, most recent last.
      query: free text, "" for none.
      k: items wanted. A model with the recommend_k signature answers k of them (at most
        servable.requests.MAX_K, and the catalog); one without answers its K, cut to k.

    Returns:
      (item_id, score) pairs.

    Raises:
      grpc.RpcError: the server's answer when the call fails.
    """
    with_k = k is not None and self.takes_k()
    request = predict_request([user_id], [history], [query], self._model_name,
                              requests_lib.K_SIGNATURE if with_k else self._signature_name,
                              k=k if with_k else None)
    try:
      response = self._prediction.Predict(request, timeout=self._timeout)
    except grpc.RpcError:
      self._known_until = 0.0  # a version without recommend_k may have been swapped in
      raise
    item_ids = tf.make_ndarray(response.outputs['item_ids'])[0]
    scores = tf.make_ndarray(response.outputs['scores'])[0]
    return [(item.decode(), float(score)) for item, score in zip(item_ids, scores)][:k]

  def takes_k(self) -> bool:
    """Whether recommend() asks the recommend_k signature for k items: the served model has
    it and this client calls serving_default (see _refresh)."""
    self._refresh()
    return self._takes_k

  def served_k(self) -> Optional[int]:
    """The most items recommend() answers: servable.requests.MAX_K with recommend_k, else
    the signature's K from its `item_ids` shape; None while unknown (see _refresh)."""
    self._refresh()
    return self._served_k

  def learned_k(self, served: int) -> None:
    """The model answered `served` items, fewer than asked: that is its K for now."""
    with self._lock:
      self._served_k = served
      self._known_until = time.monotonic() + METADATA_TTL_S

  def _refresh(self) -> None:
    """Reads takes_k and served_k from one GetModelMetadata answer, at most every
    METADATA_TTL_S (a pushed version may change them); a failed look-up is retried after
    METADATA_RETRY_S. Thread-safe: one thread asks, the others use what is known meanwhile."""
    with self._lock:
      if time.monotonic() < self._known_until or self._refreshing:
        return
      self._refreshing = True
    takes_k, served, known = False, None, False
    try:
      signatures = self.metadata()
      takes_k = (requests_lib.K_SIGNATURE in signatures and
                 self._signature_name == 'serving_default')
      signature = signatures.get(self._signature_name)
      dims = signature.outputs['item_ids'].tensor_shape.dim if signature is not None else []
      if takes_k:
        served = requests_lib.MAX_K
      elif len(dims) == 2 and dims[1].size > 0:
        served = int(dims[1].size)
      known = True
    except (grpc.RpcError, KeyError, AttributeError, ValueError, TypeError) as e:
      log.debug('model metadata unknown: %s', e)
    with self._lock:
      self._refreshing = False
      self._takes_k = takes_k
      if served is not None:
        self._served_k = served
      self._known_until = time.monotonic() + (METADATA_TTL_S if known else METADATA_RETRY_S)

  def status(self) -> List[Tuple[int, str, str]]:
    """(version, state name, error message) of each version the server knows, as it lists them."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = self._model_name
    response = self._models.GetModelStatus(request, timeout=self._timeout)
    state_name = get_model_status_pb2.ModelVersionStatus.State.Name
    return [(s.version, state_name(s.state), s.status.error_message)
            for s in response.model_version_status]

  def wait_available(self, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Polls GetModelStatus until a version is AVAILABLE; False on time-out or `alive()` False.

    Args:
      timeout_s: how long to wait.
      alive: tells whether the server (e.g. its process) is still running.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
      try:
        if any(state == 'AVAILABLE' for _, state, _ in self.status()):
          return True
      except grpc.RpcError:
        pass  # not listening yet, or the model is not loaded yet
      time.sleep(0.2)
    return False

  def metadata(self) -> Dict[str, meta_graph_pb2.SignatureDef]:
    """The served version's signatures, by name."""
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=['signature_def'])
    request.model_spec.name = self._model_name
    response = self._prediction.GetModelMetadata(request, timeout=self._timeout)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata['signature_def'].Unpack(signature_map)
    return dict(signature_map.signature_def)

  def close(self):
    self._channel.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_titles(path: str) -> Dict[str, str]:
  """item_id -> title from an items CSV (the data contract's items file)."""
  with open(path, newline='') as f:
    return {row['item_id']: row['title'] for row in csv.DictReader(f)}


def _describe(info: meta_graph_pb2.TensorInfo) -> str:
  dims = 'unknown rank' if info.tensor_shape.unknown_rank else (
      '[' + ', '.join(str(d.size) for d in info.tensor_shape.dim) + ']')
  return f'{tf.dtypes.as_dtype(info.dtype).name} {dims}'


def main(argv: Optional[List[str]] = None) -> int:
  """The CLI; returns the exit code (1 when the server answers an error)."""
  parser = argparse.ArgumentParser(prog='python -m serving.client', description=__doc__.split(
      '\n')[0])
  parser.add_argument('--target', default='127.0.0.1:8500', help='gRPC host:port')
  parser.add_argument('--model_name', default='recommender')
  parser.add_argument('--timeout', type=float, default=10.0, help='seconds per call')
  commands = parser.add_subparsers(dest='command', required=True)
  recommend = commands.add_parser('recommend', help="a user's top items")
  recommend.add_argument('--user', required=True)
  recommend.add_argument('--history', default='', help='item ids, comma-separated, most recent '
                         'last')
  recommend.add_argument('--query', default='')
  recommend.add_argument('-k', type=int, default=None, help="items wanted (default: the model's K; "
                         "more than K through its recommend_k signature, if it has one)")
  recommend.add_argument('--items', help='items CSV to print titles from')
  commands.add_parser('status', help="the model's versions and their states")
  commands.add_parser('metadata', help="the served version's signatures")
  args = parser.parse_args(argv)

  with RecommenderClient(args.target, args.model_name, timeout=args.timeout) as client:
    try:
      if args.command == 'recommend':
        history = [item for item in args.history.split(',') if item]
        items = client.recommend(args.user, history, args.query, args.k)
        titles = read_titles(args.items) if args.items else {}
        print(f'{"rank":>4}  {"item_id":<12} {"score":>8}  title')
        for rank, (item, score) in enumerate(items, 1):
          print(f'{rank:>4}  {item:<12} {score:>8.4f}  {titles.get(item, "")}')
      elif args.command == 'status':
        for version, state, error in client.status():
          print(f'version {version}: {state}' + (f' ({error})' if error else ''))
      else:
        for name, signature in sorted(client.metadata().items()):
          print(name)
          for kind, tensors in [('input', signature.inputs), ('output', signature.outputs)]:
            for key, info in sorted(tensors.items()):
              print(f'  {kind} {key}: {_describe(info)}')
    except grpc.RpcError as e:
      print(f'error: {e.code().name}: {e.details()}', file=sys.stderr)
      return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
