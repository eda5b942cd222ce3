"""Reviewing runs: the Evaluator's output and MLMD lineage as tables, plots and an HTML page.

`notebooks/evaluator_report.ipynb`, `notebooks/run_history.ipynb` and `pipeline.py report` are
thin callers of this module (docs/reviewing_runs.md). Everything comes from a pipeline root: ML
Metadata (`metadata.db`, read through run_summary.RunReader) for the lineage of each run, TFMA's
loaders (`tfma.load_eval_result`, `tfma.load_validation_result`) for the Evaluator's output, and,
next to the pipeline root, `run_summary.json` (timings, baselines, the compression section) and
`benchmarks/serving.json` (the serving benchmark) when they exist.

The Evaluator's output is shown for whatever it holds: every slice of its slicing specs, every
model of its model specs; when one model spec is a baseline (`is_baseline`), the candidate is
compared against it and TFMA's `*_diff` metrics and change thresholds are reported too.

This module builds the HTML page and is the one to import; the pieces live beside it:
  report_mlmd     the pipeline root's ML Metadata (open_reader, ReportError)
  report_tfma     the Evaluator's output loaded with TFMA (Evaluation, load_evaluation)
  report_tables   metrics per slice and model, candidate against baseline, threshold checks
  report_history  every run of the pipeline root, per-component timings
  report_costs    quality against size and latency (run_summary.json's compression section)
  report_plots    matplotlib figures of those tables
  report_html     HTML tables and images
"""

import datetime
import json
import math
import os
from typing import Any, Dict, Optional

import pandas as pd

from evaluation.report_costs import directory_bytes, flatten, model_costs
from evaluation.report_history import component_timings, history_changes, overall_metrics
from evaluation.report_history import present, run_history
from evaluation.report_html import CSS, escape, frame_html, image_html, json_html
from evaluation.report_mlmd import ReportError, open_reader
from evaluation.report_plots import plot_comparison, plot_history, plot_quality_vs_cost
from evaluation.report_plots import plot_slices, plot_timings, plot_training, png_data_uri
from evaluation.report_tables import comparison_table, describe_threshold, explain_blessing
from evaluation.report_tables import metrics_table, metrics_tables, overall_table
from evaluation.report_tables import threshold_table
from evaluation.report_tfma import EXAMPLE_COUNT, HEADLINE, OVERALL, REPORTED, UNNAMED_MODEL
from evaluation.report_tfma import Evaluation, frontend_has_widgets, load_evaluation
from evaluation.report_tfma import load_evaluation_dir, slicing_columns, slicing_widgets

__all__ = [
    # the page
    'SUMMARY_FILE', 'BENCHMARK_FILE', 'build_report', 'write_report', 'read_json',
    # report_mlmd
    'ReportError', 'open_reader',
    # report_tfma
    'OVERALL', 'REPORTED', 'EXAMPLE_COUNT', 'HEADLINE', 'UNNAMED_MODEL', 'Evaluation',
    'load_evaluation_dir', 'load_evaluation', 'slicing_columns', 'frontend_has_widgets',
    'slicing_widgets',
    # report_tables
    'metrics_table', 'metrics_tables', 'overall_table', 'comparison_table',
    'describe_threshold', 'threshold_table', 'explain_blessing',
    # report_history
    'overall_metrics', 'run_history', 'history_changes', 'component_timings',
    # report_costs
    'flatten', 'directory_bytes', 'model_costs',
    # report_plots
    'plot_slices', 'plot_comparison', 'plot_history', 'plot_training', 'plot_timings',
    'plot_quality_vs_cost', 'png_data_uri',
    # report_html
    'frame_html', 'json_html',
]

SUMMARY_FILE = 'run_summary.json'
BENCHMARK_FILE = os.path.join('benchmarks', 'serving.json')


