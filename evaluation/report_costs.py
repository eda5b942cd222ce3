"""What each model costs for its quality: size on disk and batch-1 latency of the trained and
the compressed model (docs/reviewing_runs.md).

Read from run_summary.json's `compression` section and the serving benchmark
(benchmarks/serving.json), whose keys are matched by name (flatten gives them dotted paths);
what they do not give is measured on disk or derived from the compression ratios.
"""

import math
import os
import re
from typing import Any, Dict, Optional, Sequence

import pandas as pd

from evaluation.report_tfma import HEADLINE


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
