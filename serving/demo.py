"""End of `make run`: serve the pushed model, fetch one recommendation over gRPC, stop.

    python -m serving.demo --output output

Starts `python -m serving.model_server` (the local stand-in for tensorflow_model_server) on
the run's serving directory, asks it for one test user's recommendations through the
tensorflow-serving-api stubs, prints them with titles and stops the server.
"""

import argparse
import csv
import os
import subprocess
import sys
import time

from serving import client as client_lib


def _first_test_user(split_dir: str):
  """A test user and their history (train + validation items, most recent last)."""
  with open(os.path.join(split_dir, 'test.csv'), newline='') as f:
    user = next(csv.DictReader(f))['user_id']
  history = []
  for name in ('train.csv', 'valid.csv'):
    with open(os.path.join(split_dir, name), newline='') as f:
      history += [row['item_id'] for row in csv.DictReader(f) if row['user_id'] == user]
  return user, history


def _wait_available(client: client_lib.RecommenderClient, server, timeout_s: float):
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if server.poll() is not None:
      raise RuntimeError(f'model server exited with status {server.returncode}')
    try:
      if any(state == 'AVAILABLE' for _, state, _ in client.status()):
        return
    except Exception:  # pylint: disable=broad-except
      pass  # not listening yet
    time.sleep(0.5)
  raise RuntimeError(f'model server not AVAILABLE after {timeout_s:.0f} s')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--output', default='output', help='the pipeline run\'s --output')
  parser.add_argument('--port', type=int, default=8500, help='gRPC port')
  parser.add_argument('--items', help='items CSV for titles (default: the run\'s catalog)')
  args = parser.parse_args(argv)
  base_path = os.path.abspath(os.path.join(args.output, 'serving', 'recommender'))
  if not os.path.isdir(base_path) or not os.listdir(base_path):
    print(f'error: {base_path}: no pushed model (was the model blessed?)', file=sys.stderr)
    return 2
  user, history = _first_test_user(os.path.join(args.output, 'split'))
  server = subprocess.Popen(
      [sys.executable, '-m', 'serving.model_server', '--model_name=recommender',
       f'--model_base_path={base_path}', f'--port={args.port}', '--rest_api_port=0'])
  try:
    with client_lib.RecommenderClient(f'127.0.0.1:{args.port}') as client:
      _wait_available(client, server, timeout_s=120)
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
