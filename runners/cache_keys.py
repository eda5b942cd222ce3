"""The code part of the custom components' cache keys, found from the imports themselves.

TFX's cache sees a module path ('trainers.trainer.run_fn') and the parameters, not the code
behind them, so it would reuse what an older version of that code computed. Each custom step
therefore gets a parameter `code`: a digest of its entry module and of every project module that
module imports, directly or not, found by reading the import statements (no module is
imported). An edit to a file the step does not import (the gRPC client, the report) leaves its
key, and its cached output, alone.
"""

import ast
import hashlib
import os
from typing import Iterable, List, Set


def _module_file(repo: str, module: str) -> str:
  """The project file of a dotted module name ('' when it is not one of the project's)."""
  base = os.path.join(repo, *module.split('.'))
  for candidate in (base + '.py', os.path.join(base, '__init__.py')):
    if os.path.isfile(candidate):
      return os.path.relpath(candidate, repo)
  return ''


def _imported_files(repo: str, path: str) -> Set[str]:
  """Project files that the module at `path` (relative to `repo`) imports directly."""
  with open(os.path.join(repo, path)) as f:
    tree = ast.parse(f.read(), filename=path)
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      modules.add(node.module)
      modules.update(f'{node.module}.{alias.name}' for alias in node.names)
  return {found for found in (_module_file(repo, m) for m in modules) if found}


def code_files(repo: str, entries: Iterable[str]) -> List[str]:
  """`entries` and every project file they import, transitively; sorted, relative to repo."""
  seen: Set[str] = set()
  todo = list(entries)
  while todo:
    path = todo.pop()
    if path not in seen:
      seen.add(path)
      todo.extend(_imported_files(repo, path) - seen)
  return sorted(seen)


def fingerprint(*paths: str) -> str:
  """sha256 over the files' bytes (16 hex digits)."""
  digest = hashlib.sha256()
  for path in paths:
    with open(path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
  return digest.hexdigest()[:16]


def code_fingerprint(repo: str, entries: Iterable[str]) -> str:
  """The digest of code_files(repo, entries), each file's path included."""
  digest = hashlib.sha256()
  for path in code_files(repo, entries):
    digest.update(path.encode() + b'\0' + fingerprint(os.path.join(repo, path)).encode())
  return digest.hexdigest()[:16]
