"""Beam presets for the Beam-powered components, chosen by one flag (`--beam-runner`).

  in-memory         DirectRunner in this process (default; what the tests and `make run` use)
  multi-processing  DirectRunner with N worker processes on this machine (or in one pod)
  dataflow          Google Cloud Dataflow; needs project, region and temp_location
  flink             Flink: an uber jar submitted to `flink_master`, or PortableRunner against a
                    Beam job server at `job_endpoint`; SDK workers run the pipeline image
  spark             Spark: an uber jar submitted to `spark_rest_url`, or PortableRunner against a
                    Beam job server at `job_endpoint`; SDK workers run the pipeline image

`--beam-arg KEY=VALUE` (repeatable) adds Beam options or replaces a preset's value, e.g.
`--beam-arg project=my-project --beam-arg region=europe-west4`.

Distributed presets pass `--setup_file`: Beam builds this project from it and installs it on
the workers (the executors' DoFns live in components/ and trainers/). The local presets pass
`--sdk_container_image` instead, which their in-process or subprocess workers do not use: TFX,
when it sees none of setup_file / extra_packages / sdk_container_image, builds an sdist of TFX
itself before every Beam component (tfx.utils.dependency_utils), and Beam builds one of the
project from a setup_file before every Beam pipeline, even on the DirectRunner.
"""

import argparse
import os
from typing import Dict, Iterable, List, Optional, Sequence

PRESETS = ('in-memory', 'multi-processing', 'dataflow', 'flink', 'spark')
DEFAULT_PRESET = 'in-memory'
LOCAL_PRESETS = ('in-memory', 'multi-processing')

# The pipeline image (Dockerfile): the default of `pipeline.py compile --image`, the tag the
# README builds, and the SDK worker image of the dataflow / flink / spark presets.
PIPELINE_IMAGE = 'recommender-pipeline:latest'
# Where the Dockerfile puts the project (its WORKDIR); the compiled spec's --setup_file.
CONTAINER_REPO = '/pipeline'
CONTAINER_SETUP_FILE = f'{CONTAINER_REPO}/setup.py'

# Options a preset cannot run without, with the form the error message suggests.
_REQUIRED = {
    'dataflow': ('project', 'region', 'temp_location'),
    'flink': ('flink_master',),
    'spark': ('spark_rest_url',),
}
_EXAMPLES = {
    'project': 'my-project', 'region': 'us-central1', 'temp_location': 'gs://BUCKET/tmp',
    'flink_master': 'flink-jobmanager:8081', 'spark_rest_url': 'http://spark-master:6066',
}


class PresetError(ValueError):
  """A preset is missing options it needs, or an option is malformed (one-line message)."""


def usable_cpus() -> int:
  """CPUs this process may run on (affinity-aware, unlike multiprocessing.cpu_count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def _parse_extra(extra: Iterable[str]) -> Dict[str, Optional[str]]:
  """'KEY=VALUE', '--KEY=VALUE' or a bare '--flag' -> {KEY: VALUE or None}, in order."""
  options = {}
  for arg in extra:
    text = arg.strip()
    key, sep, value = text.lstrip('-').partition('=')
    key = key.strip()
    if not key or ' ' in key:
      raise PresetError(f'--beam-arg {arg!r}: expected KEY=VALUE (e.g. project=my-project)')
    options[key] = value if sep else None
  return options


def _preset_options(preset: str, workers: Optional[int], image: str,
                    extra: Dict[str, Optional[str]]) -> Dict[str, Optional[str]]:
  """The preset's own options (before --beam-arg and --setup_file are applied)."""
  if preset == 'in-memory':
    return {'direct_running_mode': 'in_memory', 'direct_num_workers': '1'}
  if preset == 'multi-processing':
    # Beam's FnApiRunner starts this many `sdk_worker_main` subprocesses per Beam pipeline.
    return {'direct_running_mode': 'multi_processing',
            'direct_num_workers': str(workers or usable_cpus())}
  if preset == 'dataflow':
    # The pipeline image has the locked dependencies and Beam's boot entrypoint, so Dataflow
    # workers start from it instead of pip-installing TFX on every worker.
    return {'runner': 'DataflowRunner', 'sdk_container_image': image,
            'sdk_location': 'container'}
  if preset in ('flink', 'spark'):
    # SDK workers run in the pipeline image next to the Flink / Spark workers (DOCKER); on
    # Kubernetes a worker-pool sidecar is the usual alternative:
    # --beam-arg environment_type=EXTERNAL --beam-arg environment_config=localhost:50000.
    environment = {'environment_type': 'DOCKER', 'environment_config': image}
    if 'job_endpoint' in extra:
      return {'runner': 'PortableRunner', **environment}
    if preset == 'flink':
      return {'runner': 'FlinkRunner', 'flink_submit_uber_jar': None, **environment}
    return {'runner': 'SparkRunner', 'spark_submit_uber_jar': None, **environment}
  raise PresetError(f'unknown --beam-runner {preset!r} (choose from {", ".join(PRESETS)})')


