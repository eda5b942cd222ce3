"""Reviewing runs: the Evaluator's output and MLMD lineage as tables, plots and an HTML page.

`notebooks/evaluator_report.ipynb`, `notebooks/run_history.ipynb` and `pipeline.py report` are
thin callers of this module. Everything comes from a pipeline root: ML Metadata
(`metadata.db`, read through run_summary.RunReader) for the lineage of each run, TFMA's loaders
(`tfma.load_eval_result`, `tfma.load_validation_result`) for the Evaluator's output, and, next to
the pipeline root, `run_summary.json` (timings, baselines, the compression section) and
`benchmarks/serving.json` (the serving benchmark) when they exist.

The Evaluator's output is shown for whatever it holds: every slice of its slicing specs, every
model of its model specs; when one model spec is a baseline (`is_baseline`), the candidate is
compared against it and TFMA's `*_diff` metrics and change thresholds are reported too.
"""

import base64
import dataclasses
import datetime
import html
import io
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd
import tensorflow_model_analysis as tfma
from matplotlib.figure import Figure
from ml_metadata import errors as mlmd_errors
from ml_metadata.proto import metadata_store_pb2
from tensorflow_model_analysis.metrics import metric_specs
from tensorflow_model_analysis.proto import config_pb2
from tensorflow_model_analysis.slicer import slicer_lib as slicer
from tensorflow_model_analysis.writers import eval_config_writer

from evaluation import run_summary
from trainers import metrics as metrics_lib

OVERALL = 'Overall'
REPORTED = [metrics_lib.metric_name(kind, k) for kind, k in metrics_lib.REPORTED]
EXAMPLE_COUNT = 'example_count'
HEADLINE = REPORTED[0]  # recall@10: the metric the blessing floor is on
SUMMARY_FILE = 'run_summary.json'
BENCHMARK_FILE = os.path.join('benchmarks', 'serving.json')
UNNAMED_MODEL = 'candidate'  # label of the single, unnamed model of a one-model EvalConfig

_OUTPUT_EVENTS = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)
_SUCCEEDED = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)
_INPUT_EVENTS = (metadata_store_pb2.Event.INPUT, metadata_store_pb2.Event.DECLARED_INPUT)


class ReportError(Exception):
  """Input that cannot be reported on (not a pipeline root, no Evaluator output)."""


# ----------------------------------------------------------------------------- pipeline root


def open_reader(pipeline_root: str, pipeline_name: str) -> run_summary.RunReader:
  """A RunReader on `pipeline_root/metadata.db` that has at least one run of the pipeline.

  Raises:
    ReportError: `pipeline_root` is not a pipeline root of `pipeline_name`.
  """
  if not os.path.isdir(pipeline_root):
    raise ReportError(f'{pipeline_root}: no such directory')
  metadata_path = os.path.join(pipeline_root, 'metadata.db')
  if not os.path.isfile(metadata_path):
    raise ReportError(f'{pipeline_root} is not a pipeline root: it has no metadata.db')
  try:
    reader = run_summary.RunReader(metadata_path, pipeline_name)
    runs = reader.pipeline_runs()
  except (RuntimeError, mlmd_errors.StatusError) as error:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise ReportError(f'{metadata_path} is not an ML Metadata store: '
                      f'{first_line.split(" query:")[0]}') from None
  if not runs:
    raise ReportError(f'{metadata_path} records no run of pipeline {pipeline_name!r}')
  return reader


def _state(execution: Optional[metadata_store_pb2.Execution]) -> str:
  if execution is None:
    return 'not run'
  return metadata_store_pb2.Execution.State.Name(execution.last_known_state).lower()


def _property(message, key: str) -> Any:
  """A custom property of an MLMD execution or artifact as a plain value (None if absent)."""
  if key not in message.custom_properties:
    return None
  value = message.custom_properties[key]
  kind = value.WhichOneof('value')
  return getattr(value, kind) if kind else None


def _seconds(execution: metadata_store_pb2.Execution) -> float:
  return max(0.0, (execution.last_update_time_since_epoch -
                   execution.create_time_since_epoch) / 1000.0)


def _time(milliseconds: int) -> datetime.datetime:
  return datetime.datetime.fromtimestamp(milliseconds / 1000.0)


def _latest_evaluator_execution(reader: run_summary.RunReader, evaluator: str):
  """(run, execution) of the newest Evaluator execution that finished (ran or was cached)."""
  for run in reversed(reader.pipeline_runs()):
    execution = run.executions.get(evaluator)
    if execution is not None and execution.last_known_state in _SUCCEEDED:
      return run, execution
  return None, None


# ----------------------------------------------------------------------------- Evaluator output


@dataclasses.dataclass
class Evaluation:
  """One Evaluator output, loaded with TFMA.

  Attributes:
    uri: The ModelEvaluation artifact's directory.
    config: The EvalConfig the Evaluator ran with.
    results: Model name -> tfma.EvalResult ('' for the single model of a one-model config).
    validation: TFMA's ValidationResult (None when the config has no thresholds).
    candidate: Name of the model under evaluation.
    baseline: Name of the baseline model, None when there is none.
    model_locations: Model name -> the SavedModel that was evaluated.
    blessed: The blessing artifact's verdict (None when read without MLMD).
    execution_id: MLMD id of the Evaluator execution (None when read without MLMD).
    run_id: The pipeline run the execution belongs to.
    state: 'complete' or 'cached'.
  """
  uri: str
  config: config_pb2.EvalConfig
  results: Dict[str, Any]
  validation: Optional[Any]
  candidate: str
  baseline: Optional[str]
  model_locations: Dict[str, str]
  blessed: Optional[bool] = None
  execution_id: Optional[int] = None
  run_id: Optional[str] = None
  state: Optional[str] = None

  @property
  def models(self) -> List[str]:
    """Candidate first, then the baseline, then any other models."""
    names = [self.candidate] + ([self.baseline] if self.baseline is not None else [])
    return names + [name for name in self.results if name not in names]

  def label(self, model: str) -> str:
    return model or UNNAMED_MODEL

  @property
  def verdict(self) -> Optional[bool]:
    """The blessing when known, else TFMA's validation_ok."""
    if self.blessed is not None:
      return self.blessed
    return self.validation.validation_ok if self.validation is not None else None