def _shrinkage_note(training: dict) -> str:
  """The id-embedding shrinkage validation chose after training (text models), as a sentence."""
  shrinkage = training.get('id_shrinkage')
  if not shrinkage:
    return ''
  tried = ', '.join(f'm={escape(m)}: {r:.4f}' for m, r in shrinkage['validation_recall@10'].items())
  return (f' Item-id embeddings weighed by c/(c+m) (c: the item\'s training examples): '
          f'm={escape(shrinkage["chosen"])} chosen on validation recall@10 ({tried}).')


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
  pushed = next((v for v in reversed(list(history['pushed_destination'])) if present(v)),
                None)
  sections.append(
      f'<div class="verdict {css}"><p class="{css}">{escape(reasons[0])}</p><ul>'
      + ''.join(f'<li>{escape(line)}</li>' for line in reasons[1:]) + '</ul>'
      + f'<p>Latest run <code>{escape(latest["run_id"])}</code>: '
      + escape(latest['push'])
      + (f' (version {escape(latest["pushed_version"])})'
         if present(latest['pushed_version']) else '')
      + (f'. Latest pushed model: <code>{escape(pushed)}</code>' if pushed else '')
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
                  f'<p class="note">Evaluator output <code>{escape(evaluation.uri)}</code> '
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
        f"{escape(gate.get('min_lift'))}x the best one (0: off).</p>"
        f"<p>{escape(gate.get('reason'))}</p>" + frame_html(rows))

  comparison = comparison_table(evaluation)
  if comparison is not None:
    sections.append('<h2>Candidate against baseline</h2>'
                    f'<p>Candidate <code>{escape(evaluation.label(evaluation.candidate))}</code>, '
                    f'baseline <code>{escape(evaluation.label(evaluation.baseline))}</code>.</p>'
                    + image_html(plot_comparison(comparison), 'candidate against baseline')
                    + frame_html(comparison))

  slice_parts = ['<h2>Metrics per slice</h2>']
  columns = slicing_columns(evaluation)
  slice_parts.append('<p class="note">Slicing specs: '
                     + escape(', '.join(['Overall'] + columns)) + '.</p>')
  for label, table in metrics_tables(evaluation).items():
    slice_parts.append(f'<h3>{escape(label)}</h3>' + frame_html(table))
    if len(table) > 1:
      slice_parts.append(image_html(plot_slices(table, title=f'{label}: metrics per slice'),
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
    part = [f'<h2>{escape(node)}: metrics per slice</h2><p class="note">Evaluator output '
            f'<code>{escape(other.uri)}</code> (execution {other.execution_id}, '
            f'{other.state}).</p>']
    for label, table in metrics_tables(other).items():
      part.append(f'<h3>{escape(label)}</h3>' + frame_html(table))
    sections.append(''.join(part))

  training = (summary or {}).get('training')
  if training:
    sections.append(
        '<h2>Training: validation decides the epochs</h2><p class="note">run_summary.json, '
        f"section <code>training</code>: {escape(training.get('epochs_run'))} of at most "
        f"{escape(training.get('max_epochs'))} epochs; the weights of epoch "
        f"{escape(training.get('best_epoch'))} (best validation recall@10, patience "
        f"{escape(training.get('patience'))}) were kept.{_shrinkage_note(training)}</p>"
        + image_html(plot_training(training), 'training curves'))
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
                  + image_html(plot_quality_vs_cost(costs), 'quality against size and latency')
                  + frame_html(costs))

  if compression:
    sections.append('<h2>Compression report</h2>'
                    '<p class="note">run_summary.json, section <code>compression</code>.</p>'
                    + json_html(compression))
  else:
    sections.append('<h2>Compression report</h2><p class="note">Absent: this run has no '
                    'compressed model.</p>')

  if benchmark is not None:
    sections.append(f'<h2>Serving benchmark</h2><p class="note">{escape(benchmark_path)}</p>'
                    + json_html(benchmark))
  else:
    sections.append(f'<h2>Serving benchmark</h2><p class="note">Absent (no '
                    f'{escape(benchmark_path)}).</p>')

  timings = component_timings(reader, node_ids, summary)
  sections.append('<h2>Per-component timings</h2><p class="note">mlmd_s: execution start to '
                  'end recorded in MLMD for the latest run; summary_s: the runner\'s timings '
                  'in run_summary.json.</p>' + image_html(plot_timings(timings), 'timings')
                  + frame_html(timings))

  history_columns = ['run_id', 'started', 'states', 'interactions', 'examples', 'model',
                     'model_status', 'blessed', 'push', 'pushed_version'] + REPORTED
  shown = history[[c for c in history_columns if c in history]].copy()
  shown['interactions'] = shown['interactions'].map(
      lambda p: os.path.basename(p) if isinstance(p, str) else p)
  shown['started'] = shown['started'].map(lambda t: t.strftime('%Y-%m-%d %H:%M:%S'))
  history_part = '<h2>Runs of this pipeline root</h2>' + frame_html(shown)
  if len(history) > 1:
    history_part += image_html(plot_history(history), 'metrics across runs')
  sections.append(history_part)

  data = (summary or {}).get('data')
  data_line = (f'<p>Data: {data.get("users")} users, {data.get("items")} items, '
               f'{data.get("interactions")} interactions, {data.get("test_users")} test users '
               f'(run_summary.json).</p>' if data else '')
  generated = datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')
  return ('<!DOCTYPE html><html><head><meta charset="utf-8">'
          f'<title>Run report: {escape(pipeline_name)}</title><style>{CSS}</style></head><body>'
          f'<h1>Run report: {escape(pipeline_name)}</h1>'
          f'<p class="note">Pipeline root <code>{escape(pipeline_root)}</code>; '
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
