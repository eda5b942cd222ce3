"""The Evaluator's output, loaded with TFMA's loaders (docs/reviewing_runs.md).

`tfma.load_eval_result` and `tfma.load_validation_result` on a ModelEvaluation directory, found
through MLMD (report_mlmd) or given directly; the Evaluation it gives is what report_tables
turns into tables. Also the metric and slice names the report shows, and TFMA's own widgets.
"""

import dataclasses
import os
from typing import Any, Dict, List, Optional

import tensorflow_model_analysis as tfma
from tensorflow_model_analysis.proto import config_pb2
from tensorflow_model_analysis.writers import eval_config_writer

from evaluation import run_summary
from evaluation.report_mlmd import ReportError, custom_property, execution_state
from evaluation.report_mlmd import latest_evaluator_execution
from trainers import metrics as metrics_lib

OVERALL = 'Overall'
REPORTED = [metrics_lib.metric_name(kind, k) for kind, k in metrics_lib.REPORTED]
EXAMPLE_COUNT = 'example_count'
HEADLINE = REPORTED[0]  # recall@10: the metric the blessing floor is on
UNNAMED_MODEL = 'candidate'  # label of the single, unnamed model of a one-model EvalConfig


@dataclasses.dataclass
class Evaluation:
  """One Evaluator output, loaded with TFMA.

  Attributes:
    uri: The ModelEvaluation artifact's directory.
    config: The EvalConfig the Evaluator ran with.
    results: Model name -> tfma.EvalResult ('' for the single model of a one-model config).
    validation: TFMA's ValidationResult (None when the config has no thresholds).
    candidate: Name of the model under evaluation.
    baseline: Name of the baseline model, None when there is none.
    model_locations: Model name -> the SavedModel that was evaluated.
    blessed: The blessing artifact's verdict (None when read without MLMD).
    execution_id: MLMD id of the Evaluator execution (None when read without MLMD).
    run_id: The pipeline run the execution belongs to.
    state: 'complete' or 'cached'.
  """
  uri: str
  config: config_pb2.EvalConfig
  results: Dict[str, Any]
  validation: Optional[Any]
  candidate: str
  baseline: Optional[str]
  model_locations: Dict[str, str]
  blessed: Optional[bool] = None
  execution_id: Optional[int] = None
  run_id: Optional[str] = None
  state: Optional[str] = None

  @property
  def models(self) -> List[str]:
    """Candidate first, then the baseline, then any other models."""
    names = [self.candidate] + ([self.baseline] if self.baseline is not None else [])
    return names + [name for name in self.results if name not in names]

  def label(self, model: str) -> str:
    return model or UNNAMED_MODEL

  @property
  def verdict(self) -> Optional[bool]:
    """The blessing when known, else TFMA's validation_ok."""
    if self.blessed is not None:
      return self.blessed
    return self.validation.validation_ok if self.validation is not None else None


def load_evaluation_dir(uri: str) -> Evaluation:
  """Loads an Evaluator output directory with tfma.load_eval_result and load_validation_result.

  Raises:
    ReportError: `uri` holds no TFMA output.
  """
  if not os.path.isfile(os.path.join(uri, 'eval_config.json')):
    raise ReportError(f'{uri} holds no TFMA output (no eval_config.json)')
  config, _, _, model_locations = eval_config_writer.load_eval_run(uri)
  specs = list(config.model_specs) or [config_pb2.ModelSpec()]
  candidate, baseline = run_summary.model_roles(config)
  names = [spec.name for spec in specs]
  if len(names) == 1:
    results = {names[0]: tfma.load_eval_result(uri)}
  else:
    results = {name: tfma.load_eval_result(uri, model_name=name) for name in names}
  has_validation = any(name.startswith('validations') for name in os.listdir(uri))
  validation = tfma.load_validation_result(uri) if has_validation else None
  return Evaluation(uri=uri, config=config, results=results, validation=validation,
                    candidate=candidate, baseline=baseline,
                    model_locations=dict(model_locations or {}))


def load_evaluation(reader: run_summary.RunReader, node_ids: Dict[str, str],
                    execution_id: Optional[int] = None,
                    role: str = 'evaluator') -> Evaluation:
  """The Evaluator output of the latest finished Evaluator execution (or of `execution_id`).

  Args:
    reader: RunReader on the pipeline root.
    node_ids: Role -> component id (configs.NODE_IDS).
    execution_id: An MLMD execution id of the Evaluator; None for the latest finished one.
    role: Which Evaluator of node_ids ('evaluator', or another role such as a search
      Evaluator's).

  Raises:
    ReportError: there is no such execution or output.
  """
  evaluator = node_ids[role]
  if execution_id is None:
    run, execution = latest_evaluator_execution(reader, evaluator)
    run_id = run.run_id if run else None
  else:
    execution = reader.execution(execution_id)
    run_id = next((run.run_id for run in reader.pipeline_runs()
                   if any(e.id == execution_id for e in run.executions.values())), None)
  if execution is None:
    raise ReportError(f'no finished {evaluator} execution'
                      + (f' with id {execution_id}' if execution_id is not None else '')
                      + ' in the pipeline root')
  artifacts = reader.execution_artifacts(execution.id, 'evaluation')
  if not artifacts:
    raise ReportError(f'{evaluator} execution {execution.id} has no evaluation output')
  evaluation = load_evaluation_dir(artifacts[-1].uri)
  blessing = reader.execution_artifacts(execution.id, 'blessing')
  if blessing and custom_property(blessing[-1], 'blessed') is not None:
    evaluation.blessed = custom_property(blessing[-1], 'blessed') == 1
  evaluation.execution_id = execution.id
  evaluation.run_id = run_id
  evaluation.state = execution_state(execution)
  return evaluation


def slicing_columns(evaluation: Evaluation) -> List[str]:
  """The feature keys of the EvalConfig's single-feature slicing specs."""
  columns = []
  for spec in evaluation.config.slicing_specs:
    for key in spec.feature_keys:
      if key not in columns:
        columns.append(key)
  return columns


def frontend_has_widgets() -> bool:
  """Whether TFMA's Jupyter widgets can be shown: a Jupyter kernel with the widget classes.

  A kernel cannot see whether a browser is attached, so the environment variable TFMA_WIDGETS
  decides where set ('0' for headless runs and static exports, '1' to force them); otherwise
  widgets are used in any Jupyter (ZMQ) kernel and never in plain Python or terminal IPython.
  """
  setting = os.environ.get('TFMA_WIDGETS', 'auto').strip().lower()
  if setting in ('0', 'false', 'no', 'off'):
    return False
  try:
    from IPython import get_ipython  # pylint: disable=import-outside-toplevel
    from tensorflow_model_analysis.notebook.jupyter import tfma_widget  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  shell = get_ipython()
  if shell is None or type(shell).__name__ != 'ZMQInteractiveShell':
    return False
  return tfma_widget.SlicingMetricsViewer is not None


def slicing_widgets(evaluation: Evaluation) -> List[Any]:
  """tfma.view.render_slicing_metrics widgets: Overall, then one per slicing column."""
  widgets = []
  for model in evaluation.models:
    result = evaluation.results[model]
    widgets.append(tfma.view.render_slicing_metrics(result))
    for column in slicing_columns(evaluation):
      widgets.append(tfma.view.render_slicing_metrics(result, slicing_column=column))
  return [widget for widget in widgets if widget is not None]