def load_evaluation_dir(uri: str) -> Evaluation:
  """Loads an Evaluator output directory with tfma.load_eval_result and load_validation_result.

  Raises:
    ReportError: `uri` holds no TFMA output.
  """
  if not os.path.isfile(os.path.join(uri, 'eval_config.json')):
    raise ReportError(f'{uri} holds no TFMA output (no eval_config.json)')
  config, _, _, model_locations = eval_config_writer.load_eval_run(uri)
  specs = list(config.model_specs) or [config_pb2.ModelSpec()]
  candidate, baseline = run_summary.model_roles(config)
  names = [spec.name for spec in specs]
  if len(names) == 1:
    results = {names[0]: tfma.load_eval_result(uri)}
  else:
    results = {name: tfma.load_eval_result(uri, model_name=name) for name in names}
  has_validation = any(name.startswith('validations') for name in os.listdir(uri))
  validation = tfma.load_validation_result(uri) if has_validation else None
  return Evaluation(uri=uri, config=config, results=results, validation=validation,
                    candidate=candidate, baseline=baseline,
                    model_locations=dict(model_locations or {}))


def load_evaluation(reader: run_summary.RunReader, node_ids: Dict[str, str],
                    execution_id: Optional[int] = None,
                    role: str = 'evaluator') -> Evaluation:
  """The Evaluator output of the latest finished Evaluator execution (or of `execution_id`).

  Args:
    reader: RunReader on the pipeline root.
    node_ids: Role -> component id (configs.NODE_IDS).
    execution_id: An MLMD execution id of the Evaluator; None for the latest finished one.
    role: Which Evaluator of node_ids ('evaluator', or another role such as a search
      Evaluator's).

  Raises:
    ReportError: there is no such execution or output.
  """
  evaluator = node_ids[role]
  if execution_id is None:
    run, execution = _latest_evaluator_execution(reader, evaluator)
    run_id = run.run_id if run else None
  else:
    execution = reader.execution(execution_id)
    run_id = next((run.run_id for run in reader.pipeline_runs()
                   if any(e.id == execution_id for e in run.executions.values())), None)
  if execution is None:
    raise ReportError(f'no finished {evaluator} execution'
                      + (f' with id {execution_id}' if execution_id is not None else '')
                      + ' in the pipeline root')
  artifacts = reader.execution_artifacts(execution.id, 'evaluation')
  if not artifacts:
    raise ReportError(f'{evaluator} execution {execution.id} has no evaluation output')
  evaluation = load_evaluation_dir(artifacts[-1].uri)
  blessing = reader.execution_artifacts(execution.id, 'blessing')
  if blessing and _property(blessing[-1], 'blessed') is not None:
    evaluation.blessed = _property(blessing[-1], 'blessed') == 1
  evaluation.execution_id = execution.id
  evaluation.run_id = run_id
  evaluation.state = _state(execution)
  return evaluation


def _slice_label(slice_key) -> str:
  if not slice_key:
    return OVERALL
  if slicer.is_cross_slice_key(slice_key):
    return ' vs '.join(_slice_label(key) for key in slice_key)
  return ', '.join(f'{column}:{value}' for column, value in slice_key)


def _slice_order(label: str) -> Tuple:
  return (label != OVERALL, label.split(':', 1)[0], label)


def _number(value: Dict[str, Any]) -> Optional[float]:
  """A scalar from tfma.load_eval_result's value dicts ({'doubleValue': x}, bounded values)."""
  if 'doubleValue' in value:
    return float(value['doubleValue'])
  if 'boundedValue' in value and 'value' in value['boundedValue']:
    return float(value['boundedValue']['value'])
  return None


def _ordered_columns(columns: Sequence[str]) -> List[str]:
  first = [c for c in REPORTED if c in columns] + [f'{c}_diff' for c in REPORTED
                                                    if f'{c}_diff' in columns]
  rest = sorted(c for c in columns if c not in first and c != EXAMPLE_COUNT)
  return first + rest + ([EXAMPLE_COUNT] if EXAMPLE_COUNT in columns else [])


def metrics_table(evaluation: Evaluation, model: Optional[str] = None,
                  diffs: bool = False) -> pd.DataFrame:
  """Slice x metric table of one model (default: the candidate), from tfma.load_eval_result.

  Args:
    evaluation: The loaded Evaluator output.
    model: Model name, as in the EvalConfig's model specs.
    diffs: Return TFMA's `<metric>_diff` (candidate - baseline) columns instead of the values.

  Returns:
    A DataFrame indexed by slice ('Overall', 'feature:value', ...; Overall first).
  """
  model = evaluation.candidate if model is None else model
  rows = {}
  for slice_key, by_output in evaluation.results[model].slicing_metrics:
    values = {}
    for output_name, by_sub_key in (by_output or {}).items():
      for sub_key, metrics in by_sub_key.items():
        for name, value in metrics.items():
          number = _number(value)
          if number is None or name.endswith('_diff') != diffs:
            continue
          prefix = '/'.join(part for part in (output_name, sub_key) if part)
          values[f'{prefix}/{name}' if prefix else name] = number
    rows[_slice_label(slice_key)] = values
  frame = pd.DataFrame.from_dict(rows, orient='index')
  if frame.empty:
    return frame
  frame = frame.loc[sorted(frame.index, key=_slice_order), _ordered_columns(list(frame.columns))]
  if EXAMPLE_COUNT in frame:
    frame[EXAMPLE_COUNT] = frame[EXAMPLE_COUNT].round().astype('Int64')
  frame.index.name = 'slice'
  return frame


def metrics_tables(evaluation: Evaluation) -> Dict[str, pd.DataFrame]:
  """Model label -> slice x metric table, for every model of the Evaluator output."""
  return {evaluation.label(model): metrics_table(evaluation, model)
          for model in evaluation.models}


def overall_table(evaluation: Evaluation) -> pd.DataFrame:
  """Model x metric table of the Overall slice."""
  rows = {}
  for model in evaluation.models:
    table = metrics_table(evaluation, model)
    if OVERALL in table.index:
      rows[evaluation.label(model)] = table.loc[OVERALL]
  frame = pd.DataFrame(rows).T
  frame.index.name = 'model'
  if EXAMPLE_COUNT in frame:
    frame[EXAMPLE_COUNT] = frame[EXAMPLE_COUNT].astype('Int64')
  return frame


