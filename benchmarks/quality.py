"""Quality benchmark (issue 3): baselines and the two two-tower models on one split.

  python benchmarks/quality.py [--interactions F --items F] [--output DIR] [--epochs N]
                               [--fine-tune-layers N]
  python benchmarks/quality.py --output DIR --skip-pipeline
  python benchmarks/quality.py --baselines-only --split SPLIT_DIR [--items F] [--output DIR]

Runs the pipeline twice on the same data (`DIR/bert`: the default BERT two-tower;
`DIR/id_only`: `--text-encoder none`), checks that both exported the same split, fits the
baselines of evaluation/baselines.py on that split (tuned on validation, refit on train +
validation, scored on test; docs/contracts.md §2), and prints one Markdown table of recommendation,
cold-start and search quality; with the Compressor in the runs (the default), each run's
compressed (pushed) model has its own row beside the trained one. `--fine-tune-layers N` adds
a third run on the same split (`DIR/bert_fine_tuned`: the BERT two-tower with the encoder's top
N layers fine-tuned, `--trainer fine_tune_layers=N`). Everything it prints is also in
`DIR/quality.json`.

Tasks:
  recommendation  Recall@10, NDCG@10, Recall@100 over the test targets (docs/contracts.md §2).
  cold start      Recall@10 over the test users whose target is not in train + validation.
  search          per test target, the seeded query of contract.protocol.search_query
                  (2-3 words of its title); the model ranks the full catalog from the query
                  alone (no user, no exclusions). Models without text do not search: n/a.
"""

import argparse
import filecmp
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('PYTHONHASHSEED', '0')
# google-api-core warns on every import that Python 3.10 is old; TFX 1.16 needs 3.10.
warnings.filterwarnings('ignore', category=FutureWarning, module='google')

# pylint: disable=g-import-not-at-top,wrong-import-position
from evaluation import baselines

SAMPLE_DIR = os.path.join(REPO, 'data', 'online_retail_sample')
SPLIT_FILES = ('train.csv', 'valid.csv', 'test.csv')
RUNS = (('id_only', ['--text-encoder', 'none'], 'id-only two-tower'),
        ('bert', [], 'BERT two-tower'))


def fine_tuned_run(layers: int) -> tuple:
  """The RUNS entry of the BERT two-tower with its top `layers` encoder layers fine-tuned."""
  return ('bert_fine_tuned', ['--trainer', f'fine_tune_layers={layers}'],
          f'BERT two-tower, top {layers} encoder layer{"s" if layers > 1 else ""} fine-tuned')
BASELINE_ROWS = (('popularity', 'popularity'), ('itemknn', 'ItemKNN'),
                 ('als', 'implicit ALS'), ('hybrid', 'hybrid ALS + text (TF-IDF)'),
                 ('bm25', 'lexical search (BM25)'))
NA = 'n/a'


def run_pipeline(interactions: str, items: str, output: str, extra: List[str],
                 epochs: Optional[int]) -> float:
  """Runs `pipeline.py run` into `output`; returns its wall time. Exits on failure."""
  command = [sys.executable, os.path.join(REPO, 'pipeline.py'), 'run',
             '--interactions', interactions, '--items', items, '--output', output] + extra
  if epochs is not None:
    command += ['--epochs', str(epochs)]
  print('$ ' + ' '.join(command), flush=True)
  start = time.time()
  completed = subprocess.run(command, cwd=REPO, check=False)
  if completed.returncode != 0:
    sys.exit(f'error: the pipeline run into {output} failed (exit code '
             f'{completed.returncode}); see {os.path.join(output, "pipeline.log")}')
  return time.time() - start


