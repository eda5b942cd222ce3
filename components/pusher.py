"""The Pusher's executor, with an atomic publication of each version directory.

TFX's stock Pusher copies the model file by file into `<base>/<version>` (saved_model.pb last),
and a model server polling that base path can see, and tensorflow_model_server can try to load,
a half-copied version (tensorflow/tfx#4466). This executor runs the stock one into a staging
directory beside the versions (`<base>/.staging-<uuid>`, a name no model server takes for a
version) and renames the finished copy to `<base>/<version>`: on one filesystem the version
appears whole or not at all. Everything else (blessing check, versioning, the PushedModel
artifact and its properties) is the stock executor's. docs/contracts.md §4 states the rule.
"""

import os
import uuid
from typing import Any, Dict, List

from absl import logging
from tfx import types
from tfx.components.pusher import executor as pusher_executor
from tfx.dsl.io import fileio
from tfx.proto import pusher_pb2
from tfx.types import artifact_utils
from tfx.types import standard_component_specs
from tfx.utils import proto_utils

STAGING_PREFIX = '.staging-'


def move_into_place(staged_version: str, final_version: str) -> bool:
  """Renames a complete version directory into place; False when that version already exists."""
  if fileio.exists(final_version):
    return False
  fileio.rename(staged_version, final_version)
  return True


class Executor(pusher_executor.Executor):
  """tfx.components.Pusher's executor, publishing through a staging directory and a rename."""

  def Do(self, input_dict: Dict[str, List[types.Artifact]],
         output_dict: Dict[str, List[types.Artifact]], exec_properties: Dict[str, Any]) -> None:
    destination = pusher_pb2.PushDestination()
    proto_utils.json_to_proto(exec_properties[standard_component_specs.PUSH_DESTINATION_KEY],
                              destination)
    if destination.WhichOneof('destination') != 'filesystem':
      super().Do(input_dict, output_dict, exec_properties)
      return
    base = destination.filesystem.base_directory
    staging = os.path.join(base, STAGING_PREFIX + uuid.uuid4().hex)
    destination.filesystem.base_directory = staging
    try:
      super().Do(input_dict, output_dict, {
          **exec_properties,
          standard_component_specs.PUSH_DESTINATION_KEY: proto_utils.proto_to_json(destination)})
      pushed = artifact_utils.get_single_instance(
          output_dict[standard_component_specs.PUSHED_MODEL_KEY])
      if not pushed.get_int_custom_property('pushed'):
        return
      version = pushed.get_string_custom_property('pushed_version')
      final = os.path.join(base, version)
      if move_into_place(os.path.join(staging, version), final):
        logging.info('Model published atomically to %s.', final)
      else:
        logging.info('Destination directory %s already exists, skipping current push.', final)
      pushed.set_string_custom_property('pushed_destination', final)
    finally:
      if fileio.exists(staging):
        fileio.rmtree(staging)
