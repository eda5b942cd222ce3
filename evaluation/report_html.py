"""HTML for the run report's page: its style sheet, tables from DataFrames and from any JSON,
and plots as embedded PNGs (docs/reviewing_runs.md). Every value is escaped; numbers show 4
decimals, missing values a dash.
"""

import html
import json
import math
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from evaluation.report_costs import flatten
from evaluation.report_plots import png_data_uri

CSS = """
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


def escape(value: Any) -> str:
  """str(value), escaped for HTML text and attributes."""
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
  head = ''.join(f'<th>{escape(n)}</th>' for n in index_names + list(map(str, frame.columns)))
  body = []
  # itertuples keeps each column's type (iterrows would turn a row of ints and floats to floats).
  for index, *row in frame.itertuples(index=True, name=None):
    keys = (index if isinstance(index, tuple) else (index,)) if show_index else ()
    cells = ''.join(f'<td>{escape(_format(k))}</td>' for k in keys)
    for value in row:
      if hasattr(value, 'item') and not isinstance(value, str):
        value = value.item()
      if value is pd.NA:
        value = None
      text = escape(_format(value))
      css = ' class="bad"' if text == 'FAIL' else (' class="ok"' if text == 'pass' else '')
      cells += f'<td{css}>{text}</td>'
    body.append(f'<tr>{cells}</tr>')
  return f'<table><tr>{head}</tr>{"".join(body)}</table>'


def json_html(value: Any) -> str:
  """Any JSON value as tables: scalars under dotted keys, lists of objects as their own table."""
  if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
    return frame_html(pd.DataFrame([flatten(v) for v in value]))
  if not isinstance(value, dict):
    return f'<pre>{escape(json.dumps(value, indent=2))}</pre>'
  scalars, tables = [], []
  for key, item in flatten(value).items():
    if isinstance(item, list) and item and all(isinstance(v, dict) for v in item):
      tables.append(f'<h4>{escape(key)}</h4>' + json_html(item))
    else:
      scalars.append(f'<tr><td>{escape(key)}</td><td>{escape(_format(item))}</td></tr>')
  table = f'<table><tr><th>key</th><th>value</th></tr>{"".join(scalars)}</table>' if scalars else ''
  return table + ''.join(tables)


def image_html(figure: Figure, alt: str) -> str:
  """An <img> of the figure, its PNG embedded (the page needs no other file)."""
  return f'<img alt="{escape(alt)}" src="{png_data_uri(figure)}">'
