"""Every run of a pipeline root, from ML Metadata lineage (docs/reviewing_runs.md).

One row per run: which data, which model (trained or reused from the cache), which blessing,
which pushed version, and the candidate's Overall metrics from that run's Evaluator output;
what each run changed against the one before; per-component timings of the latest run.
"""

import datetime
import math
from typing import Any, Dict, List, Optional

import pandas as pd
from ml_metadata.proto import metadata_store_pb2

from evaluation import run_summary
from evaluation.report_mlmd import SUCCEEDED, custom_property, execution_state
from evaluation.report_tables import metrics_table
from evaluation.report_tfma import EXAMPLE_COUNT, HEADLINE, OVERALL, REPORTED
from evaluation.report_tfma import load_evaluation_dir

_INPUT_EVENTS = (metadata_store_pb2.Event.INPUT, metadata_store_pb2.Event.DECLARED_INPUT)


def present(value: Any) -> bool:
  """Whether a history cell holds a value (not None, not NaN)."""
  return value is not None and not (isinstance(value, float) and math.isnan(value))


def _seconds(execution: metadata_store_pb2.Execution) -> float:
  return max(0.0, (execution.last_update_time_since_epoch -
                   execution.create_time_since_epoch) / 1000.0)


def _time(milliseconds: int) -> datetime.datetime:
  return datetime.datetime.fromtimestamp(milliseconds / 1000.0)


def _first_artifact(reader, execution, key, events=run_summary.OUTPUT_EVENTS):
  if execution is None:
    return None
  artifacts = reader.execution_artifacts(execution.id, key, events)
  return artifacts[-1] if artifacts else None


def overall_metrics(eval_uri: str) -> Dict[str, float]:
  """Overall-slice metrics of the candidate model of one Evaluator output (NaN if missing)."""
  evaluation = load_evaluation_dir(eval_uri)
  table = metrics_table(evaluation)
  row = table.loc[OVERALL] if OVERALL in table.index else pd.Series(dtype=float)
  values = {name: float(row[name]) if name in row else math.nan for name in REPORTED}
  values['users'] = int(row[EXAMPLE_COUNT]) if EXAMPLE_COUNT in row else 0
  return values


def run_history(reader: run_summary.RunReader, node_ids: Dict[str, str]) -> pd.DataFrame:
  """One row per pipeline run, oldest first, from MLMD lineage.

  Columns: run_id, started, seconds (first execution start to last execution end), states
  (executions per state), interactions / items / input_fingerprint (ExampleGen's
  properties), examples (ExampleGen's Examples artifact id), model (Trainer's Model artifact
  id), model_status (trained in this run or reused from the cache), evaluated (the Evaluator's
  candidate model id, and baseline id when there is one), blessed, push ('pushed', 'cached
  push' when the run reused an earlier push, or why nothing was pushed), pushed_version,
  pushed_destination, and the candidate's Overall metrics (users = evaluated test users).
  """
  rows = []
  metrics_by_uri: Dict[str, Dict[str, float]] = {}
  for number, run in enumerate(reader.pipeline_runs(), 1):
    executions = run.executions
    states: Dict[str, int] = {}
    for execution in executions.values():
      states[execution_state(execution)] = states.get(execution_state(execution), 0) + 1
    row = {
        'run': number,
        'run_id': run.run_id,
        'started': _time(min(e.create_time_since_epoch for e in executions.values())),
        'seconds': round((max(e.last_update_time_since_epoch for e in executions.values()) -
                          min(e.create_time_since_epoch for e in executions.values())) / 1000,
                         2),
        'states': ', '.join(f'{count} {state}' for state, count in sorted(states.items())),
    }
    gen = executions.get(node_ids['example_gen'])
    for name in ('interactions', 'items', 'input_fingerprint'):
      row[name] = custom_property(gen, name) if gen is not None else None
    examples = _first_artifact(reader, gen, 'examples')
    row['examples'] = examples.id if examples else None
    trainer = executions.get(node_ids['trainer'])
    model = _first_artifact(reader, trainer, 'model')
    row['model'] = model.id if model else None
    trainer_state = execution_state(trainer)
    row['model_status'] = ('trained' if trainer_state == 'complete' else
                           'reused (cached)' if trainer_state == 'cached' else trainer_state)
    row['model_uri'] = model.uri if model else None
    evaluator = executions.get(node_ids['evaluator'])
    candidate = _first_artifact(reader, evaluator, 'model', _INPUT_EVENTS)
    baseline = _first_artifact(reader, evaluator, 'baseline_model', _INPUT_EVENTS)
    row['evaluated'] = (f'{candidate.id}' + (f' vs baseline {baseline.id}' if baseline else '')
                        if candidate else None)
    blessing = _first_artifact(reader, evaluator, 'blessing')
    blessed = custom_property(blessing, 'blessed') if blessing else None
    row['blessed'] = None if blessed is None else blessed == 1
    pusher = executions.get(node_ids['pusher'])
    pushed = _first_artifact(reader, pusher, 'pushed_model')
    if pushed is not None and custom_property(pushed, 'pushed') == 1:
      pusher_state = execution_state(pusher)
      row['push'] = 'pushed' if pusher_state == 'complete' else f'{pusher_state} push'
      row['pushed_version'] = custom_property(pushed, 'pushed_version')
      row['pushed_destination'] = custom_property(pushed, 'pushed_destination')
    else:
      row['push'] = ('skipped (condition not met)' if pusher is None
                     else f'not pushed ({execution_state(pusher)})')
      row['pushed_version'] = None
      row['pushed_destination'] = None
    evaluation = _first_artifact(reader, evaluator, 'evaluation')
    if evaluation is not None and evaluator.last_known_state in SUCCEEDED:
      if evaluation.uri not in metrics_by_uri:
        metrics_by_uri[evaluation.uri] = overall_metrics(evaluation.uri)
      row.update(metrics_by_uri[evaluation.uri])
    else:
      row.update({name: math.nan for name in REPORTED})
      row['users'] = None
    rows.append(row)
  return pd.DataFrame(rows).set_index('run')


