"""Resume after a fault, and reproducibility: a run killed during the Trainer, run again,
reuses every finished component from the MLMD cache, runs the Trainer and what follows it,
and ends with exactly the metrics and the served scores of the session's e2e run (the same
data and flags in another pipeline root: every component ran twice, once in each)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ml_metadata import errors as mlmd_errors
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

import conftest
import configs
import pipeline

pytestmark = [pytest.mark.e2e, pytest.mark.distributed]

TRAINER = configs.NODE_IDS['trainer']
Execution = metadata_store_pb2.Execution
PROGRESS = re.compile(r'^\[(\w+)\] (running \.\.\.|done in|cached in)')


def _run_argv(data_dir, output):
  """The `pipeline.py run` flags conftest.run_pipeline uses (so this test follows them)."""
  captured = []
  original = pipeline.main
  pipeline.main = lambda argv: captured.append(list(argv)) or 0
  try:
    conftest.run_pipeline(data_dir, output)
  finally:
    pipeline.main = original
  return captured[0]


def _store(output):
  config = metadata_store_pb2.ConnectionConfig()
  config.sqlite.filename_uri = os.path.join(output, 'pipeline_root', 'metadata.db')
  config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
  return metadata_store.MetadataStore(config)


def _executions(output):
  """{node id: [execution states, oldest first]} for every node of the pipeline."""
  store = _store(output)
  prefix = f'{configs.PIPELINE_NAME}.'
  states = {}
  for context in store.get_contexts_by_type('node'):
    if context.name.startswith(prefix):
      executions = sorted(store.get_executions_by_context(context.id), key=lambda e: e.id)
      states[context.name[len(prefix):]] = [e.last_known_state for e in executions]
  return states


def _trainer_is_executing(output):
  """True once the Trainer's execution is registered as RUNNING (its executor has started)."""
  try:
    return Execution.RUNNING in _executions(output).get(TRAINER, [])
  except (mlmd_errors.UnavailableError, mlmd_errors.InternalError, mlmd_errors.AbortedError):
    return False  # the store is being written; ask again