def beam_pipeline_args(preset: str = DEFAULT_PRESET,
                       extra: Sequence[str] = (),
                       setup_file: Optional[str] = None,
                       workers: Optional[int] = None,
                       image: str = PIPELINE_IMAGE) -> List[str]:
  """The `beam_pipeline_args` of a preset.

  Args:
    preset: One of PRESETS.
    extra: 'KEY=VALUE' strings (a leading '--' is optional; a bare KEY is a boolean flag);
      they add options or replace the preset's.
    setup_file: This project's setup.py where the Beam components run (the repository's
      locally, CONTAINER_SETUP_FILE in the pipeline image). None leaves it out.
    workers: Worker processes of the multi-processing preset (default: usable CPUs).
    image: SDK worker image of the dataflow / flink / spark presets.

  Returns:
    Beam command-line options, e.g. ['--direct_running_mode=in_memory', ...].

  Raises:
    PresetError: an unknown preset, a malformed --beam-arg, or a missing required option.
  """
  if workers is not None and workers < 1:
    raise PresetError(f'--beam-workers must be at least 1, got {workers}')
  overrides = _parse_extra(extra)
  options = _preset_options(preset, workers, image, overrides)
  options.update(overrides)
  if preset in LOCAL_PRESETS:
    # Workers are this process or its subprocesses, with this venv: nothing to ship. Beam would
    # still build an sdist of the project from --setup_file before every Beam pipeline; the
    # (unused) container image is what stops TFX from building an sdist of TFX instead.
    options.setdefault('sdk_container_image', image)
  elif setup_file and 'setup_file' not in options:
    options['setup_file'] = setup_file
  if 'job_endpoint' not in options:
    missing = [key for key in _REQUIRED.get(preset, ()) if not options.get(key)]
    if missing:
      hint = ' '.join(f'--beam-arg {key}={_EXAMPLES[key]}' for key in missing)
      alternative = ' (or job_endpoint=HOST:8099 for a Beam job server)' if (
          preset in ('flink', 'spark')) else ''
      raise PresetError(f'--beam-runner {preset} needs {", ".join(missing)}: pass {hint}'
                        f'{alternative}')
  return [f'--{key}' if value is None else f'--{key}={value}' for key, value in options.items()]


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds --beam-runner, --beam-workers and --beam-arg to a subcommand's parser."""
  parser.add_argument('--beam-runner', default=DEFAULT_PRESET, choices=PRESETS,
                      help='Beam preset for the Beam-powered components (default: in-memory)')
  parser.add_argument('--beam-workers', type=int, default=None,
                      help='worker processes of --beam-runner multi-processing '
                           '(default: the CPUs of the machine that computes the preset)')
  parser.add_argument('--beam-arg', action='append', default=[], metavar='KEY=VALUE',
                      help='extra Beam option, repeatable (e.g. project=P, region=R, '
                           'temp_location=gs://B/tmp, flink_master=HOST:8081, '
                           'job_endpoint=HOST:8099); replaces a preset value of the same key')


def from_flags(args: argparse.Namespace, setup_file: str, image: str = PIPELINE_IMAGE
               ) -> List[str]:
  """beam_pipeline_args() for the flags add_flags() defined."""
  return beam_pipeline_args(args.beam_runner, args.beam_arg, setup_file=setup_file,
                            workers=args.beam_workers, image=image)