def history_changes(history: pd.DataFrame) -> List[str]:
  """What each run changed against the run before it, one line per run."""
  lines = []
  previous = None
  for run, row in history.iterrows():
    parts = []
    if previous is None:
      parts.append('first run')
    else:
      parts.append('same data' if row['input_fingerprint'] == previous['input_fingerprint']
                   else 'new data')
    parts.append(f"model {row['model']} {row['model_status']}")
    if row['blessed'] is None or pd.isna(row['blessed']):
      parts.append('no blessing')
    else:
      parts.append('blessed' if row['blessed'] else 'NOT blessed')
    parts.append(row['push'] + (f" {row['pushed_version']}" if present(row['pushed_version'])
                                and row['push'] == 'pushed' else ''))
    if previous is not None and present(row[HEADLINE]) and present(previous[HEADLINE]):
      delta = row[HEADLINE] - previous[HEADLINE]
      parts.append(f'{HEADLINE} {row[HEADLINE]:.4f} ({delta:+.4f})')
    elif present(row[HEADLINE]):
      parts.append(f'{HEADLINE} {row[HEADLINE]:.4f}')
    lines.append(f'run {run} ({row["run_id"]}): ' + ', '.join(parts))
    previous = row
  return lines


def component_timings(reader: run_summary.RunReader, node_ids: Dict[str, str],
                      summary: Optional[Dict[str, Any]] = None) -> pd.DataFrame:
  """Per-component timings of the latest run: MLMD's execution times and run_summary.json's.

  Columns: state (in the latest run), mlmd_s (execution start to end as MLMD recorded it),
  and summary_s (the runner's wall-clock time, from run_summary.json's timings) when given.
  """
  runs = reader.pipeline_runs()
  latest = runs[-1].executions if runs else {}
  timings = (summary or {}).get('timings') or {}
  nodes = list(node_ids.values())
  nodes += [node for node in list(latest) + list(timings)
            if node not in nodes and node != 'total']
  rows = []
  for node in nodes:
    execution = latest.get(node)
    row = {'component': node, 'state': execution_state(execution),
           'mlmd_s': _seconds(execution) if execution is not None else math.nan}
    if summary is not None:
      row['summary_s'] = timings.get(node, math.nan)
    rows.append(row)
  if summary is not None and 'total' in timings:
    rows.append({'component': 'total', 'state': '', 'mlmd_s': math.nan,
                 'summary_s': timings['total']})
  return pd.DataFrame(rows).set_index('component')
