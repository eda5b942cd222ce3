"""Server-side batching for the local model server, configured like tensorflow_model_server.

`BatchingParameters` is TF Serving's message (tensorflow_serving/servables/tensorflow/
session_bundle_config.proto), rebuilt in serving/protos.py because the tensorflow-serving-api wheel
does not ship it; a `--batching_parameters_file` written for tensorflow_model_server parses
unchanged (fields 1-7 of that message).

`Batcher` is a simplified BatchingSession: concurrent calls of one signature are queued, and a batch
thread runs as many of them as fit in `max_batch_size` rows as one call, waiting at most
`batch_timeout_micros` for the batch to fill. Honoured: max_batch_size, batch_timeout_micros,
max_enqueued_batches (a full queue answers UNAVAILABLE, as TF Serving does), num_batch_threads,
pad_variable_length_inputs (non-batch dimensions are padded to the largest in the batch with
each request's own first value, `tensor.flat[0]`, exactly as TF Serving pads: a string input that
must pad with "" has to start with ""; without padding, requests whose shapes differ run one by
one here, where TF Serving fails the whole batch with FAILED_PRECONDITION). Not honoured:
thread_pool_name (each signature has its own threads) and allowed_batch_sizes (batches are not
padded up to an allowed size). A request larger than max_batch_size runs alone instead of being rejected or split.
Every output must have the batch as its first dimension, as TF Serving's batching requires.
"""

import collections
import logging
import os
import threading
import time
from concurrent import futures
from typing import Callable, Dict, List, Optional

import numpy as np

from serving.protos import BatchingParameters  # pylint: disable=unused-import (re-exported)

Arrays = Dict[str, np.ndarray]
log = logging.getLogger('model_server')


def _int(params, name: str, default: int) -> int:
  return getattr(params, name).value if params.HasField(name) else default


class _Task:
  """One queued call: its inputs, its row count and the future its caller waits on."""

  def __init__(self, inputs: Arrays):
    self.inputs = inputs
    self.rows = len(next(iter(inputs.values()))) if inputs else 0
    self.future: futures.Future = futures.Future()


class Batcher:
  """Runs concurrent calls of `fn` as batched calls (see the module docstring)."""

  def __init__(self, fn: Callable[[Arrays], Arrays], params, name: str = ''):
    """Starts the batch threads.

    Args:
      fn: the signature, called with and returning arrays whose first dimension is the batch.
      params: a BatchingParameters message; unset fields take TF Serving's defaults.
      name: names the threads and log lines.
    """
    self._fn = fn
    self._name = name
    self._max_batch_size = _int(params, 'max_batch_size', 1000)
    self._timeout_s = _int(params, 'batch_timeout_micros', 0) / 1e6
    self._max_tasks = _int(params, 'max_enqueued_batches', 10) * self._max_batch_size
    self._pad = params.pad_variable_length_inputs
    if params.allowed_batch_sizes:
      log.warning('batching: allowed_batch_sizes is not honoured by the local server')
    self._tasks: collections.deque = collections.deque()
    self._cond = threading.Condition()
    self._closed = False
    self._threads = [
        threading.Thread(target=self._loop, name=f'batch-{name}-{i}', daemon=True)
        for i in range(_int(params, 'num_batch_threads', os.cpu_count() or 1))]
    for thread in self._threads:
      thread.start()

  def __call__(self, inputs: Arrays) -> Arrays:
    """Queues one call and waits for its share of the batch's outputs.

    Raises:
      QueueFullError: the queue already holds max_enqueued_batches full batches.
    """
    task = _Task(inputs)
    if not _same_rows(inputs) or task.rows > self._max_batch_size:
      return self._fn(inputs)
    with self._cond:
      if self._closed:  # the version was unloaded after this request picked it
        return self._fn(inputs)
      if len(self._tasks) >= self._max_tasks:
        raise QueueFullError(f'the batch queue of {self._name} is full')
      self._tasks.append(task)
      self._cond.notify()
    return task.future.result()

  def close(self):
    """Runs what is queued, then stops the threads."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()

  def _loop(self):
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      if batch:
        self._run(batch)

  def _next_batch(self) -> Optional[List[_Task]]:
    """Waits for a batch: [] when another thread took the tasks, None once closed and drained."""
    with self._cond:
      while not self._tasks and not self._closed:
        self._cond.wait()
      if not self._tasks:
        return None
      deadline = time.monotonic() + self._timeout_s
      while (not self._closed and sum(t.rows for t in self._tasks) < self._max_batch_size
             and self._cond.wait(max(0.0, deadline - time.monotonic()))):
        pass
      batch, rows = [], 0
      while self._tasks and (not batch or rows + self._tasks[0].rows <= self._max_batch_size):
        rows += self._tasks[0].rows
        batch.append(self._tasks.popleft())
      return batch

  def _run(self, batch: List[_Task]):
    merged = _merge([task.inputs for task in batch], self._pad)
    groups = [(merged, batch)] if merged is not None else [(t.inputs, [t]) for t in batch]
    for inputs, tasks in groups:
      log.debug('batch of %d rows from %d requests on %s', sum(t.rows for t in tasks),
                len(tasks), self._name)
      try:
        outputs = self._fn(inputs)
      except Exception as e:  # pylint: disable=broad-except
        for task in tasks:
          task.future.set_exception(e)
        continue
      start = 0
      for task in tasks:
        task.future.set_result({k: v[start:start + task.rows] for k, v in outputs.items()})
        start += task.rows


class QueueFullError(Exception):
  """The batch queue cannot take another request (TF Serving answers UNAVAILABLE)."""


def _same_rows(inputs: Arrays) -> bool:
  return len({len(v) if v.ndim else -1 for v in inputs.values()}) <= 1 and all(
      v.ndim for v in inputs.values())


def _merge(calls: List[Arrays], pad: bool) -> Optional[Arrays]:
  """Concatenates the calls' inputs along the batch; None when their shapes cannot be joined."""
  merged = {}
  for key in calls[0]:
    arrays = [call[key] for call in calls]
    if len({a.shape[1:] for a in arrays}) > 1:
      if not pad or len({a.ndim for a in arrays}) > 1:
        return None
      if not all(a.size for a in arrays):
        return None  # TF Serving rejects an empty tensor that needs padding; run them alone
      target = np.max([a.shape for a in arrays], axis=0)
      # As TF Serving (batching_util.cc): each call's tensor is padded with its own first value.
      arrays = [np.pad(a, [(0, 0)] + [(0, t - s) for s, t in zip(a.shape[1:], target[1:])],
                       constant_values=a.flat[0]) for a in arrays]
    merged[key] = np.concatenate(arrays)
  return merged
