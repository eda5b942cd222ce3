"""TF Serving config messages that the tensorflow-serving-api wheel does not ship.

tensorflow_model_server reads `--batching_parameters_file` as a `BatchingParameters` text proto
(tensorflow_serving/servables/tensorflow/session_bundle_config.proto) and
`--monitoring_config_file` as a `MonitoringConfig` (tensorflow_serving/config/
monitoring_config.proto). The tensorflow-serving-api wheel has neither module, so both messages
are rebuilt here, field for field (same package, names, numbers and types), in a private
descriptor pool: a file written for tensorflow_model_server parses unchanged, and one that parses
here parses there. Where the real generated modules are importable they are used instead.

BatchingParameters: fields 1-7 (max_batch_size, batch_timeout_micros, max_enqueued_batches,
num_batch_threads, thread_pool_name, allowed_batch_sizes, pad_variable_length_inputs). Newer
TF Serving releases add fields after 7 (large-batch splitting and others); a file using them does
not parse here.
"""

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import wrappers_pb2

_PACKAGE = 'tensorflow.serving'
_FIELD = descriptor_pb2.FieldDescriptorProto


def _message_class(pool: descriptor_pool.DescriptorPool, name: str):
  descriptor = pool.FindMessageTypeByName(f'{_PACKAGE}.{name}')
  if hasattr(message_factory, 'GetMessageClass'):  # protobuf >= 4.21
    return message_factory.GetMessageClass(descriptor)
  return message_factory.MessageFactory(pool).GetPrototype(descriptor)


def _build():
  """(BatchingParameters, PrometheusConfig, MonitoringConfig), rebuilt from the .proto files."""
  pool = descriptor_pool.DescriptorPool()
  pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)

  batching = descriptor_pb2.FileDescriptorProto(
      name='serving/session_bundle_config.proto', package=_PACKAGE, syntax='proto3',
      dependency=['google/protobuf/wrappers.proto'])
  message = batching.message_type.add(name='BatchingParameters')
  for number, name, wrapper in [(1, 'max_batch_size', 'Int64Value'),
                                (2, 'batch_timeout_micros', 'Int64Value'),
                                (3, 'max_enqueued_batches', 'Int64Value'),
                                (4, 'num_batch_threads', 'Int64Value'),
                                (5, 'thread_pool_name', 'StringValue')]:
    message.field.add(name=name, number=number, label=_FIELD.LABEL_OPTIONAL,
                      type=_FIELD.TYPE_MESSAGE, type_name=f'.google.protobuf.{wrapper}')
  message.field.add(name='allowed_batch_sizes', number=6, label=_FIELD.LABEL_REPEATED,
                    type=_FIELD.TYPE_INT64)
  message.field.add(name='pad_variable_length_inputs', number=7, label=_FIELD.LABEL_OPTIONAL,
                    type=_FIELD.TYPE_BOOL)
  pool.Add(batching)

  monitoring = descriptor_pb2.FileDescriptorProto(
      name='serving/monitoring_config.proto', package=_PACKAGE, syntax='proto3')
  prometheus = monitoring.message_type.add(name='PrometheusConfig')
  prometheus.field.add(name='enable', number=1, label=_FIELD.LABEL_OPTIONAL,
                       type=_FIELD.TYPE_BOOL)
  prometheus.field.add(name='path', number=2, label=_FIELD.LABEL_OPTIONAL,
                       type=_FIELD.TYPE_STRING)
  config = monitoring.message_type.add(name='MonitoringConfig')
  config.field.add(name='prometheus_config', number=1, label=_FIELD.LABEL_OPTIONAL,
                   type=_FIELD.TYPE_MESSAGE, type_name=f'.{_PACKAGE}.PrometheusConfig')
  pool.Add(monitoring)
  return tuple(_message_class(pool, name) for name in
               ('BatchingParameters', 'PrometheusConfig', 'MonitoringConfig'))


BatchingParameters, PrometheusConfig, MonitoringConfig = _build()

try:  # the real generated modules, where a TF Serving build provides them
  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.servables.tensorflow.session_bundle_config_pb2 import (
      BatchingParameters)
except ImportError:
  pass
try:
  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.config.monitoring_config_pb2 import MonitoringConfig, PrometheusConfig
except ImportError:
  pass
