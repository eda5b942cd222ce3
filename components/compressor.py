"""Compressor: prunes, distills and int8-quantizes the Trainer's model into a smaller SavedModel.

A custom TFX component (ComponentSpec + Executor, as tfx/examples/custom_components). The
executor resolves the artifacts, runs compression.compress.compress (the ladder of candidates,
kept on validation Recall@10 retention; its module docstring says how) and writes the report
artifact: report.json (the keys compression.compress documents; evaluation.run_summary reads
them) and report.md. The compressed SavedModel goes where the Trainer puts its own
(`<model uri>/Format-Serving`), so that the Evaluator and the Pusher take either the same way.
"""

import json
import os
from typing import Any, Dict, List, Optional

# Keras 2 (tf_keras) before TensorFlow loads: TFRS and tfmot need it (docs/contracts.md §5).
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# pylint: disable=g-import-not-at-top
import tensorflow as tf
import tensorflow_transform as tft
from tfx import types
from tfx.components.trainer import fn_args_utils
from tfx.components.util import tfxio_utils
from tfx.dsl.components.base import base_component
from tfx.dsl.components.base import base_executor
from tfx.dsl.components.base import executor_spec
from tfx.types import artifact_utils
from tfx.types import component_spec
from tfx.types import standard_artifacts
from tfx.utils import io_utils
from tfx.utils import path_utils

from compression import benchmark
from compression import compress as compress_lib
from compression import markdown
from evaluation import artifacts
from trainers import features


class CompressionReport(types.Artifact):
  """The Compressor's report: report.json and report.md."""
  # '<namespace>.<Name>': the form Kubeflow Pipelines v2 requires of custom artifact types.
  TYPE_NAME = 'recommender.CompressionReport'



class CompressorSpec(types.ComponentSpec):
  """Spec of Compressor."""
  PARAMETERS = {name: component_spec.ExecutionParameter(type=kind)
                for name, (kind, _) in compress_lib.PARAMETERS.items()}
  # The input is `trained_model` because `model` is the output's key (the Trainer's, so that
  # the Evaluator and the Pusher take either the same way); one spec cannot use a key twice.
  INPUTS = {
      'trained_model': component_spec.ChannelParameter(type=standard_artifacts.Model),
      'transform_graph': component_spec.ChannelParameter(
          type=standard_artifacts.TransformGraph),
      'examples': component_spec.ChannelParameter(type=standard_artifacts.Examples),
      'raw_examples': component_spec.ChannelParameter(type=standard_artifacts.Examples,
                                                      optional=True),
  }
  OUTPUTS = {
      'model': component_spec.ChannelParameter(type=standard_artifacts.Model),
      'report': component_spec.ChannelParameter(type=CompressionReport),
  }



def _fn_args(examples: List[types.Artifact]) -> fn_args_utils.FnArgs:
  """What trainers.model's dataset helpers take from the Trainer's FnArgs."""
  return fn_args_utils.FnArgs(
      train_files=[io_utils.all_files_pattern(uri) for uri in
                   artifact_utils.get_split_uris(examples, features.TRAIN_SPLIT)],
      data_accessor=fn_args_utils.DataAccessor(
          tf_dataset_factory=tfxio_utils.get_tf_dataset_factory_from_artifact(examples, []),
          record_batch_factory=None, data_view_decode_fn=None))



def _has_split(examples: List[types.Artifact], split: str) -> bool:
  return split in artifact_utils.decode_split_names(examples[0].split_names)



class Executor(base_executor.BaseExecutor):
  """Compresses the Trainer's model and reports on both."""

  def Do(self, input_dict: Dict[str, List[types.Artifact]],
         output_dict: Dict[str, List[types.Artifact]],
         exec_properties: Dict[str, Any]) -> None:
    params = compress_lib.parameters(exec_properties)
    examples = input_dict['examples']
    raw = (artifact_utils.get_single_instance(input_dict['raw_examples'])
           if input_dict.get('raw_examples') else None)
    splits = {}
    if raw is not None:
      splits = {name: benchmark.raw_examples(raw, name, params['eval_limit'])
                for name in (features.EVAL_SPLIT, features.SEARCH_SPLIT)
                if name in artifact_utils.decode_split_names(raw.split_names)}
    source = compress_lib.Source(
        trained_model_uri=artifact_utils.get_single_uri(input_dict['trained_model']),
        tf_transform_output=tft.TFTransformOutput(
            artifact_utils.get_single_uri(input_dict['transform_graph'])),
        fn_args=_fn_args(examples),
        has_search_split=_has_split(examples, features.SEARCH_SPLIT),
        splits=splits)
    output_model = artifact_utils.get_single_instance(output_dict['model'])
    result = compress_lib.compress(source, params,
                                   path_utils.serving_model_path(output_model.uri))
    write_report(result.report, artifact_utils.get_single_uri(output_dict['report']))
    for key in ('size_ratio', 'speedup_batch1', 'speedup_search_batch1', 'recall_retention'):
      if result.report.get(key) is not None:
        output_model.set_float_custom_property(key, result.report[key])


def write_report(report: dict, report_dir: str) -> None:
  tf.io.gfile.makedirs(report_dir)
  with tf.io.gfile.GFile(os.path.join(report_dir, artifacts.COMPRESSION_REPORT_JSON), 'w') as f:
    json.dump(report, f, indent=2, sort_keys=True)
  with tf.io.gfile.GFile(os.path.join(report_dir, artifacts.COMPRESSION_REPORT_MD), 'w') as f:
    f.write(markdown.report_markdown(report))



class Compressor(base_component.BaseComponent):
  """Prunes, distills and quantizes the Trainer's model; reports size, speed and quality."""

  SPEC_CLASS = CompressorSpec
  EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)

  def __init__(self, trained_model: types.BaseChannel, transform_graph: types.BaseChannel,
               examples: types.BaseChannel, raw_examples: Optional[types.BaseChannel] = None,
               **params):
    """Creates the component.

    Args:
      trained_model: the Trainer's Model (`model` names the output, as the Trainer's).
      transform_graph: the Transform's transform_graph.
      examples: the Transform's transformed_examples (fine-tuning, distillation texts).
      raw_examples: ExampleGen's examples (quality and latency requests); optional.
      **params: any of compression.compress.PARAMETERS (booleans may be given as bool).
    """
    unknown = set(params) - set(compress_lib.PARAMETERS)
    if unknown:
      raise ValueError(f'unknown Compressor parameters {sorted(unknown)}; expected some of '
                       f'{sorted(compress_lib.PARAMETERS)}')
    values = {name: kind(params.get(name, default))
              for name, (kind, default) in compress_lib.PARAMETERS.items()}
    super().__init__(spec=CompressorSpec(
        trained_model=trained_model, transform_graph=transform_graph, examples=examples,
        raw_examples=raw_examples, model=types.Channel(type=standard_artifacts.Model),
        report=types.Channel(type=CompressionReport), **values))
