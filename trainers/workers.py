"""Multi-worker training on one host: `distribution=multi_worker_mirrored` with `workers=N`.

On a cluster the orchestrator starts one Trainer per worker and writes each one's TF_CONFIG
(Kubeflow's TFJob, Vertex AI). On one machine there is no such orchestrator, so the Trainer's
run_fn is it: with `workers` > 1 and no TF_CONFIG in its environment, it starts N worker
processes on localhost (`python -m trainers.workers SPEC`), writes each one's TF_CONFIG (the
same cluster of N free ports; task index i), and waits for all of them. Every worker runs
run_fn under tf.distribute.MultiWorkerMirroredStrategy over the same Transform output. Worker
0 is the chief: it writes the Trainer's Model artifact (the serving model, trainer_state and
the run logs); the others write theirs to a temporary directory that is removed, as TF's
multi-worker guide has non-chief workers do. A worker that fails stops the others (a worker
left alone would wait in its collectives for ever), and the Trainer fails with its last lines.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import List

# A spec carries these FnArgs fields to the workers (the data accessor is rebuilt there).
_FIELDS = ('working_dir', 'train_files', 'eval_files', 'train_steps', 'eval_steps',
           'schema_path', 'schema_file', 'transform_graph_path', 'transform_output',
           'serving_model_dir', 'eval_model_dir', 'model_run_dir', 'base_model',
           'hyperparameters', 'custom_config')
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_ports(n: int) -> List[int]:
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(('127.0.0.1', 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def tf_config(ports: List[int], index: int) -> dict:
  """The TF_CONFIG of worker `index` of a localhost cluster on `ports`."""
  return {'cluster': {'worker': [f'127.0.0.1:{p}' for p in ports]},
          'task': {'type': 'worker', 'index': index}}


def launch(fn_args, workers: int) -> None:
  """Runs run_fn in `workers` processes on localhost; returns when all have finished.

  Raises:
    RuntimeError: a worker exited non-zero (the others are stopped), with its last lines.
  """
  scratch = tempfile.mkdtemp(prefix='trainer_workers_')
  try:
    ports = _free_ports(workers)
    processes = []
    for index in range(workers):
      spec = {name: getattr(fn_args, name) for name in _FIELDS}
      if index:  # a non-chief writes its model where nobody reads it
        spec['serving_model_dir'] = os.path.join(scratch, str(index), 'Format-Serving')
        spec['model_run_dir'] = os.path.join(scratch, str(index), 'run')
      spec_path = os.path.join(scratch, f'worker_{index}.json')
      with open(spec_path, 'w') as f:
        json.dump(spec, f)
      env = dict(os.environ, TF_CONFIG=json.dumps(tf_config(ports, index)),
                 PYTHONPATH=os.pathsep.join(p for p in (_REPO, os.environ.get('PYTHONPATH'))
                                           if p))
      log = open(os.path.join(scratch, f'worker_{index}.log'), 'w')
      # The chief prints to the Trainer's stdout (its epochs and validation recall) and logs
      # its stderr; the others log both. A log is read when its worker fails.
      if index == 0:
        streams = {'stdout': None, 'stderr': log}
      else:
        streams = {'stdout': log, 'stderr': subprocess.STDOUT}
      processes.append((subprocess.Popen(
          [sys.executable, '-m', 'trainers.workers', spec_path], cwd=_REPO, env=env,
          **streams), log))
    print(f'multi-worker training: {workers} worker processes on localhost, ports {ports}',
          flush=True)
    _wait(processes, scratch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _wait(processes, scratch: str) -> None:
  running = dict(enumerate(p for p, _ in processes))
  failed = None
  while running and failed is None:
    for index, process in list(running.items()):
      status = process.poll()
      if status is None:
        continue
      del running[index]
      if status != 0:
        failed = (index, status)
    time.sleep(0.2)
  for process in running.values():  # left alone, they would wait in a collective for ever
    process.kill()
    process.wait()
  for _, log in processes:
    log.close()
  if failed is not None:
    index, status = failed
    with open(os.path.join(scratch, f'worker_{index}.log')) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f'trainer worker {index} of {len(processes)} exited with status '
                       f'{status}; its last output:\n{tail}')


def main(argv: List[str]) -> int:
  """One worker (TF_CONFIG set by `launch`): run_fn over the spec's FnArgs."""
  # pylint: disable=import-outside-toplevel
  from tfx.components.trainer import fn_args_utils
  from tfx.components.util import tfxio_utils
  from tfx.types import standard_artifacts
  from trainers import trainer
  # Before anything runs a TensorFlow op: collective ops can only be configured before the
  # runtime starts, and run_fn then reads this strategy.
  trainer.distribution_strategy('multi_worker_mirrored')
  with open(argv[0]) as f:
    spec = json.load(f)
  # The Transform's examples artifact, as the Trainer executor read it (tf.Example payload):
  # TFX's own dataset factory over it.
  examples = standard_artifacts.Examples()
  examples.uri = os.path.dirname(os.path.dirname(spec['train_files'][0]))
  factory = tfxio_utils.get_tf_dataset_factory_from_artifact([examples], ['Trainer'])
  fn_args = fn_args_utils.FnArgs(**spec, data_accessor=fn_args_utils.DataAccessor(
      tf_dataset_factory=factory, record_batch_factory=None, data_view_decode_fn=None))
  trainer.run_fn(fn_args)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