def comparison_table(evaluation: Evaluation) -> Optional[pd.DataFrame]:
  """Candidate against baseline per slice and metric; None without a baseline model.

  Columns: candidate, baseline, diff (TFMA's `_diff` metric where it computed one) and
  retention (candidate / baseline).
  """
  if evaluation.baseline is None:
    return None
  candidate = metrics_table(evaluation, evaluation.candidate)
  baseline = metrics_table(evaluation, evaluation.baseline)
  diffs = metrics_table(evaluation, evaluation.candidate, diffs=True)
  rows = []
  for slice_label in candidate.index:
    for metric in candidate.columns:
      if metric == EXAMPLE_COUNT:
        continue
      value = float(candidate.at[slice_label, metric])
      base = (float(baseline.at[slice_label, metric])
              if slice_label in baseline.index and metric in baseline.columns else math.nan)
      diff_column = f'{metric}_diff'
      diff = (float(diffs.at[slice_label, diff_column])
              if slice_label in diffs.index and diff_column in diffs.columns else value - base)
      rows.append({'slice': slice_label, 'metric': metric, 'candidate': value,
                   'baseline': base, 'diff': diff,
                   'retention': value / base if base else math.nan})
  return pd.DataFrame(rows).set_index(['slice', 'metric'])


def _key_id(key) -> Tuple[str, str, str, bool]:
  """Identity of a metric key (proto or MetricKey) for matching thresholds and failures."""
  return (key.name, key.model_name, key.output_name, bool(key.is_diff))


def _raw_slice_key(proto):
  if proto.HasField('cross_slice_key'):
    return slicer.deserialize_cross_slice_key(proto.cross_slice_key)
  return slicer.deserialize_slice_key(proto.slice_key)


def describe_threshold(threshold) -> str:
  """A GenericValueThreshold or GenericChangeThreshold in words."""
  if isinstance(threshold, config_pb2.GenericValueThreshold):
    parts = []
    if threshold.HasField('lower_bound'):
      parts.append(f'>= {threshold.lower_bound.value:g}')
    if threshold.HasField('upper_bound'):
      parts.append(f'<= {threshold.upper_bound.value:g}')
    return ' and '.join(parts) or 'any value'
  higher = threshold.direction == config_pb2.MetricDirection.HIGHER_IS_BETTER
  sign = '>=' if higher else '<='
  parts = []
  if threshold.HasField('absolute'):
    parts.append(f'candidate - baseline {sign} {threshold.absolute.value:g}')
  if threshold.HasField('relative'):
    relative = threshold.relative.value
    parts.append(f'(candidate - baseline) / baseline {sign} {relative:g} '
                 f'(candidate {sign} {1 + relative:.0%} of baseline)')
  return ' and '.join(parts) or 'any change'


def threshold_table(evaluation: Evaluation) -> pd.DataFrame:
  """Every threshold check of the Evaluator: slice, model, metric, threshold, value, result.

  The thresholds come from the EvalConfig (as TFMA's validator reads them); a check failed
  when TFMA's ValidationResult lists it, so 'pass' / 'FAIL' is TFMA's own verdict.
  """
  config = evaluation.config
  thresholds = metric_specs.metric_thresholds_from_metrics_specs(config.metrics_specs,
                                                                 eval_config=config)
  failures = set()
  if evaluation.validation is not None:
    for per_slice in evaluation.validation.metric_validations_per_slice:
      slice_key = _raw_slice_key(per_slice)
      for failure in per_slice.failures:
        for field in ('value_threshold', 'change_threshold'):
          if failure.metric_threshold.HasField(field):
            threshold = getattr(failure.metric_threshold, field)
            failures.add((slice_key, _key_id(failure.metric_key),
                          threshold.SerializeToString()))
  rows = []
  for metrics_for_slice in tfma.load_metrics(evaluation.uri):
    slice_key = _raw_slice_key(metrics_for_slice)
    is_cross = slicer.is_cross_slice_key(slice_key)
    values = {_key_id(kv.key): kv.value.double_value.value
              for kv in metrics_for_slice.metric_keys_and_values
              if kv.value.HasField('double_value')}
    for key, specs_and_thresholds in thresholds.items():
      if evaluation.baseline is not None and key.model_name == evaluation.baseline:
        continue  # TFMA does not check the baseline's own thresholds
      for slice_spec, threshold in specs_and_thresholds:
        if slice_spec is None:
          applies = not is_cross
        elif isinstance(slice_spec, config_pb2.SlicingSpec):
          applies = not is_cross and slicer.SingleSliceSpec(
              spec=slice_spec).is_slice_applicable(slice_key)
        else:
          applies = is_cross and slicer.is_cross_slice_applicable(slice_key, slice_spec)
        if not applies:
          continue
        value = values.get(_key_id(key))
        failed = (slice_key, _key_id(key), threshold.SerializeToString()) in failures
        if evaluation.validation is None:
          result = 'not checked'
        else:
          result = 'FAIL' if failed else ('missing' if value is None else 'pass')
        baseline_value = None
        if key.is_diff and evaluation.baseline is not None:
          baseline_value = values.get((key.name, evaluation.baseline, key.output_name, False))
        rows.append({'slice': _slice_label(slice_key),
                     'model': evaluation.label(key.model_name or evaluation.candidate),
                     'metric': key.name + (' (change vs baseline)' if key.is_diff else ''),
                     'threshold': describe_threshold(threshold),
                     'value': value if value is not None else math.nan,
                     'baseline': baseline_value if baseline_value is not None else math.nan,
                     'result': result})
  columns = ['slice', 'model', 'metric', 'threshold', 'value', 'baseline', 'result']
  frame = pd.DataFrame(rows, columns=columns)
  if evaluation.baseline is None:
    frame = frame.drop(columns=['baseline'])
  if not frame.empty:
    frame = frame.iloc[sorted(range(len(frame)),
                              key=lambda i: _slice_order(frame['slice'].iloc[i]))]
  return frame.reset_index(drop=True)


