"""The layers of docs/architecture.md, checked on the source: imports point one way, no package
reaches into another's private names, the data contract stays free of TensorFlow, and files
stay readable in size."""

import ast
import os

import pytest

from conftest import REPO

# Each top-level package and what it may import from the project (itself included). Bottom up:
# a package never imports one above it, so the graph has no circle.
ALLOWED = {
    'contract': {'contract'},
    'servable': {'servable'},
    'trainers': {'trainers', 'contract', 'servable'},
    'compression': {'compression', 'trainers', 'contract', 'servable'},
    'evaluation': {'evaluation', 'trainers', 'contract'},
    'components': {'components', 'compression', 'evaluation', 'trainers', 'contract', 'servable'},
    'runners': {'runners'},
    'serving': {'serving', 'servable', 'contract', 'evaluation'},
    'configs': set(),
}
PROJECT = set(ALLOWED) | {'pipeline'}
# No source file over this many lines: one module per topic, readable in one sitting.
MAX_LINES = 600


def _sources():
  for top in sorted(PROJECT):
    if os.path.isfile(os.path.join(REPO, f'{top}.py')):
      yield f'{top}.py'
      continue
    for root, _, files in os.walk(os.path.join(REPO, top)):
      for name in sorted(files):
        if name.endswith('.py'):
          yield os.path.relpath(os.path.join(root, name), REPO)


def _package(path):
  return path.split('/')[0].removesuffix('.py')


def _imports(path):
  """(module, names) of each import statement of a file, names None for `import module`."""
  with open(os.path.join(REPO, path)) as f:
    tree = ast.parse(f.read(), filename=path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, None, alias.asname or alias.name.split('.')[0], tree
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      yield node.module, [(a.name, a.asname or a.name) for a in node.names], None, tree


SOURCES = list(_sources())


def test_the_layer_check_sees_every_package():
  assert {_package(p) for p in SOURCES} == PROJECT
  assert len(SOURCES) > 40


@pytest.mark.parametrize('path', SOURCES)
def test_imports_point_down_the_layers(path):
  package = _package(path)
  for module, _, _, _ in _imports(path):
    top = module.split('.')[0]
    if top == 'pipeline':
      raise AssertionError(f'{path} imports pipeline.py: nothing may')
    if top in PROJECT and package != 'pipeline':
      assert top in ALLOWED[package], f'{path} ({package}) imports {module}'


@pytest.mark.parametrize('path', SOURCES)
def test_no_private_name_crosses_a_package(path):
  package = _package(path)
  with open(os.path.join(REPO, path)) as f:
    tree = ast.parse(f.read(), filename=path)
  foreign = set()  # local names bound to another package's modules
  for module, names, bound, _ in _imports(path):
    top = module.split('.')[0]
    if top not in PROJECT or top == package:
      continue
    if names is None:
      foreign.add(bound)
      continue
    for name, asname in names:
      assert not name.startswith('_'), f'{path} imports {module}.{name}'
      foreign.add(asname)
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and node.attr.startswith('_') and
        not node.attr.startswith('__') and isinstance(node.value, ast.Name) and
        node.value.id in foreign):
      raise AssertionError(f'{path}:{node.lineno} uses {node.value.id}.{node.attr}')


def test_the_data_contract_needs_no_tensorflow():
  for path in SOURCES:
    if _package(path) == 'contract':
      for module, _, _, _ in _imports(path):
        assert module.split('.')[0] not in ('tensorflow', 'tfx', 'apache_beam'), (path, module)


def test_files_stay_under_the_size_limit():
  for path in SOURCES:
    with open(os.path.join(REPO, path)) as f:
      lines = sum(1 for _ in f)
    assert lines <= MAX_LINES, f'{path}: {lines} lines, over {MAX_LINES}'
