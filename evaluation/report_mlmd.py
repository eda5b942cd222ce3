"""The pipeline root's ML Metadata, as the run report reads it (docs/reviewing_runs.md).

Opens `metadata.db` through run_summary.RunReader and reads plain values off its executions
and artifacts; the Evaluator's output (report_tfma) and the run history (report_history) build
on it. Input the report cannot use is a ReportError: one line, no traceback.
"""

import os
from typing import Any, Optional

from ml_metadata import errors as mlmd_errors
from ml_metadata.proto import metadata_store_pb2

from evaluation import run_summary

SUCCEEDED = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)


class ReportError(Exception):
  """Input that cannot be reported on (not a pipeline root, no Evaluator output)."""


def open_reader(pipeline_root: str, pipeline_name: str) -> run_summary.RunReader:
  """A RunReader on `pipeline_root/metadata.db` that has at least one run of the pipeline.

  Raises:
    ReportError: `pipeline_root` is not a pipeline root of `pipeline_name`.
  """
  if not os.path.isdir(pipeline_root):
    raise ReportError(f'{pipeline_root}: no such directory')
  metadata_path = os.path.join(pipeline_root, 'metadata.db')
  if not os.path.isfile(metadata_path):
    raise ReportError(f'{pipeline_root} is not a pipeline root: it has no metadata.db')
  try:
    reader = run_summary.RunReader(metadata_path, pipeline_name)
    runs = reader.pipeline_runs()
  except (RuntimeError, mlmd_errors.StatusError) as error:
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise ReportError(f'{metadata_path} is not an ML Metadata store: '
                      f'{first_line.split(" query:")[0]}') from None
  if not runs:
    raise ReportError(f'{metadata_path} records no run of pipeline {pipeline_name!r}')
  return reader


def execution_state(execution: Optional[metadata_store_pb2.Execution]) -> str:
  """'complete', 'cached', 'failed', ... of an execution; 'not run' for None."""
  if execution is None:
    return 'not run'
  return metadata_store_pb2.Execution.State.Name(execution.last_known_state).lower()


def custom_property(message, key: str) -> Any:
  """A custom property of an MLMD execution or artifact as a plain value (None if absent)."""
  if key not in message.custom_properties:
    return None
  value = message.custom_properties[key]
  kind = value.WhichOneof('value')
  return getattr(value, kind) if kind else None


def latest_evaluator_execution(reader: run_summary.RunReader, evaluator: str):
  """(run, execution) of the newest Evaluator execution that finished (ran or was cached)."""
  for run in reversed(reader.pipeline_runs()):
    execution = run.executions.get(evaluator)
    if execution is not None and execution.last_known_state in SUCCEEDED:
      return run, execution
  return None, None
