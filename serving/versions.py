"""The versions of one served model: polled from its base path, loaded, warmed up, unloaded.

A version is a directory under the model's base path named by an int64; it is loaded once it
holds saved_model.pb and its files did not change between two polls (the TFX Pusher copies file
by file), warmed up with assets.extra/tf_serving_warmup_requests, and only then are requests
switched to it; the version it replaces is unloaded after. Which versions serve is the model's
version policy (the newest one by default). docs/serving.md describes the rollout.
"""

import logging
import os
import threading
import time
from typing import Dict, List, Optional, Tuple

from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.predict import Code
from serving.predict import MAX_VERSION
from serving.predict import Servable
from serving.predict import ServingError
from serving.predict import run_predict
from servable import warmup

log = logging.getLogger('model_server')

State = get_model_status_pb2.ModelVersionStatus.State


def _snapshot(path: str) -> Tuple:
  """(relative path, size, mtime) of every file under a version directory."""
  files = []
  for root, _, names in os.walk(path):
    for name in names:
      stat = os.stat(os.path.join(root, name))
      files.append((os.path.relpath(os.path.join(root, name), path), stat.st_size,
                    stat.st_mtime_ns))
  return tuple(sorted(files))


class Model:
  """The versions of one model: polled from its base path, loaded and unloaded per its policy."""

  def __init__(self, config: model_server_config_pb2.ModelConfig, batching_parameters=None,
               warmup: bool = True):
    self.name = config.name
    self._config = config
    self._batching_parameters = batching_parameters
    self._warmup = warmup
    # These two are replaced as a whole, never mutated, so requests read them without a lock.
    self._servables: Dict[int, Servable] = {}
    self._states: Dict[int, Tuple[int, int, str]] = {}  # version -> (State, error code, message)
    self._seen: Dict[int, Tuple] = {}  # version -> its snapshot at the previous poll
    self._failed: Dict[int, Tuple] = {}  # version -> the snapshot that failed to load
    self._kept: Optional[List[int]] = None  # versions serving with no directory left, warned
    self._lock = threading.Lock()

  def poll(self, initial: bool = False):
    """Loads the aspired versions that are ready, then unloads the versions no longer aspired.

    Args:
      initial: versions already on disk at start-up are loaded without waiting a second poll.
    """
    with self._lock:
      ready = self._ready_versions(initial)
      aspired = self._aspired(sorted(ready))
      current = self._servables
      serving = {v: s for v, s in current.items() if v in aspired}
      for version in sorted(aspired - set(current)):
        servable = self._load(version, ready[version])
        if servable:
          serving[version] = servable
      if not serving:
        # Availability-preserving: the loaded versions stay until a successor is loaded and
        # warmed up. A successor still being written, one that failed to load, or a base path
        # left empty for a moment (the old version moved away first) leaves them serving, as
        # tensorflow_model_server with servable_versions_always_present.
        if current and not aspired and self._kept != sorted(current):
          self._kept = sorted(current)
          log.warning('no loadable version of model %s under %s: version(s) %s keep serving',
                      self.name, self._config.base_path, sorted(current))
        return
      self._servables, self._kept = serving, None
      for version in serving:
        self._set_state(version, State.AVAILABLE)
      for version in sorted(set(current) - set(serving)):
        self._unload(version, current[version])

  def _ready_versions(self, initial: bool) -> Dict[int, str]:
    """version -> path, of the versions loaded or ready to load.

    A version is a directory named by an int64; it is ready when it holds saved_model.pb and
    its files did not change since the previous poll (or at start-up).
    """
    base = self._config.base_path
    names = os.listdir(base) if os.path.isdir(base) else []
    if not names and initial:
      log.warning('no versions of model %s under %s (yet)', self.name, base)
    ready, seen = {}, {}
    for name in names:
      path = os.path.join(base, name)
      if not (name.isascii() and name.isdigit()) or int(name) > MAX_VERSION:
        continue  # TF Serving ignores directories that are not int64 version numbers
      version = int(name)
      if not os.path.isfile(os.path.join(path, 'saved_model.pb')):
        continue
      if version in self._servables:
        ready[version] = path
        continue
      seen[version] = _snapshot(path)
      stable = initial or self._seen.get(version) == seen[version]
      if stable and self._failed.get(version) != seen[version]:
        ready[version] = path
    self._seen = seen
    return ready

  def _aspired(self, versions: List[int]) -> set:
    policy = self._config.model_version_policy
    choice = policy.WhichOneof('policy_choice')
    if choice == 'all':
      return set(versions)
    if choice == 'specific':
      return set(versions) & set(policy.specific.versions)
    num_versions = policy.latest.num_versions if choice == 'latest' else 0
    return set(versions[-(num_versions or 1):])

  def _load(self, version: int, path: str) -> Optional[Servable]:
    self._set_state(version, State.LOADING)
    start = time.monotonic()
    servable = None
    try:
      servable = Servable(self.name, version, path, self._batching_parameters)
      warmed = self._run_warmup(servable) if self._warmup else 0
    except Exception as e:  # pylint: disable=broad-except
      # Any failure of a model's own code must not stop the server; it keeps the old version.
      if servable:
        servable.close()
      self._failed[version] = self._seen.get(version) or _snapshot(path)
      self._set_state(version, State.END, str(e))
      log.error('Failed to load servable version {name: %s version: %d} from %s: %s',
                self.name, version, path, e)
      return None
    log.info('Loaded servable version {name: %s version: %d} from %s in %.2f s '
             '(%d warm-up requests)', self.name, version, path, time.monotonic() - start, warmed)
    return servable

  @staticmethod
  def _run_warmup(servable: Servable) -> int:
    """Replays the Predict requests of assets.extra/tf_serving_warmup_requests, as TF Serving."""
    count = 0
    for prediction_log in warmup.read_warmup_logs(servable.path) or []:  # at most 1000
      if prediction_log.HasField('predict_log'):
        run_predict(servable, prediction_log.predict_log.request)
        count += 1
    return count

  def servable(self, spec) -> Servable:
    """The servable a ModelSpec asks for: its version, its version label or the newest one.

    Raises:
      ServingError: NOT_FOUND when that version is not loaded.
    """
    servables = self._servables
    if spec.HasField('version'):
      version, wanted = spec.version.value, f'Specific({self.name}, {spec.version.value})'
    elif spec.version_label:
      version = self._config.version_labels.get(spec.version_label)
      wanted = f'Specific({self.name}, label {spec.version_label})'
    else:
      version, wanted = max(servables, default=None), f'Latest({self.name})'
    if version not in servables:
      raise ServingError(Code.NOT_FOUND, f'Servable not found for request: {wanted}')
    return servables[version]

  def status(self, spec) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus for every version this server has seen, or for the one asked for."""
    states = self._states
    versions = sorted(states, reverse=True)
    if spec.HasField('version') or spec.version_label:
      version = (spec.version.value if spec.HasField('version')
                 else self._config.version_labels.get(spec.version_label))
      if version not in states:
        raise ServingError(Code.NOT_FOUND, f'Could not find version '
                           f'{spec.version_label or version} of model {self.name}')
      versions = [version]
    if not versions:
      raise ServingError(Code.NOT_FOUND, f'Could not find any versions of model {self.name}')
    response = get_model_status_pb2.GetModelStatusResponse()
    for version in versions:
      state, error_code, message = states[version]
      status = response.model_version_status.add(version=version, state=state)
      status.status.error_code = error_code
      status.status.error_message = message
    return response

  def _set_state(self, version: int, state: int, error: str = ''):
    self._states = {**self._states, version: (state, Code.UNKNOWN.value[0] if error else 0, error)}

  def _unload(self, version: int, servable: Servable):
    servable.close()
    self._set_state(version, State.END)
    log.info('Unloaded servable version {name: %s version: %d}', self.name, version)

  def close(self):
    servables, self._servables = self._servables, {}
    for version in sorted(servables):
      self._unload(version, servables[version])
