"""runners/cache_keys.py: each custom step's code key covers what its module imports, and only
that."""

import os
import shutil

import pipeline
from conftest import REPO
from runners import cache_keys


def test_each_step_covers_the_modules_it_imports():
  trainer = cache_keys.code_files(REPO, pipeline.CODE['trainer'])
  for path in ('trainers/trainer.py', 'trainers/model.py', 'trainers/data.py',
               'trainers/serving_model.py', 'trainers/features.py', 'trainers/text_encoder.py',
               'contract/protocol.py', 'servable/warmup.py', 'servable/requests.py'):
    assert path in trainer, path
  compressor = cache_keys.code_files(REPO, pipeline.CODE['compressor'])
  # The Compressor rebuilds the model and exports it: the Trainer's code but its entry point
  # (run_fn and the worker processes it starts).
  assert 'trainers/workers.py' in trainer
  assert set(trainer) - {'trainers/trainer.py', 'trainers/workers.py'} < set(compressor)
  assert 'compression/distillation.py' in compressor
  assert 'evaluation/artifacts.py' in compressor


def test_a_step_does_not_depend_on_code_it_does_not_run():
  # The gRPC client CLI and the report are not the Trainer's code: editing them must not
  # retrain the model.
  trainer = cache_keys.code_files(REPO, pipeline.CODE['trainer'])
  assert not any(path.startswith(('serving/', 'components/', 'compression/', 'evaluation/'))
                 for path in trainer), trainer


def _copy_repo(tmp_path):
  copy = tmp_path / 'repo'
  steps = ('transform', 'trainer', 'compressor')
  for path in cache_keys.code_files(REPO, [pipeline.CODE[s][0] for s in steps]):
    os.makedirs(copy / os.path.dirname(path), exist_ok=True)
    shutil.copyfile(os.path.join(REPO, path), copy / path)
  for top in ('trainers', 'compression', 'contract', 'evaluation', 'servable', 'components'):
    (copy / top / '__init__.py').touch()
  return copy


def test_the_key_changes_with_an_imported_file_and_not_with_others(tmp_path):
  copy = str(_copy_repo(tmp_path))
  before = {step: cache_keys.code_fingerprint(copy, pipeline.CODE[step])
            for step in ('transform', 'trainer', 'compressor')}
  assert before['trainer'] == cache_keys.code_fingerprint(REPO, pipeline.CODE['trainer'])
  with open(os.path.join(copy, 'compression', 'distillation.py'), 'a') as f:
    f.write('\n# changed\n')
  after = {step: cache_keys.code_fingerprint(copy, pipeline.CODE[step]) for step in before}
  assert after['compressor'] != before['compressor']
  assert after['trainer'] == before['trainer'] and after['transform'] == before['transform']
  with open(os.path.join(copy, 'trainers', 'features.py'), 'a') as f:
    f.write('\n# changed\n')
  again = {step: cache_keys.code_fingerprint(copy, pipeline.CODE[step]) for step in before}
  assert all(again[step] != after[step] for step in before)


def test_input_fingerprint_is_of_the_bytes(tmp_path):
  a, b = tmp_path / 'a.csv', tmp_path / 'b.csv'
  a.write_text('x\n1\n')
  b.write_text('x\n1\n')
  assert cache_keys.fingerprint(str(a)) == cache_keys.fingerprint(str(b))
  b.write_text('x\n2\n')
  assert cache_keys.fingerprint(str(a)) != cache_keys.fingerprint(str(b))
