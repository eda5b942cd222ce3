"""What the recommend_k signature costs at export: the compressed module of a pipeline run,
saved with and without it, alternately (after one warm-up save, which pays for the tracing of
the shared pieces).

    python benchmarks/export_cost.py --pipeline-root output/pipeline_root

Prints the seconds of each save and the mean difference.
"""

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf
import tensorflow_transform as tft

from compression import export as export_lib
from compression import pruning
from servable import requests as requests_lib
from trainers import features
from trainers import model as model_lib


def _latest(pattern: str) -> str:
  found = sorted(glob.glob(pattern), key=lambda p: int(os.path.basename(p)))
  if not found:
    raise SystemExit(f'error: nothing matches {pattern}: give a pipeline root of a finished run')
  return found[-1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pipeline-root', required=True)
  parser.add_argument('--rounds', type=int, default=2)
  args = parser.parse_args()
  model_uri = _latest(os.path.join(args.pipeline_root, 'Trainer', 'model', '*'))
  transform = tft.TFTransformOutput(
      _latest(os.path.join(args.pipeline_root, 'Transform', 'transform_graph', '*')))
  model, _, teacher, _ = model_lib.load_trainer_state(model_uri)
  pruning.build(model)
  seconds = {False: [], True: []}
  work = tempfile.mkdtemp(prefix='export_cost_')
  try:
    for i, with_k in enumerate([True] + [False, True] * args.rounds):
      module = export_lib.build_module(model, transform, 10, teacher, quantize=True)[0]
      signatures = {'serving_default': module.serve, features.EVAL_SIGNATURE: module.eval_ranks,
                    'transform_features': module.transform_features}
      if with_k:
        signatures[requests_lib.K_SIGNATURE] = module.serve_k
      target = os.path.join(work, str(i))
      started = time.perf_counter()
      tf.saved_model.save(module, target, signatures=signatures)
      elapsed = time.perf_counter() - started
      shutil.rmtree(target)
      label = 'warm-up' if i == 0 else ('with recommend_k' if with_k else 'without')
      print(f'save {i}: {label}: {elapsed:.1f} s', flush=True)
      if i:
        seconds[with_k].append(elapsed)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  mean = lambda values: sum(values) / len(values)
  print(f'mean without {mean(seconds[False]):.1f} s, with {mean(seconds[True]):.1f} s: '
        f'recommend_k adds {mean(seconds[True]) - mean(seconds[False]):+.1f} s per export')


if __name__ == '__main__':
  main()
