"""The pipeline image's Dockerfile, read as text (no Docker daemon or registry here).

It must build FROM tensorflow/tfx:1.16.0, install exactly the lock file the Makefile installs
(and nothing else), copy everything the DAG imports, and agree with the compiled spec on the
image tag and on where setup.py is.
"""

import ast
import fnmatch
import json
import os
import re
import shlex

import pipeline
from runners import beam as beam_runners
from conftest import REPO

BASE_IMAGE = 'tensorflow/tfx:1.16.0'


def _instructions(path):
  """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
  with open(path) as f:
    text = f.read()
  instructions, current = [], ''
  for line in text.splitlines():
    if not current and (not line.strip() or line.lstrip().startswith('#')):
      continue
    if line.lstrip().startswith('#'):  # a comment inside a continued instruction
      continue
    if line.rstrip().endswith('\\'):
      current += line.rstrip()[:-1] + ' '
      continue
    current += line
    keyword, _, arguments = current.strip().partition(' ')
    instructions.append((keyword.upper(), arguments.strip()))
    current = ''
  assert not current, f'unterminated instruction: {current}'
  return instructions


def _substitute(text, variables):
  return re.sub(r'\$\{(\w+)\}|\$(\w+)', lambda m: variables.get(m.group(1) or m.group(2),
                                                                 m.group(0)), text)


def _final_stage():
  """(ARG defaults, FROM images in order, the last stage's instructions)."""
  args, images, stage = {}, [], []
  for keyword, arguments in _instructions(os.path.join(REPO, 'Dockerfile')):
    if keyword == 'ARG' and not images:
      name, _, default = arguments.partition('=')
      args[name] = default
    elif keyword == 'FROM':
      images.append(_substitute(arguments.split()[0], args))
      stage = []
    else:
      stage.append((keyword, arguments))
  return args, images, stage


def _locked(name):
  with open(os.path.join(REPO, _makefile_lock())) as f:
    for line in f:
      if line.lower().startswith(f'{name}=='):
        return line.strip().split('==')[1]
  raise AssertionError(f'{name} is not in the lock file')


def _makefile_lock():
  """The file `make` installs the venv from (`uv pip sync ... FILE`)."""
  with open(os.path.join(REPO, 'Makefile')) as f:
    (lock,) = re.findall(r'uv pip sync\b.*?(\S+)\s*$', f.read(), re.MULTILINE)
  return lock


def _makefile_uv():
  with open(os.path.join(REPO, 'Makefile')) as f:
    (pin,) = set(re.findall(r'pip install .*?\buv==([\w.]+)', f.read()))
  return pin


def _env(stage):
  env = {}
  for keyword, arguments in stage:
    if keyword == 'ENV':
      for item in shlex.split(arguments):
        key, _, value = item.partition('=')
        env[key] = value
  return env


def _run_commands(stage):
  """Every shell command of the stage's RUN instructions, split on && and ; outside quotes."""
  commands = []
  for keyword, arguments in stage:
    if keyword == 'RUN':
      lexer = shlex.shlex(arguments, posix=True, punctuation_chars=True)
      command = []
      for token in lexer:
        if token in ('&&', ';'):
          commands.append(command)
          command = []
        else:
          command.append(token)
      commands.append(command)
  return [c for c in commands if c]


def _copies(stage):
  """{source path: destination} of the stage's COPY instructions from the build context."""
  copies = {}
  for keyword, arguments in stage:
    if keyword == 'COPY' and not arguments.startswith('--from'):
      *sources, destination = shlex.split(arguments)
      for source in sources:
        copies[source.rstrip('/')] = destination
  return copies


def _workdir(stage):
  (workdir,) = {arguments for keyword, arguments in stage if keyword == 'WORKDIR'}
  return workdir


def test_builds_from_the_tfx_1_16_image_with_a_matching_beam_boot():
  args, images, stage = _final_stage()
  assert images[-1] == BASE_IMAGE
  # The Beam SDK worker boot copied in comes from the apache-beam version the lock installs.
  (beam_image,) = images[:-1]
  assert beam_image == f'apache/beam_python3.10_sdk:{_locked("apache-beam")}', args
  assert ('COPY', '--from=beam /opt/apache/beam /opt/apache/beam') in stage
  assert not any(keyword in ('ENTRYPOINT', 'CMD') for keyword, _ in stage)  # Beam's boot stays


def test_installs_exactly_the_lock_file_the_makefile_installs():
  _, _, stage = _final_stage()
  lock = _makefile_lock()
  assert lock == 'requirements.lock'
  copies = _copies(stage)
  assert lock in copies
  installs = [c for c in _run_commands(stage) if 'install' in c or 'sync' in c]
  synced = [c for c in installs if c[:3] == ['uv', 'pip', 'sync']]
  assert len(synced) == 1 and synced[0][-1] == lock, synced
  for command in installs:
    if command in synced:
      continue
    if command[-2:] == ['-e', '.'] or command[-1] == '.':
      assert '--no-deps' in command, command  # the project itself, no resolution
    else:
      # Only the installer, pinned as the Makefile pins it.
      assert command[0].endswith('pip') and command[-1] == f'uv=={_makefile_uv()}', command
  assert _env(stage)['TF_USE_LEGACY_KERAS'] == '1'
  assert _env(stage)['PATH'].startswith('/opt/venv/bin:')  # the synced venv's python runs


def _local_modules():
  """Top-level modules of this repository that the DAG imports, pipeline.py included.

  Follows import statements from pipeline.py (and the module paths it names in strings, such as
  run_fn='trainers.trainer.run_fn') through every local file they reach. Static, so that modules
  other tests imported do not count.
  """
  def local_file(dotted):
    parts = dotted.split('.')
    for n in range(len(parts), 0, -1):
      base = os.path.join(REPO, *parts[:n])
      for candidate in (base + '.py', os.path.join(base, '__init__.py')):
        if os.path.isfile(candidate) and not candidate.startswith(
            os.path.join(REPO, 'tests')):
          return candidate
    return None

  seen, todo, names = set(), [os.path.join(REPO, 'pipeline.py')], set()
  while todo:
    path = todo.pop()
    if path in seen:
      continue
    seen.add(path)
    names.add(os.path.relpath(path, REPO).split(os.sep)[0].removesuffix('.py'))
    with open(path) as f:
      tree = ast.parse(f.read())
    dotted = []
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        dotted += [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        dotted += [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
      elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and
            re.fullmatch(r'\w+(\.\w+)+', node.value) and
            os.path.isdir(os.path.join(REPO, node.value.split('.')[0]))):
        dotted.append(node.value)
    todo += [f for f in map(local_file, dotted) if f]
  return names


def _setup_packages():
  with open(os.path.join(REPO, 'setup.py')) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == 'include':
      # Top-level packages: 'serving.*' is inside serving/.
      return {pattern.split('.')[0] for pattern in ast.literal_eval(node.value)}
  raise AssertionError('setup.py has no find_packages(include=...)')


def test_copies_setup_py_and_everything_the_pipeline_imports():
  _, _, stage = _final_stage()
  copies = _copies(stage)
  modules = _local_modules()
  assert {'pipeline', 'components', 'trainers'} <= modules, modules
  for name in modules | _setup_packages():
    source = f'{name}.py' if os.path.isfile(os.path.join(REPO, f'{name}.py')) else name
    assert source in copies, f'{source} is not copied into the image'
  assert 'setup.py' in copies
  # The compiled spec's --setup_file is where setup.py lands.
  workdir = _workdir(stage)
  assert workdir == beam_runners.CONTAINER_REPO
  destination = copies['setup.py']
  landed = os.path.join(workdir, destination, 'setup.py') if destination.endswith('/') else (
      os.path.join(workdir, destination))
  assert os.path.normpath(landed) == beam_runners.CONTAINER_SETUP_FILE


def test_dockerignore_keeps_local_state_out_and_the_copied_files_in():
  with open(os.path.join(REPO, '.dockerignore')) as f:
    patterns = [line.strip() for line in f if line.strip() and not line.startswith('#')]
  for local in ('.venv', 'output', '.git'):
    assert local in patterns, local
  _, _, stage = _final_stage()
  for source in _copies(stage):
    assert os.path.exists(os.path.join(REPO, source)), source
    assert not any(fnmatch.fnmatch(source, p) for p in patterns), source


def test_readme_builds_the_image_the_spec_refers_to(tmp_path):
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  assert f'docker build -t {beam_runners.PIPELINE_IMAGE} .' in readme
  output = tmp_path / 'pipeline.json'
  assert pipeline.main(['compile', '--output', str(output)]) == 0
  with open(output) as f:
    executors = json.load(f)['pipelineSpec']['deploymentSpec']['executors']
  for name, executor in executors.items():
    container = executor['container']
    assert container['image'] == beam_runners.PIPELINE_IMAGE, name
    if any(arg.startswith('--setup_file=') for arg in container['args']):
      assert f'--setup_file={beam_runners.CONTAINER_SETUP_FILE}' in container['args'], name
