"""The Evaluator's output as tables: metrics per slice and model, candidate against baseline,
and every threshold check behind the blessing (docs/reviewing_runs.md).

Everything reads an Evaluation of report_tfma; slices are labelled 'Overall', 'feature:value'
(crossed slices 'a:x vs b:y') and listed Overall first.
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pandas as pd
import tensorflow_model_analysis as tfma
from tensorflow_model_analysis.metrics import metric_specs
from tensorflow_model_analysis.proto import config_pb2
from tensorflow_model_analysis.slicer import slicer_lib as slicer

from evaluation.report_tfma import EXAMPLE_COUNT, OVERALL, REPORTED, Evaluation


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
