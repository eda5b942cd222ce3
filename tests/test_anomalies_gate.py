"""AnomaliesGate: anomalies stop the run with a readable message; clean data passes."""

import os

import pytest
from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx.types import standard_artifacts

from components import anomalies_gate
from contract.data import DataError


def _artifacts(tmp_path, anomalies_by_split):
  anomalies = standard_artifacts.ExampleAnomalies()
  anomalies.uri = str(tmp_path / 'anomalies')
  anomalies.split_names = '["train", "test"]'
  for split, proto in anomalies_by_split.items():
    os.makedirs(os.path.join(anomalies.uri, f'Split-{split}'))
    with open(os.path.join(anomalies.uri, f'Split-{split}', 'SchemaDiff.pb'), 'wb') as f:
      f.write(proto.SerializeToString())
  schema = standard_artifacts.Schema()
  schema.uri = str(tmp_path / 'schema')
  os.makedirs(schema.uri)
  with open(os.path.join(schema.uri, 'schema.pbtxt'), 'w') as f:
    f.write('feature { name: "user_id" type: BYTES }\n')
  validated = standard_artifacts.Schema()
  validated.uri = str(tmp_path / 'validated')
  os.makedirs(validated.uri)
  return {'anomalies': [anomalies], 'schema': [schema]}, {'validated_schema': [validated]}


def _run(inputs, outputs):
  executor = anomalies_gate.AnomaliesGate.EXECUTOR_SPEC.executor_class()
  executor.Do(inputs, outputs, {})


def test_anomalies_stop_the_run(tmp_path):
  proto = anomalies_pb2.Anomalies()
  proto.anomaly_info['query'].short_description = 'Unexpected string values'
  inputs, outputs = _artifacts(tmp_path, {'train': anomalies_pb2.Anomalies(), 'test': proto})
  with pytest.raises(DataError, match="test: feature 'query': Unexpected string values"):
    _run(inputs, outputs)


def test_clean_data_passes_the_schema_on(tmp_path):
  inputs, outputs = _artifacts(tmp_path, {'train': anomalies_pb2.Anomalies(),
                                          'test': anomalies_pb2.Anomalies()})
  _run(inputs, outputs)
  with open(os.path.join(outputs['validated_schema'][0].uri, 'schema.pbtxt')) as f:
    assert 'user_id' in f.read()