def explain_blessing(evaluation: Evaluation,
                     thresholds: Optional[pd.DataFrame] = None) -> List[str]:
  """Why the model was or was not blessed, one sentence per line (verdict first)."""
  thresholds = threshold_table(evaluation) if thresholds is None else thresholds
  verdict = evaluation.verdict
  lines = []
  failed = thresholds[thresholds['result'] == 'FAIL'] if len(thresholds) else thresholds
  if verdict is None:
    lines.append('No verdict: the Evaluator had no thresholds to validate.')
  elif verdict:
    lines.append(f'Blessed: all {len(thresholds)} threshold check(s) passed.')
  else:
    lines.append(f'Not blessed: {len(failed)} of {len(thresholds)} threshold check(s) failed.')
  for _, row in failed.iterrows():
    lines.append(f"{row['metric']} of {row['model']} on slice {row['slice']} is "
                 f"{row['value']:.4f}; needs {row['threshold']}.")
  validation = evaluation.validation
  if validation is not None:
    if validation.missing_thresholds:
      lines.append(f'{len(validation.missing_thresholds)} threshold(s) had no metric to check '
                   '(counted as failures).')
    for spec in validation.missing_slices:
      features = ', '.join(spec.feature_keys) or 'Overall'
      lines.append(f'Slice spec on {features} matched no examples (counted as a failure).')
    if validation.rubber_stamp:
      lines.append('Rubber stamp: no baseline model was found, so change thresholds were not '
                   'checked.')
  if evaluation.baseline is None:
    lines.append('No baseline model in this evaluation: only absolute thresholds apply.')
  else:
    lines.append(f'Candidate {evaluation.label(evaluation.candidate)!r} was compared against '
                 f'baseline {evaluation.label(evaluation.baseline)!r}.')
  return lines


def slicing_columns(evaluation: Evaluation) -> List[str]:
  """The feature keys of the EvalConfig's single-feature slicing specs."""
  columns = []
  for spec in evaluation.config.slicing_specs:
    for key in spec.feature_keys:
      if key not in columns:
        columns.append(key)
  return columns


def frontend_has_widgets() -> bool:
  """Whether TFMA's Jupyter widgets can be shown: a Jupyter kernel with the widget classes.

  A kernel cannot see whether a browser is attached, so the environment variable TFMA_WIDGETS
  decides where set ('0' for headless runs and static exports, '1' to force them); otherwise
  widgets are used in any Jupyter (ZMQ) kernel and never in plain Python or terminal IPython.
  """
  setting = os.environ.get('TFMA_WIDGETS', 'auto').strip().lower()
  if setting in ('0', 'false', 'no', 'off'):
    return False
  try:
    from IPython import get_ipython  # pylint: disable=import-outside-toplevel
    from tensorflow_model_analysis.notebook.jupyter import tfma_widget  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  shell = get_ipython()
  if shell is None or type(shell).__name__ != 'ZMQInteractiveShell':
    return False
  return tfma_widget.SlicingMetricsViewer is not None


def slicing_widgets(evaluation: Evaluation) -> List[Any]:
  """tfma.view.render_slicing_metrics widgets: Overall, then one per slicing column."""
  widgets = []
  for model in evaluation.models:
    result = evaluation.results[model]
    widgets.append(tfma.view.render_slicing_metrics(result))
    for column in slicing_columns(evaluation):
      widgets.append(tfma.view.render_slicing_metrics(result, slicing_column=column))
  return [widget for widget in widgets if widget is not None]


# ----------------------------------------------------------------------------- run history


def _first_artifact(reader, execution, key, events=_OUTPUT_EVENTS):
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
      states[_state(execution)] = states.get(_state(execution), 0) + 1
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
      row[name] = _property(gen, name) if gen is not None else None
    examples = _first_artifact(reader, gen, 'examples')
    row['examples'] = examples.id if examples else None
    trainer = executions.get(node_ids['trainer'])
    model = _first_artifact(reader, trainer, 'model')
    row['model'] = model.id if model else None
    row['model_status'] = ('trained' if _state(trainer) == 'complete' else
                           'reused (cached)' if _state(trainer) == 'cached' else _state(trainer))
    row['model_uri'] = model.uri if model else None
    evaluator = executions.get(node_ids['evaluator'])
    candidate = _first_artifact(reader, evaluator, 'model', _INPUT_EVENTS)
    baseline = _first_artifact(reader, evaluator, 'baseline_model', _INPUT_EVENTS)
    row['evaluated'] = (f'{candidate.id}' + (f' vs baseline {baseline.id}' if baseline else '')
                        if candidate else None)
    blessing = _first_artifact(reader, evaluator, 'blessing')
    blessed = _property(blessing, 'blessed') if blessing else None
    row['blessed'] = None if blessed is None else blessed == 1
    pusher = executions.get(node_ids['pusher'])
    pushed = _first_artifact(reader, pusher, 'pushed_model')
    if pushed is not None and _property(pushed, 'pushed') == 1:
      row['push'] = 'pushed' if _state(pusher) == 'complete' else f'{_state(pusher)} push'
      row['pushed_version'] = _property(pushed, 'pushed_version')
      row['pushed_destination'] = _property(pushed, 'pushed_destination')
    else:
      row['push'] = ('skipped (condition not met)' if pusher is None
                     else f'not pushed ({_state(pusher)})')
      row['pushed_version'] = None
      row['pushed_destination'] = None
    evaluation = _first_artifact(reader, evaluator, 'evaluation')
    if evaluation is not None and evaluator.last_known_state in _SUCCEEDED:
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
    parts.append(row['push'] + (f" {row['pushed_version']}" if _present(row['pushed_version'])
                                and row['push'] == 'pushed' else ''))
    if previous is not None and _present(row[HEADLINE]) and _present(previous[HEADLINE]):
      delta = row[HEADLINE] - previous[HEADLINE]
      parts.append(f'{HEADLINE} {row[HEADLINE]:.4f} ({delta:+.4f})')
    elif _present(row[HEADLINE]):
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
    row = {'component': node, 'state': _state(execution),
           'mlmd_s': _seconds(execution) if execution is not None else math.nan}
    if summary is not None:
      row['summary_s'] = timings.get(node, math.nan)
    rows.append(row)
  if summary is not None and 'total' in timings:
    rows.append({'component': 'total', 'state': '', 'mlmd_s': math.nan,
                 'summary_s': timings['total']})
  return pd.DataFrame(rows).set_index('component')


# ----------------------------------------------------------------------------- plots


def plot_slices(table: pd.DataFrame, metrics: Sequence[str] = (HEADLINE, 'ndcg@10'),
                title: str = '') -> Figure:
  """Horizontal bars of `metrics` per slice of a metrics_table."""
  metrics = [m for m in metrics if m in table.columns]
  figure = Figure(figsize=(7, 0.45 * len(table) * max(1, len(metrics)) + 1.4))
  axes = figure.subplots()
  height = 0.8 / max(1, len(metrics))
  positions = range(len(table))
  for i, metric in enumerate(metrics):
    axes.barh([p + i * height for p in positions], table[metric].astype(float), height,
              label=metric)
  axes.set_yticks([p + height * (len(metrics) - 1) / 2 for p in positions])
  axes.set_yticklabels(list(table.index))
  axes.invert_yaxis()
  axes.set_xlabel('value')
  axes.legend(loc='lower right')
  axes.set_title(title or 'Metrics per slice')
  figure.tight_layout()
  return figure


