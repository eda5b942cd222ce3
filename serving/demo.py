"""End of `make run`: serve the pushed model, fetch one recommendation over gRPC, stop.

    python -m serving.demo --output output

Starts `python -m serving.model_server` (the local stand-in for tensorflow_model_server) on
the run's serving directory, asks it for one test user's recommendations through the
tensorflow-serving-api stubs, prints them with titles and stops the server.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from evaluation import baselines
from serving import client as client_lib


def _first_test_user(split_dir: str):
  """A test user and their history (train + validation items, most recent last)."""
  user = baselines.read_pairs(os.path.join(split_dir, 'test.csv'))[0][0]
  history = [item for name in ('train.csv', 'valid.csv')
             for u, item in baselines.read_pairs(os.path.join(split_dir, name)) if u == user]
  return user, history


def _run_summary(output: str):
  """The run's run_summary.json as a dict, or None if there is none."""
  path = os.path.join(output, 'run_summary.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--output', default='output', help='the pipeline run\'s --output')
  parser.add_argument('--port', type=int, default=8500, help='gRPC port')
  parser.add_argument('--items', help='items CSV for titles (default: the run\'s catalog)')
  args = parser.parse_args(argv)
  base_path = os.path.abspath(os.path.join(args.output, 'serving', 'recommender'))
  summary = _run_summary(args.output)
  if summary is not None and not summary.get('blessed'):
    # The gate's decision, not an error of the demo: say what the run decided and stop.
    reasons = '; '.join(summary.get('not_blessed_because') or ['no reason recorded'])
    print(f'\nnothing was pushed, so there is nothing to serve: the model was not blessed '
          f'({reasons}). See {os.path.join(args.output, "run_summary.json")}.')
    return 0
  if not os.path.isdir(base_path) or not os.listdir(base_path):
    print(f'error: {base_path}: no pushed model (run `python pipeline.py run` first)',
          file=sys.stderr)
    return 2
  user, history = _first_test_user(os.path.join(args.output, 'split'))
  server = subprocess.Popen(
      [sys.executable, '-m', 'serving.model_server', '--model_name=recommender',
       f'--model_base_path={base_path}', f'--port={args.port}', '--rest_api_port=0'])
  try:
    with client_lib.RecommenderClient(f'127.0.0.1:{args.port}') as client:
      if not client.wait_available(120, alive=lambda: server.poll() is None):
        raise RuntimeError('model server did not make the model AVAILABLE within 120 s')
      started = time.perf_counter()
      results = client.recommend(user, history[-20:])
      elapsed_ms = (time.perf_counter() - started) * 1000
    titles = {}
    if args.items and os.path.isfile(args.items):
      titles = client_lib.read_titles(args.items)
    print(f'\nrecommendations for user {user} (history of {len(history)} items, '
          f'last: {", ".join(history[-3:])}) over gRPC in {elapsed_ms:.1f} ms:')
    for rank, (item, score) in enumerate(results, 1):
      print(f'{rank:>3}  {item:<10} {score:7.4f}  {titles.get(item, "")}')
  finally:
    server.terminate()
    server.wait(timeout=30)
  return 0


if __name__ == '__main__':
  sys.exit(main())
