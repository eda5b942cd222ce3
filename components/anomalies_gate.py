"""AnomaliesGate: stops the run when ExampleValidator found anomalies.

TFX's ExampleValidator only records anomalies. This component reads them and fails with a
readable message; otherwise it passes the schema on, so that Transform (which consumes the
gated schema) can only run on validated data, on every orchestrator.
"""

import os

import tensorflow as tf
from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx import v1 as tfx
from tfx.types import artifact_utils
from tfx.utils import io_utils

from contract.data import DataError

_ANOMALIES_FILE = 'SchemaDiff.pb'
_SCHEMA_FILE = 'schema.pbtxt'


def describe_anomalies(anomalies_uri: str, split_names) -> list:
  """Returns one 'split: feature: description' line per anomaly found."""
  lines = []
  for split in split_names:
    path = os.path.join(anomalies_uri, f'Split-{split}', _ANOMALIES_FILE)
    if not tf.io.gfile.exists(path):
      continue
    anomalies = anomalies_pb2.Anomalies()
    anomalies.ParseFromString(io_utils.read_bytes_file(path))
    for feature, info in sorted(anomalies.anomaly_info.items()):
      lines.append(f'{split}: feature {feature!r}: {info.short_description or info.description}')
    if anomalies.HasField('dataset_anomaly_info'):
      info = anomalies.dataset_anomaly_info
      lines.append(f'{split}: dataset: {info.short_description or info.description}')
  return lines


@tfx.dsl.components.component
def AnomaliesGate(  # pylint: disable=invalid-name
    anomalies: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ExampleAnomalies],
    schema: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Schema],
    validated_schema: tfx.dsl.components.OutputArtifact[tfx.types.standard_artifacts.Schema]):
  """Raises DataError listing the anomalies, or copies the schema to `validated_schema`."""
  found = describe_anomalies(anomalies.uri,
                             artifact_utils.decode_split_names(anomalies.split_names))
  if found:
    raise DataError('data validation found anomalies: ' + '; '.join(found))
  source = io_utils.get_only_uri_in_dir(schema.uri)
  io_utils.copy_file(source, os.path.join(validated_schema.uri, _SCHEMA_FILE), overwrite=True)