def plot_comparison(comparison: pd.DataFrame, slice_label: str = OVERALL) -> Figure:
  """Candidate against baseline bars for one slice of a comparison_table."""
  rows = comparison.xs(slice_label, level='slice')
  figure = Figure(figsize=(7, 3.2))
  axes = figure.subplots()
  positions = list(range(len(rows)))
  axes.bar([p - 0.2 for p in positions], rows['baseline'], 0.4, label='baseline')
  axes.bar([p + 0.2 for p in positions], rows['candidate'], 0.4, label='candidate')
  axes.set_xticks(positions)
  axes.set_xticklabels(list(rows.index))
  axes.legend()
  axes.set_title(f'Candidate against baseline ({slice_label})')
  figure.tight_layout()
  return figure


def plot_history(history: pd.DataFrame, metrics: Sequence[str] = tuple(REPORTED)) -> Figure:
  """Metrics across runs; filled markers for blessed runs, crosses for unblessed ones."""
  figure = Figure(figsize=(7.5, 3.8))
  axes = figure.subplots()
  runs = list(history.index)
  blessed = [bool(b) if b is not None and not pd.isna(b) else False
             for b in history['blessed']]
  for metric in metrics:
    if metric not in history or history[metric].isna().all():
      continue
    values = history[metric].astype(float)
    line, = axes.plot(runs, values, label=metric)
    axes.scatter([r for r, b in zip(runs, blessed) if b],
                 [v for v, b in zip(values, blessed) if b], color=line.get_color(), marker='o')
    axes.scatter([r for r, b in zip(runs, blessed) if not b],
                 [v for v, b in zip(values, blessed) if not b], color=line.get_color(),
                 marker='x')
  axes.set_ylim(0, axes.get_ylim()[1] * 1.1)
  for run, push, version in zip(runs, history['push'], history['pushed_version']):
    if push == 'pushed':
      axes.axvline(run, color='grey', alpha=0.25)
      axes.annotate(f'pushed {version}', (run, axes.get_ylim()[1]), fontsize=7,
                    rotation=90, va='top', ha='right', color='grey')
  axes.set_xticks(runs)
  axes.set_xlabel('run (o blessed, x not blessed; grey line: new version pushed)')
  axes.set_ylabel('Overall, candidate model')
  axes.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  axes.set_title('Metrics across runs')
  figure.tight_layout()
  return figure


def _shrinkage_note(training: dict) -> str:
  """The id-embedding shrinkage validation chose after training (text models), as a sentence."""
  shrinkage = training.get('id_shrinkage')
  if not shrinkage:
    return ''
  tried = ', '.join(f'm={_esc(m)}: {r:.4f}' for m, r in shrinkage['validation_recall@10'].items())
  return (f' Item-id embeddings weighed by c/(c+m) (c: the item\'s training examples): '
          f'm={_esc(shrinkage["chosen"])} chosen on validation recall@10 ({tried}).')


def plot_training(training: Dict[str, Any]) -> Figure:
  """The Trainer's epochs (run_summary.json's `training`): training and validation loss on the
  left, validation Recall@10 on the right; a grey line marks the epoch whose weights were
  kept."""
  curves = training.get('per_epoch') or {}
  figure = Figure(figsize=(9, 3.4))
  loss_axes, recall_axes = figure.subplots(1, 2)
  for key, label in (('loss', 'training loss'), ('val_loss', 'validation loss')):
    if curves.get(key):
      loss_axes.plot(range(1, len(curves[key]) + 1), curves[key], marker='o', label=label)
  recall = curves.get('val_recall@10') or []
  if recall:
    recall_axes.plot(range(1, len(recall) + 1), recall, marker='o', color='tab:green')
    recall_axes.set_ylim(0, max(recall) * 1.2 or 1.0)
  best = training.get('best_epoch')
  for axes in (loss_axes, recall_axes):
    if best:
      axes.axvline(best, color='grey', alpha=0.4)
    axes.set_xlabel('epoch')
  loss_axes.set_ylabel('loss')
  if loss_axes.get_legend_handles_labels()[0]:
    loss_axes.legend(fontsize=8)
  loss_axes.set_title('loss per epoch')
  recall_axes.set_ylabel('validation recall@10 (full catalog)')
  recall_axes.set_title(f'validation recall@10 (kept: epoch {best})')
  figure.tight_layout()
  return figure


def plot_timings(timings: pd.DataFrame) -> Figure:
  """Per-component seconds (run_summary.json's where present, else MLMD's)."""
  frame = timings.drop(index='total', errors='ignore')
  column = 'summary_s' if 'summary_s' in frame and frame['summary_s'].notna().any() else 'mlmd_s'
  values = frame[column].astype(float).fillna(0.0)
  figure = Figure(figsize=(7, 0.35 * len(values) + 1.3))
  axes = figure.subplots()
  axes.barh(list(values.index), values)
  axes.invert_yaxis()
  axes.set_xlabel('seconds' + (' (run_summary.json)' if column == 'summary_s' else ' (MLMD)'))
  axes.set_title('Per-component time, latest run')
  figure.tight_layout()
  return figure


def plot_quality_vs_cost(costs: pd.DataFrame, metric: str = HEADLINE) -> Figure:
  """Quality against size on disk and against latency, one point per model."""
  figure = Figure(figsize=(9, 3.6))
  size_axes, latency_axes = figure.subplots(1, 2)
  for axes, column, label in ((size_axes, 'size_mb', 'size on disk (MB)'),
                              (latency_axes, 'latency', None)):
    known = costs[costs[column].notna() & costs[metric].notna()] if len(costs) else costs
    for model, row in known.iterrows():
      axes.scatter([row[column]], [row[metric]], s=60)
      axes.annotate(model, (row[column], row[metric]), textcoords='offset points',
                    xytext=(6, 4))
    if label is None:
      units = [u for u in costs.get('latency_unit', pd.Series(dtype=str)).dropna().unique()]
      label = f'latency ({units[0]})' if units else 'latency'
    axes.set_xlabel(label)
    axes.set_ylabel(metric)
    if known.empty:
      axes.text(0.5, 0.5, 'not measured', ha='center', va='center', transform=axes.transAxes,
                color='grey')
    else:
      low, high = axes.get_xlim()
      axes.set_xlim(min(0, low), high * 1.15)
      axes.set_ylim(0, max(axes.get_ylim()[1], float(known[metric].max()) * 1.2))
  size_axes.set_title('quality against size')
  latency_axes.set_title('quality against latency (p50, batch 1)')
  figure.tight_layout()
  return figure


