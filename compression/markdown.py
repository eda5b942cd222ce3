"""The Compressor report's readable page (report.md), from its report.json."""

import json

from compression import benchmark

# The latency-only variant of the report's `ablation` section.
ABLATION = 'compressed_without_fast_ids'


def fmt(value, pattern='{:.3f}'):
  return '-' if value is None else pattern.format(value)


def _latency_pairs(trained: dict, compressed: dict, timings: str):
  """(kind, batch, trained timing, compressed timing) where both models were timed."""
  for kind in (benchmark.RECOMMEND, benchmark.SEARCH):
    for batch in benchmark.BATCH_SIZES:
      key = f'batch_{batch}'
      t = trained.get(timings, {}).get(kind, {}).get(key)
      c = compressed.get(timings, {}).get(kind, {}).get(key)
      if t and c:
        yield kind, batch, t, c


def report_markdown(report: dict) -> str:
  """The readable page of a report."""
  trained, compressed = report['trained'], report['compressed']
  lines = ['# Compression report', '',
           f"Size ratio (bytes on disk) **{fmt(report['size_ratio'], '{:.2f}x')}**, "
           f"gzip {fmt(report['gzip_size_ratio'], '{:.2f}x')}; "
           f"speed-up at batch 1: recommendation "
           f"**{fmt(report['speedup_batch1'], '{:.2f}x')}**, search "
           f"**{fmt(report['speedup_search_batch1'], '{:.2f}x')}**; "
           f"Recall@10 retention **{fmt(report['recall_retention'], '{:.1%}')}** "
           f"(search {fmt(report['search_recall_retention'], '{:.1%}')}). "
           f"Through the Session API (as TF Serving runs models), batch 1: recommendation "
           f"{fmt(report.get('session_speedup_batch1'), '{:.2f}x')}, search "
           f"{fmt(report.get('session_speedup_search_batch1'), '{:.2f}x')}.", '']
  chosen = report.get('chosen')
  if chosen:
    lines += ['## Candidates (validation split)', '',
              f"Kept: **{chosen['name']}**: {chosen['why']}.", '',
              '| # | candidate | validation recall@10 | retention | lower bound | hits lost / '
              'gained | bytes | recommend p50 ms | search p50 ms | seconds |',
              '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for i, c in enumerate(report.get('candidates') or []):
      mark = ' (kept)' if i == chosen['index'] else ''
      lines.append(f"| {i + 1} | {c['name']}{mark} | {fmt(c['validation_recall@10'], '{:.4f}')} "
                   f"| {c['retention']:.1%} | {c['retention_lower']:.1%} | "
                   f"{c['lost']} / {c['gained']} | {c['bytes']:,} | "
                   f"{fmt(c['recommend_p50_ms'], '{:.2f}')} | {fmt(c['search_p50_ms'], '{:.2f}')} "
                   f"| {c['seconds']:.0f} |")
    lines.append('')
  lines += index_markdown(report.get('index'))
  lines += ['## Size', '', '| model | bytes on disk | gzip bytes | variables by dtype |',
           '| --- | ---: | ---: | --- |']
  for name, summary in (('trained', trained), ('compressed', compressed)):
    dtypes = ', '.join(f'{k}: {v:,}' for k, v in sorted(summary['variable_bytes'].items()))
    lines.append(f"| {name} | {summary['bytes']:,} | {summary['gzip_bytes']:,} | {dtypes} |")
  lines += ['', '## Latency (ms, in-process serving_default)', '',
            '| request | batch | trained p50 | trained p99 | compressed p50 | compressed p99 | '
            'speed-up (p50) |', '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  for kind, batch, t, c in _latency_pairs(trained, compressed, 'latency_ms'):
    lines.append(f"| {kind} | {batch} | {t['p50']:.2f} | {t['p99']:.2f} | {c['p50']:.2f} | "
                 f"{c['p99']:.2f} | {t['p50'] / c['p50']:.2f}x |")
  lines += ['', 'The same requests through the Session API (Session::Run, as TF Serving runs a '
            'SavedModel):', '', '| request | batch | trained p50 | compressed p50 | speed-up |',
            '| --- | ---: | ---: | ---: | ---: |']
  for kind, batch, t, c in _latency_pairs(trained, compressed, 'session_latency_ms'):
    lines.append(f"| {kind} | {batch} | {t['p50']:.2f} | {c['p50']:.2f} | "
                 f"{t['p50'] / c['p50']:.2f}x |")
  ablation = (report.get('ablation') or {}).get(ABLATION)
  if ablation:
    lines += ['', 'The compressed model without the fast id path (every request through the '
              'whole Transform graph), timed in the same rounds:', '',
              '| request | batch | p50 | p99 | trained p50 / this p50 |',
              '| --- | ---: | ---: | ---: | ---: |']
    for kind in (benchmark.RECOMMEND, benchmark.SEARCH):
      for batch in benchmark.BATCH_SIZES:
        key = f'batch_{batch}'
        a = ablation['latency_ms'].get(kind, {}).get(key)
        t = trained['latency_ms'].get(kind, {}).get(key)
        if a and t:
          lines.append(f"| {kind} | {batch} | {a['p50']:.2f} | {a['p99']:.2f} | "
                       f"{t['p50'] / a['p50']:.2f}x |")
  fast = report.get('fast_id_path') or {}
  lines += ['', f"Fast id path for query-less batches: {'on' if fast.get('enabled') else 'off'}"
            f" (checked against the Transform graph: `{json.dumps(fast.get('check'))}`)."]
  lines += ['', '## Quality', '', '| split | model | recall@10 | ndcg@10 | mrr@10 | recall@50 | '
            'recall@100 | users |', '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  for split in sorted(set(trained['quality']) | set(compressed['quality'])):
    for name, summary in (('trained', trained), ('compressed', compressed)):
      m = summary['quality'].get(split)
      if m:
        lines.append(f"| {split} | {name} | {m['recall@10']:.4f} | {m['ndcg@10']:.4f} | "
                     f"{m['mrr@10']:.4f} | {m['recall@50']:.4f} | {m['recall@100']:.4f} | "
                     f"{m['users']} |")
  lines += ['', '## Sparsity after pruning', '', f"Pruning: `{json.dumps(report['pruning'])}`",
            '', '| layer | weight | shape | zeros | sparsity |',
            '| --- | --- | --- | ---: | ---: |']
  for name, s in report['sparsity'].items():
    lines.append(f"| {name} | {s['weight']} | {s['shape']} | {s['zeros']:,} | "
                 f"{s['sparsity']:.3f} |")
  lines += ['', '## Quantized tensors (int8, symmetric, dequantized as cast(q) * scale)', '',
            '| tensor | shape | scales | scheme | float bytes | int8 + scale bytes | '
            'max abs error | max abs value | storage |',
            '| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |']
  for q in report['quantized']:
    lines.append(f"| {q['name']} | {q['shape']} {q['dtype']} | {q['scale_shape']} "
                 f"{q['scale_dtype']} | {q['scheme']} | {q['float_bytes']:,} | "
                 f"{q['quantized_bytes']:,} | {q['max_abs_error']:.2e} | "
                 f"{q['max_abs_value']:.3f} | {q.get('storage', '')} |")
  agreement = report.get('quantization_agreement')
  if agreement:
    lines += ['', 'int8 vs float32 (same pruned model) on the eval split: '
              f'`{json.dumps(agreement)}`']
  lines += ['', '## Kept in float32', ''] + [f"- {k['name']}: {k['why']}"
                                              for k in report['kept_float']]
  lines += ['', '## Left out of the compressed model', ''] + [
      f"- {k['name']}: {k['why']}" for k in report['left_out']]
  if report.get('distillation'):
    lines += ['', '## Distillation', '', '```json',
              json.dumps(report['distillation'], indent=2), '```']
  lines += ['', f"Seconds: `{json.dumps(report['seconds'])}`", '']
  return '\n'.join(lines)


def index_markdown(index) -> list:
  """The approximate index's section: nprobe x scanned share x batch-1 latency x validation
  index recall@10 (compression.ivf.choose's rows)."""
  if not index:
    return []
  lines = ['## Approximate top-K index (validation split)', '',
           f"{index['n_lists']} lists (k-means, {index['build_seconds']:.1f} s); serving_default "
           f"{'uses it with nprobe ' + str(index['nprobe']) if index['used'] else 'is brute force'}"
           f": {index['why']}. Index recall@10: share of the exact top-10 (history excluded) "
           f"returned, over {index['validation_requests']} validation requests; latency: the "
           'search alone, in-process, batch 1.', '',
           '| nprobe | index recall@10 | vectors scanned | share of catalog | batch-1 p50 ms |',
           '| ---: | ---: | ---: | ---: | ---: |']
  for row in index['rows']:
    mark = ' (chosen)' if index['used'] and row['nprobe'] == index['nprobe'] else ''
    lines.append(f"| {row['nprobe']}{mark} | {row['index_recall@10']:.4f} | "
                 f"{row['scanned']:,.0f} | {row['scanned_share']:.1%} | "
                 f"{row['batch1_p50_ms']:.3f} |")
  lines += [f"| brute force | 1.0000 | - | 100.0% | {index['exact_batch1_p50_ms']:.3f} |", '']
  return lines
