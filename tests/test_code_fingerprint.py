"""pipeline.CODE (the per-step code in the cache key) covers what each step's module imports."""

import ast
import os

import pipeline
from conftest import REPO

_PACKAGES = ('components', 'trainers', 'compression', 'serving')


def _project_imports(path):
  """Project files a module imports (directly)."""
  tree = ast.parse(open(os.path.join(REPO, path)).read())
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      modules.add(node.module)
      modules.update(f'{node.module}.{alias.name}' for alias in node.names)
  files = set()
  for module in modules:
    if module.split('.')[0] in _PACKAGES:
      candidate = module.replace('.', '/') + '.py'
      if os.path.isfile(os.path.join(REPO, candidate)):
        files.add(candidate)
  return files


def _closure(path):
  seen, todo = set(), [path]
  while todo:
    current = todo.pop()
    if current not in seen:
      seen.add(current)
      todo.extend(_project_imports(current))
  return seen


def test_each_step_fingerprints_all_the_code_it_runs():
  for step, paths in pipeline.CODE.items():
    assert _closure(paths[0]) <= set(paths), step


def test_the_fingerprint_changes_with_the_code(tmp_path, monkeypatch):
  before = pipeline.code_fingerprint('transform')
  copy = tmp_path / 'repo'
  for path in pipeline.CODE['transform']:
    os.makedirs(copy / os.path.dirname(path), exist_ok=True)
    with open(os.path.join(REPO, path)) as f:
      (copy / path).write_text(f.read())
  monkeypatch.setattr(pipeline, 'REPO', str(copy))
  assert pipeline.code_fingerprint('transform') == before
  with open(copy / 'trainers' / 'transform.py', 'a') as f:
    f.write('\n# changed\n')
  assert pipeline.code_fingerprint('transform') != before