def check_same_split(first: str, second: str) -> None:
  """Exits unless both split directories hold byte-identical train/valid/test files."""
  for name in SPLIT_FILES:
    paths = [os.path.join(d, name) for d in (first, second)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      sys.exit(f'error: split file missing: {", ".join(missing)}')
    if not filecmp.cmp(*paths, shallow=False):
      sys.exit(f'error: the two runs exported different splits: {paths[0]} != {paths[1]}; '
               'the models would not be compared on the same targets')


def read_two_tower(run_dir: str, role: str = 'trained') -> Dict[str, Optional[Dict[str, float]]]:
  """The pipeline's own metrics of one model ('trained' or 'compressed') from run_summary.json
  (None where a section is absent)."""
  path = os.path.join(run_dir, 'run_summary.json')
  with open(path) as f:
    summary = json.load(f)

  def section(*keys):
    value = summary
    for key in keys:
      if not isinstance(value, dict) or key not in value:
        return None
      value = value[key]
    return value

  return {'recommendation': section('metrics', role),
          'cold_start': section('cold_start', role),
          'search': section('search', role),
          'timings': section('timings'), 'run_summary': path}


def _cell(values: Optional[Dict[str, float]], key: str) -> str:
  return NA if not values or key not in values else f'{values[key]:.4f}'


def table(rows: List[tuple], cold_users: int) -> str:
  """The Markdown table: one row per (label, metrics entry) in `rows`."""
  header = ['model', 'Recall@10', 'NDCG@10', 'Recall@100',
            f'cold-start Recall@10 (n={cold_users})', 'search Recall@10', 'search NDCG@10']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for label, entry in rows:
    cells = [label,
             _cell(entry['recommendation'], 'recall@10'),
             _cell(entry['recommendation'], 'ndcg@10'),
             _cell(entry['recommendation'], 'recall@100'),
             _cell(entry['cold_start'], 'recall@10'),
             _cell(entry['search'], 'recall@10'),
             _cell(entry['search'], 'ndcg@10')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--interactions', default=os.path.join(SAMPLE_DIR, 'interactions.csv'),
                      help='interactions CSV/Parquet (default: the bundled sample)')
  parser.add_argument('--items', default=os.path.join(SAMPLE_DIR, 'items.csv'),
                      help='items CSV/Parquet (default: the bundled sample)')
  parser.add_argument('--output', default=os.path.join('output', 'quality'),
                      help='directory for the two pipeline runs and quality.json')
  parser.add_argument('--epochs', type=int, help='passed to every pipeline run')
  parser.add_argument('--fine-tune-layers', type=int, default=0, metavar='N',
                      help='also run the BERT two-tower with its top N encoder layers '
                           'fine-tuned (slow without a GPU)')
  parser.add_argument('--skip-pipeline', action='store_true',
                      help='reuse the existing runs under OUTPUT (bert, id_only, and '
                           'bert_fine_tuned with --fine-tune-layers)')
  parser.add_argument('--baselines-only', action='store_true',
                      help='only the baselines, on the split directory given by --split')
  parser.add_argument('--split', help='split directory (train/valid/test.csv) for '
                      '--baselines-only; default: OUTPUT/bert/split')
  args = parser.parse_args(argv)
  if args.fine_tune_layers < 0:
    parser.error('--fine-tune-layers takes a number of layers >= 0')
  run_specs = RUNS + ((fine_tuned_run(args.fine_tune_layers),) if args.fine_tune_layers else ())
  output = os.path.abspath(args.output)
  os.makedirs(output, exist_ok=True)
  runs: Dict[str, dict] = {}
  pipeline_seconds: Dict[str, float] = {}

  if args.baselines_only:
    split_dir = os.path.abspath(args.split or os.path.join(output, 'bert', 'split'))
  else:
    if args.split:
      parser.error('--split is only for --baselines-only (the runs export their own split)')
    for name, extra, _ in run_specs:
      run_dir = os.path.join(output, name)
      if not args.skip_pipeline:
        pipeline_seconds[name] = round(run_pipeline(
            os.path.abspath(args.interactions), os.path.abspath(args.items), run_dir, extra,
            args.epochs), 1)
      if not os.path.isfile(os.path.join(run_dir, 'run_summary.json')):
        sys.exit(f'error: {run_dir}/run_summary.json not found (run without --skip-pipeline)')
      runs[name] = read_two_tower(run_dir)
      compressed = read_two_tower(run_dir, 'compressed')
      if compressed['recommendation'] is not None:
        runs[f'{name}_compressed'] = compressed
    split_dir = os.path.join(output, 'bert', 'split')
    for name, _, _ in run_specs:
      if name != 'bert':
        check_same_split(split_dir, os.path.join(output, name, 'split'))

  for name in SPLIT_FILES:
    if not os.path.isfile(os.path.join(split_dir, name)):
      sys.exit(f'error: {os.path.join(split_dir, name)} not found')
  split = baselines.read_split(split_dir)
  # Imported before the clock starts, so that TensorFlow's start-up (trainers.metrics imports
  # TFMA) is not counted in the first baseline's time.
  from trainers import metrics  # pylint: disable=unused-import
  print(f'split {split_dir}: {len(split.train)} train, {len(split.valid)} valid, '
        f'{len(split.test)} test pairs; items {args.items}', flush=True)
  start = time.time()
  results = baselines.evaluate_baselines(split, os.path.abspath(args.items),
                                         log=lambda line: print('  ' + line, flush=True))
  baseline_seconds = round(time.time() - start, 1)
  cold_users = next(iter(results.values()))['cold_start_users']

  rows = [(label, results[name]) for name, label in BASELINE_ROWS]
  for name, _, label in run_specs:
    rows += [(row_label, runs[key]) for key, row_label in (
        (name, label), (f'{name}_compressed', f'{label}, compressed (pushed)')) if key in runs]
  for name, _, label in run_specs:
    pipeline_cold = (runs.get(name) or {}).get('cold_start') or {}
    if pipeline_cold.get('users', cold_users) != cold_users:
      print(f'warning: {label} reports cold start over {pipeline_cold["users"]} users, '
            f'the baselines over {cold_users}', file=sys.stderr)
  markdown = table(rows, cold_users)
  print()
  print(markdown)
  print()
  print('tuned on validation (fit on train, best validation Recall@10), then refit on '
        'train + validation:')
  for name, label in BASELINE_ROWS:
    entry = results[name]
    params = ', '.join(f'{k}={v}' for k, v in entry['params'].items()) or 'none'
    seconds = entry['seconds']
    print(f'  {label}: {params} (grid of {len(entry["validation"]) or 1}; tune '
          f'{seconds["tune"]:.1f} s, fit {seconds["fit"]:.1f} s, score {seconds["score"]:.1f} s)')
  print(f'baselines: {baseline_seconds:.1f} s in all', end='')
  print(''.join(f'; pipeline {name}: {s:.1f} s' for name, s in pipeline_seconds.items()))

  report = {
      'split': split_dir,
      'items': os.path.abspath(args.items),
      'data': {'train_pairs': len(split.train), 'valid_pairs': len(split.valid),
               'test_users': len(split.test), 'cold_start_users': cold_users},
      'baselines': results,
      'two_tower': runs,
      'seconds': {'baselines': baseline_seconds, 'pipeline': pipeline_seconds},
      'table': markdown,
  }
  with open(os.path.join(output, 'quality.json'), 'w') as f:
    json.dump(report, f, indent=2, sort_keys=False)
  print(f'wrote {os.path.join(output, "quality.json")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