def png_data_uri(figure: Figure) -> str:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=90)
  return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


# ----------------------------------------------------------------------------- compression


def flatten(value: Any, prefix: str = '') -> Dict[str, Any]:
  """Nested dicts as one dict with dotted keys (lists stay values)."""
  if isinstance(value, dict):
    flat = {}
    for key, item in value.items():
      flat.update(flatten(item, f'{prefix}.{key}' if prefix else str(key)))
    return flat
  return {prefix: value}


def _find_number(flat: Dict[str, Any], model: str, pattern: str,
                 avoid: Sequence[str] = ()) -> Optional[float]:
  """The first number whose key names `model` as a component and matches `pattern`."""
  for key in sorted(flat, key=len):
    value = flat[key]
    lowered = key.lower()
    tokens = re.split(r'[._\-\s/]+', lowered)
    if (isinstance(value, (int, float)) and not isinstance(value, bool) and model in tokens
        and re.search(pattern, lowered) and not any(a in lowered for a in avoid)):
      return float(value)
  return None


def directory_bytes(path: Optional[str]) -> Optional[int]:
  if not path or not os.path.isdir(path):
    return None
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def model_costs(summary: Optional[Dict[str, Any]], trained_bytes: Optional[int],
                trained_metrics: Optional[Dict[str, float]] = None,
                benchmark: Optional[Dict[str, Any]] = None) -> pd.DataFrame:
  """Quality, size and batch-1 latency of the trained and (when present) compressed model.

  Sizes and latencies come from run_summary.json's `compression` section where it gives them
  (keys naming the model and `bytes`, or `p50` at batch 1); otherwise the trained model's size
  is measured on disk, the compressed size is trained / `size_ratio`, and latency is relative
  to the trained model's (1 / `speedup_batch1`). Without a compression section the trained
  model's latency comes from the serving benchmark, when it has a batch-1 p50.
  """
  summary = summary or {}
  metrics = summary.get('metrics') or {}
  compression = summary.get('compression') or {}
  flat = flatten(compression)
  batch1 = r'p50.*batch[_\s=]?1(?!\d)|batch[_\s=]?1(?!\d).*p50'
  trained = dict(metrics.get('trained') or trained_metrics or {})
  rows = {}
  trained_size = _find_number(flat, 'trained', r'bytes', avoid=('gzip', 'ratio'))
  trained_size = trained_size if trained_size is not None else trained_bytes
  trained_latency = _find_number(flat, 'trained', batch1, avoid=('search',))
  unit = 'ms' if trained_latency is not None else None
  if trained_latency is None and not compression and benchmark:
    flat_benchmark = flatten(benchmark)
    for key in sorted(flat_benchmark, key=len):
      value = flat_benchmark[key]
      if (isinstance(value, (int, float)) and not isinstance(value, bool)
          and re.search(batch1, key.lower()) and 'search' not in key.lower()):
        trained_latency, unit = float(value), 'ms'
        break
  if trained_latency is None and compression.get('speedup_batch1'):
    trained_latency, unit = 1.0, 'relative to trained'
  rows['trained'] = {HEADLINE: trained.get(HEADLINE, math.nan),
                     'size_mb': trained_size / 1e6 if trained_size else math.nan,
                     'latency': trained_latency if trained_latency is not None else math.nan,
                     'latency_unit': unit}
  if compression or 'compressed' in metrics:
    compressed = metrics.get('compressed') or {}
    size = _find_number(flat, 'compressed', r'bytes', avoid=('gzip', 'ratio'))
    if size is None and trained_size and compression.get('size_ratio'):
      size = trained_size / float(compression['size_ratio'])
    latency = _find_number(flat, 'compressed', batch1, avoid=('search',))
    if latency is None and trained_latency is not None and compression.get('speedup_batch1'):
      latency = trained_latency / float(compression['speedup_batch1'])
    quality = compressed.get(HEADLINE)
    if quality is None and compression.get('recall_retention') is not None:
      quality = trained.get(HEADLINE, math.nan) * float(compression['recall_retention'])
    rows['compressed'] = {HEADLINE: quality if quality is not None else math.nan,
                          'size_mb': size / 1e6 if size else math.nan,
                          'latency': latency if latency is not None else math.nan,
                          'latency_unit': unit}
  frame = pd.DataFrame.from_dict(rows, orient='index')
  frame.index.name = 'model'
  return frame


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.ok{color:#176117;font-weight:600}.bad{color:#a31515;font-weight:600}.note{color:#666}
.verdict{padding:.6em 1em;border-radius:4px;background:#f7f7f7;border-left:5px solid #888}
.verdict.ok{border-color:#2e7d32}.verdict.bad{border-color:#c62828}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}code{background:#f4f4f4;padding:0 .2em}
"""


def _present(value: Any) -> bool:
  return value is not None and not (isinstance(value, float) and math.isnan(value))


def _esc(value: Any) -> str:
  return html.escape(str(value))


def _format(value: Any) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return '—'
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    return f'{value:.4f}' if abs(value) < 1000 else f'{value:,.1f}'
  if isinstance(value, (list, tuple)):
    return ', '.join(_format(v) for v in value)
  return str(value)


def frame_html(frame: pd.DataFrame) -> str:
  """A DataFrame as an HTML table with 4-decimal numbers, escaped."""
  if frame is None or frame.empty:
    return '<p class="note">(empty)</p>'
  # A default RangeIndex says nothing: leave it out.
  show_index = not (isinstance(frame.index, pd.RangeIndex) and frame.index.name is None)
  index_names = [name or '' for name in frame.index.names] if show_index else []
  head = ''.join(f'<th>{_esc(n)}</th>' for n in index_names + list(map(str, frame.columns)))
  body = []
  # itertuples keeps each column's type (iterrows would turn a row of ints and floats to floats).
  for index, *row in frame.itertuples(index=True, name=None):
    keys = (index if isinstance(index, tuple) else (index,)) if show_index else ()
    cells = ''.join(f'<td>{_esc(_format(k))}</td>' for k in keys)
    for value in row:
      if hasattr(value, 'item') and not isinstance(value, str):
        value = value.item()
      if value is pd.NA:
        value = None
      text = _esc(_format(value))
      css = ' class="bad"' if text == 'FAIL' else (' class="ok"' if text == 'pass' else '')
      cells += f'<td{css}>{text}</td>'
    body.append(f'<tr>{cells}</tr>')
  return f'<table><tr>{head}</tr>{"".join(body)}</table>'


def json_html(value: Any) -> str:
  """Any JSON value as tables: scalars under dotted keys, lists of objects as their own table."""
  if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
    return frame_html(pd.DataFrame([flatten(v) for v in value]))
  if not isinstance(value, dict):
    return f'<pre>{_esc(json.dumps(value, indent=2))}</pre>'
  scalars, tables = [], []
  for key, item in flatten(value).items():
    if isinstance(item, list) and item and all(isinstance(v, dict) for v in item):
      tables.append(f'<h4>{_esc(key)}</h4>' + json_html(item))
    else:
      scalars.append(f'<tr><td>{_esc(key)}</td><td>{_esc(_format(item))}</td></tr>')
  table = f'<table><tr><th>key</th><th>value</th></tr>{"".join(scalars)}</table>' if scalars else ''
  return table + ''.join(tables)


def _image(figure: Figure, alt: str) -> str:
  return f'<img alt="{_esc(alt)}" src="{png_data_uri(figure)}">'


def read_json(path: Optional[str]) -> Optional[Dict[str, Any]]:
  """A JSON file's content, None when the file does not exist.

  Raises:
    ReportError: the file exists but is not JSON.
  """
  if not path or not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as error:
    raise ReportError(f'{path}: not readable JSON ({error})') from None


def build_report(pipeline_root: str, pipeline_name: str, node_ids: Dict[str, str],
                 summary_path: Optional[str] = None,
                 benchmark_path: Optional[str] = None) -> str:
  """The self-contained HTML page of a pipeline root's latest run (plots as base64 PNGs).

  Args:
    pipeline_root: The pipeline root (holds metadata.db).
    pipeline_name: The pipeline's name in MLMD.
    node_ids: Role -> component id (configs.NODE_IDS).
    summary_path: run_summary.json; default: next to the pipeline root, when present.
    benchmark_path: The serving benchmark JSON; default: benchmarks/serving.json next to the
      pipeline root, when present.

  Raises:
    ReportError: not a pipeline root, or no Evaluator output in it.
  """
  for given in (summary_path, benchmark_path):
    if given and not os.path.isfile(given):
      raise ReportError(f'{given}: no such file')
  pipeline_root = os.path.abspath(pipeline_root)
  reader = open_reader(pipeline_root, pipeline_name)
  parent = os.path.dirname(pipeline_root)
  summary_path = summary_path or os.path.join(parent, SUMMARY_FILE)
  benchmark_path = benchmark_path or os.path.join(parent, BENCHMARK_FILE)
  summary = read_json(summary_path)
  benchmark = read_json(benchmark_path)
  evaluation = load_evaluation(reader, node_ids)
  thresholds = threshold_table(evaluation)
  history = run_history(reader, node_ids)
  latest = history.iloc[-1]

  sections = []
  gate = (summary or {}).get('baseline_gate') or {}
  # The Pusher's condition is the BaselineGate's: the Evaluator's blessing and the baselines
  # beaten on validation.
  verdict = evaluation.verdict and gate.get('blessed', True)
  css = 'ok' if verdict else 'bad'
  reasons = explain_blessing(evaluation, thresholds)
  if gate.get('reason'):
    reasons = ([reasons[0] if gate.get('blessed', True) else
                f"Not blessed by the baseline gate: {gate['reason']}"] + reasons[1:]
               + [f"Baseline gate: {gate['reason']}"])
  pushed = next((v for v in reversed(list(history['pushed_destination'])) if _present(v)),
                None)
  sections.append(
      f'<div class="verdict {css}"><p class="{css}">{_esc(reasons[0])}</p><ul>'
      + ''.join(f'<li>{_esc(line)}</li>' for line in reasons[1:]) + '</ul>'
      + f'<p>Latest run <code>{_esc(latest["run_id"])}</code>: '
      + _esc(latest['push'])
      + (f' (version {_esc(latest["pushed_version"])})'
         if _present(latest['pushed_version']) else '')
      + (f'. Latest pushed model: <code>{_esc(pushed)}</code>' if pushed else '')
      + '.</p></div>')

  # Metrics overall: the Evaluator's models, then run_summary.json's reference models.
  overall = overall_table(evaluation)
  extra = {}
  summary_metrics = (summary or {}).get('metrics') or {}
  if 'compressed' in summary_metrics and 'compressed' not in overall.index:
    extra['compressed (run_summary.json)'] = summary_metrics['compressed']
  for name, values in (summary_metrics.get('baselines') or {}).items():
    extra[f'baseline: {name} (run_summary.json)'] = values
  if extra:
    rows = pd.DataFrame({label: {m: values.get(m, math.nan) for m in REPORTED} |
                         {EXAMPLE_COUNT: values.get('users')}
                         for label, values in extra.items()}).T
    overall = pd.concat([overall, rows])
    overall.index.name = 'model'
    if EXAMPLE_COUNT in overall:
      overall[EXAMPLE_COUNT] = overall[EXAMPLE_COUNT].astype('Int64')
  sections.append('<h2>Metrics, Overall slice</h2>'
                  f'<p class="note">Evaluator output <code>{_esc(evaluation.uri)}</code> '
                  f'(execution {evaluation.execution_id}, {evaluation.state}); '
                  'example_count = evaluated test users.</p>' + frame_html(overall))

  if gate.get('baselines'):
    rows = pd.DataFrame({name: {'validation recall@10': entry.get('validation_recall@10'),
                                'hyperparameters': ', '.join(
                                    f'{k}={v}' for k, v in (entry.get('params') or {}).items())
                                or '-'}
                         for name, entry in gate['baselines'].items()}).T
    rows.index.name = 'baseline'
    sections.append(
        '<h2>Baseline gate</h2><p class="note">run_summary.json, section '
        '<code>baseline_gate</code>: the classic recommenders of the Baselines component, '
        'tuned on validation; the candidate must do better than '
        f"{_esc(gate.get('min_lift'))}x the best one (0: off).</p>"
        f"<p>{_esc(gate.get('reason'))}</p>" + frame_html(rows))

  comparison = comparison_table(evaluation)
  if comparison is not None:
    sections.append('<h2>Candidate against baseline</h2>'
                    f'<p>Candidate <code>{_esc(evaluation.label(evaluation.candidate))}</code>, '
                    f'baseline <code>{_esc(evaluation.label(evaluation.baseline))}</code>.</p>'
                    + _image(plot_comparison(comparison), 'candidate against baseline')
                    + frame_html(comparison))

  slice_parts = ['<h2>Metrics per slice</h2>']
  columns = slicing_columns(evaluation)
  slice_parts.append('<p class="note">Slicing specs: '
                     + _esc(', '.join(['Overall'] + columns)) + '.</p>')
  for label, table in metrics_tables(evaluation).items():
    slice_parts.append(f'<h3>{_esc(label)}</h3>' + frame_html(table))
    if len(table) > 1:
      slice_parts.append(_image(plot_slices(table, title=f'{label}: metrics per slice'),
                                f'{label} per slice'))
    else:
      slice_parts.append('<p class="note">Only the Overall slice is in this Evaluator '
                         'output.</p>')
  sections.append(''.join(slice_parts))

  sections.append('<h2>Blessing: threshold checks</h2>' + frame_html(thresholds))

  # Further Evaluators of the DAG (e.g. one on search requests): their metrics, per slice.
  for role, node in node_ids.items():
    if role == 'evaluator' or not role.endswith('evaluator'):
      continue
    try:
      other = load_evaluation(reader, node_ids, role=role)
    except ReportError:
      continue
    part = [f'<h2>{_esc(node)}: metrics per slice</h2><p class="note">Evaluator output '
            f'<code>{_esc(other.uri)}</code> (execution {other.execution_id}, '
            f'{other.state}).</p>']
    for label, table in metrics_tables(other).items():
      part.append(f'<h3>{_esc(label)}</h3>' + frame_html(table))
    sections.append(''.join(part))

  training = (summary or {}).get('training')
  if training:
    sections.append(
        '<h2>Training: validation decides the epochs</h2><p class="note">run_summary.json, '
        f"section <code>training</code>: {_esc(training.get('epochs_run'))} of at most "
        f"{_esc(training.get('max_epochs'))} epochs; the weights of epoch "
        f"{_esc(training.get('best_epoch'))} (best validation recall@10, patience "
        f"{_esc(training.get('patience'))}) were kept.{_shrinkage_note(training)}</p>"
        + _image(plot_training(training), 'training curves'))
  else:
    sections.append('<h2>Training: validation decides the epochs</h2><p class="note">Absent '
                    '(no <code>training</code> section in run_summary.json).</p>')

  trained_uri = latest['model_uri'] if isinstance(latest['model_uri'], str) else None
  # Without run_summary.json, the trained model is the baseline when there is one (the
  # candidate is then the compressed model), else the candidate.
  trained_label = evaluation.label(evaluation.baseline if evaluation.baseline is not None
                                   else evaluation.candidate)
  trained_metrics = (overall.loc[trained_label].to_dict() if trained_label in overall.index
                     else None)
  costs = model_costs(summary, directory_bytes(trained_uri), trained_metrics, benchmark)
  compression = (summary or {}).get('compression')
  note = ('' if compression else
          '<p class="note">Compression is absent from this run (no <code>compression</code> '
          'section in run_summary.json): only the trained model is plotted.</p>')
  if costs['latency'].isna().all():
    note += ('<p class="note">Latency not measured: neither a compression report nor a '
             'serving benchmark with a batch-1 p50 is present.</p>')
  sections.append('<h2>Quality against size and latency</h2>' + note
                  + _image(plot_quality_vs_cost(costs), 'quality against size and latency')
                  + frame_html(costs))

  if compression:
    sections.append('<h2>Compression report</h2>'
                    '<p class="note">run_summary.json, section <code>compression</code>.</p>'
                    + json_html(compression))
  else:
    sections.append('<h2>Compression report</h2><p class="note">Absent: this run has no '
                    'compressed model.</p>')

  if benchmark is not None:
    sections.append(f'<h2>Serving benchmark</h2><p class="note">{_esc(benchmark_path)}</p>'
                    + json_html(benchmark))
  else:
    sections.append(f'<h2>Serving benchmark</h2><p class="note">Absent (no '
                    f'{_esc(benchmark_path)}).</p>')

  timings = component_timings(reader, node_ids, summary)
  sections.append('<h2>Per-component timings</h2><p class="note">mlmd_s: execution start to '
                  'end recorded in MLMD for the latest run; summary_s: the runner\'s timings '
                  'in run_summary.json.</p>' + _image(plot_timings(timings), 'timings')
                  + frame_html(timings))

  history_columns = ['run_id', 'started', 'states', 'interactions', 'examples', 'model',
                     'model_status', 'blessed', 'push', 'pushed_version'] + REPORTED
  shown = history[[c for c in history_columns if c in history]].copy()
  shown['interactions'] = shown['interactions'].map(
      lambda p: os.path.basename(p) if isinstance(p, str) else p)
  shown['started'] = shown['started'].map(lambda t: t.strftime('%Y-%m-%d %H:%M:%S'))
  history_part = '<h2>Runs of this pipeline root</h2>' + frame_html(shown)
  if len(history) > 1:
    history_part += _image(plot_history(history), 'metrics across runs')
  sections.append(history_part)

  data = (summary or {}).get('data')
  data_line = (f'<p>Data: {data.get("users")} users, {data.get("items")} items, '
               f'{data.get("interactions")} interactions, {data.get("test_users")} test users '
               f'(run_summary.json).</p>' if data else '')
  generated = datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')
  return ('<!DOCTYPE html><html><head><meta charset="utf-8">'
          f'<title>Run report: {_esc(pipeline_name)}</title><style>{_CSS}</style></head><body>'
          f'<h1>Run report: {_esc(pipeline_name)}</h1>'
          f'<p class="note">Pipeline root <code>{_esc(pipeline_root)}</code>; '
          f'{len(history)} run(s) in MLMD; generated {generated}.</p>' + data_line
          + ''.join(sections) + '</body></html>\n')


def write_report(pipeline_root: str, output: str, pipeline_name: str,
                 node_ids: Dict[str, str], summary_path: Optional[str] = None,
                 benchmark_path: Optional[str] = None) -> str:
  """Writes build_report's page to `output` (atomically); returns the path."""
  page = build_report(pipeline_root, pipeline_name, node_ids, summary_path, benchmark_path)
  output = os.path.abspath(output)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  tmp = output + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(page)
  os.replace(tmp, output)
  return output
