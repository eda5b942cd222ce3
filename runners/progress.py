"""Per-component progress of a local run: status lines on stdout and timings, from the
LocalDagRunner's own log lines, while the full logs go to a file."""

import logging
import time
from typing import Dict, List, Optional


class ProgressHandler(logging.Handler):
  """Turns the LocalDagRunner's per-component log lines into progress lines and timings."""

  def __init__(self):
    super().__init__(logging.INFO)
    self.timings: Dict[str, float] = {}
    self.cached: set = set()
    self.skipped: set = set()
    self._started: Dict[str, float] = {}
    self._current: Optional[str] = None

  def emit(self, record):
    message = record.msg
    if message == 'Component %s is running.':
      self._current = record.args[0]
      self._started[self._current] = time.time()
      self._print(f'[{self._current}] running ...')
    elif message == 'A cached execution %d is used.' and self._current:
      self.cached.add(self._current)
    elif message == 'Skipping execution for %s':
      # Inputs did not resolve: a tfx.dsl.Cond (the blessing) was not met.
      self.skipped.add(record.args[0])
    elif message == 'Component %s is finished.':
      node = record.args[0]
      self.timings[node] = round(time.time() - self._started.get(node, time.time()), 2)
      status = ('cached' if node in self.cached else
                'skipped (condition not met)' if node in self.skipped else 'done')
      self._print(f'[{node}] {status} in {self.timings[node]:.1f} s')
    elif message == 'Skipping component %s.':
      self._print(f'[{record.args[0]}] skipped')

  def _print(self, text):
    print(text, flush=True)


def capture_progress(log_path: str) -> List[logging.Handler]:
  """Routes absl/TFX logs to a file and per-component progress to stdout.

  Returns:
    [progress handler, file handler], to be removed from the root logger after the run.
  """
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().setLevel(logging.WARNING)
  root = logging.getLogger()
  for handler in root.handlers:
    handler.setLevel(logging.WARNING)
  file_handler = logging.FileHandler(log_path)
  file_handler.setLevel(logging.INFO)
  file_handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
  progress = ProgressHandler()
  for handler in (progress, file_handler):
    root.addHandler(handler)
  root.setLevel(logging.INFO)
  return [progress, file_handler]
