"""The run report's plots, as matplotlib Figures (docs/reviewing_runs.md).

Each takes one of the report's tables (report_tables, report_history, report_costs) or
run_summary.json's `training` section; png_data_uri embeds a figure in the HTML page. Figures
are made with matplotlib.figure.Figure, not pyplot: no display or global state is involved.
"""

import base64
import io
from typing import Any, Dict, Sequence

import pandas as pd
from matplotlib.figure import Figure

from evaluation.report_tfma import HEADLINE, OVERALL, REPORTED


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