def _start_and_kill_during_trainer(argv, output, log_path):
  """Starts `pipeline.py run`, SIGKILLs its process group while the Trainer executes.

  Returns:
    (progress lines printed before the kill, seconds from start to kill).
  """
  started = time.time()
  with open(log_path, 'w') as log:
    process = subprocess.Popen(
        [sys.executable, os.path.join(conftest.REPO, 'pipeline.py'), *argv],
        cwd=conftest.REPO, stdout=subprocess.PIPE, stderr=log, text=True,
        start_new_session=True)  # its own process group: the kill takes any children too
  lines = []
  try:
    for line in process.stdout:
      lines.append(line.rstrip('\n'))
      if lines[-1] == f'[{TRAINER}] running ...':
        break
    else:
      pytest.fail(f'the run ended (exit {process.wait()}) before the Trainer started: '
                  f'{lines[-5:]}; see {log_path}')
    deadline = time.time() + 300
    while not _trainer_is_executing(output):
      assert time.time() < deadline, 'the Trainer never started executing'
      assert process.poll() is None, f'the run exited ({process.returncode}) in the Trainer'
      time.sleep(0.2)
    time.sleep(1.0)  # well inside the executor (training takes tens of seconds)
    os.killpg(process.pid, signal.SIGKILL)
    killed_after = time.time() - started
  finally:
    if process.poll() is None:
      try:
        os.killpg(process.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    process.wait(timeout=60)
    process.stdout.close()
  return lines, killed_after


def _served(model_dir, requests):
  """serving_default's item ids and scores on fixed requests."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  serve = tf.saved_model.load(model_dir).signatures['serving_default']
  answers = [serve(**request) for request in requests]
  return ([a['item_ids'].numpy() for a in answers], [a['scores'].numpy() for a in answers])


def _fixed_requests(split_dir):
  """Recommendation requests for every test user (train + valid history) and searches."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from evaluation import baselines  # pylint: disable=import-outside-toplevel
  history = {}
  for name in ('train.csv', 'valid.csv'):
    for user, item in baselines.read_pairs(os.path.join(split_dir, name)):
      history.setdefault(user, []).append(item)
  users = sorted({u for u, _ in baselines.read_pairs(os.path.join(split_dir, 'test.csv'))})
  width = max(len(history.get(u, [])[-20:]) for u in users)
  rows = [history.get(u, [])[-20:] for u in users]
  rows = [row + [''] * (width - len(row)) for row in rows]
  queries = ['red heart', 'christmas', 'bag', 'vintage cake stand', 'zzzz']
  return [{'user_id': tf.constant(users), 'history': tf.constant(rows),
           'query': tf.constant([''] * len(users))},
          {'user_id': tf.constant([''] * len(queries)),
           'history': tf.constant([['']] * len(queries)), 'query': tf.constant(queries)}]


def test_run_killed_in_the_trainer_resumes_and_reproduces(e2e_data, e2e_run, tmp_path, capsys):
  output = tmp_path / 'out'
  # The flags of the session's e2e run, Compressor included: the resumed run must reproduce it.
  argv = _run_argv(e2e_data[0], output)
  lines, killed_after = _start_and_kill_during_trainer(argv, output, tmp_path / 'first.log')
  assert not os.path.exists(output / 'run_summary.json')

  finished = set()
  for line in lines:
    match = PROGRESS.match(line)
    if match and match.group(2) != 'running ...':
      finished.add(match.group(1))
  assert {configs.NODE_IDS['example_gen'], configs.NODE_IDS['transform']} <= finished, lines
  before = _executions(output)
  assert before[TRAINER] == [Execution.RUNNING], before  # killed in the Trainer, not after
  for node in finished:
    assert before[node] == [Execution.COMPLETE], (node, before[node])

  resumed_at = time.time()
  assert pipeline.main(argv) == 0
  resumed_in = time.time() - resumed_at
  out = capsys.readouterr().out
  after = _executions(output)
  not_started = set(after) - finished - {TRAINER}
  assert {configs.NODE_IDS['evaluator'], configs.NODE_IDS['pusher']} <= not_started, after
  for node in not_started:
    assert before.get(node, []) == [], (node, before[node])
  for node in finished:
    assert after[node] == [Execution.COMPLETE, Execution.CACHED], (node, after[node])
    assert f'[{node}] cached in' in out, node
  # The killed execution stays RUNNING in MLMD, orphaned; the new one completes.
  assert after[TRAINER] == [Execution.RUNNING, Execution.COMPLETE], after[TRAINER]
  for node in not_started:
    assert after[node] == [Execution.COMPLETE], (node, after[node])

  with open(output / 'run_summary.json') as f:
    summary = json.load(f)
  assert sorted(summary['cached']) == sorted(finished)
  assert summary['blessed'] is True
  assert os.path.isfile(os.path.join(summary['pushed_model'], 'saved_model.pb'))
  print(f'killed after {killed_after:.0f} s; resumed run {resumed_in:.0f} s')

  # Same inputs, same outputs: every metric digit, the compression figures that are not
  # timings, and the served scores of the pushed models.
  reference_output, reference = e2e_run
  assert summary['metrics'] == reference['metrics']
  for section in ('search', 'cold_start', 'data', 'data_quality'):
    assert summary[section] == reference[section], section
  for key in ('recall_retention', 'search_recall_retention', 'test_recall_retention',
              'quantized', 'distilled', 'candidate', 'sparsity'):
    assert summary['compression'][key] == reference['compression'][key], key
  # SavedModel bytes: function and layer names carry counters of the process, which this
  # second run in the same process has advanced; separate processes write the same bytes.
  for key in ('size_ratio', 'gzip_size_ratio'):
    assert summary['compression'][key] == pytest.approx(reference['compression'][key],
                                                        rel=1e-3), key
  requests = _fixed_requests(str(reference_output / 'split'))
  ids, scores = _served(summary['pushed_model'], requests)
  reference_ids, reference_scores = _served(reference['pushed_model'], requests)
  # Metrics are equal to the digit; served scores differ in their last bits between two
  # runs in one process (docs/evaluation.md, "Reproducibility"), so they are compared to 1e-4 and the
  # returned items by position.
  for mine, theirs in zip(scores, reference_scores):
    np.testing.assert_allclose(mine, theirs, atol=1e-4)
  same = np.mean(np.concatenate([(a == b).reshape(-1) for a, b in zip(ids, reference_ids)]))
  assert same >= 0.99, same
