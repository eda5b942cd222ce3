"""Reads a finished run back from ML Metadata; writes run_summary.json (docs/contracts.md §3)."""

import dataclasses
import json
import math
import os
import platform
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import tensorflow_model_analysis as tfma
from tensorflow_model_analysis.writers import eval_config_writer
from google.protobuf import text_format
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from evaluation import artifacts
from trainers import features
from trainers import metrics as metrics_lib

OUTPUT_EVENTS = (metadata_store_pb2.Event.OUTPUT, metadata_store_pb2.Event.DECLARED_OUTPUT)


@dataclasses.dataclass
class PipelineRun:
  """One run of the pipeline in MLMD: its run id and its executions by node id."""
  run_id: str
  executions: Dict[str, metadata_store_pb2.Execution]


class RunReader:
  """Looks up the latest execution of each node of a pipeline and its output artifacts."""

  def __init__(self, metadata_path: str, pipeline_name: str):
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = metadata_path
    config.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READONLY
    self._store = metadata_store.MetadataStore(config)
    self._pipeline_name = pipeline_name

  def last_execution(self, node_id: str) -> Optional[metadata_store_pb2.Execution]:
    context = self._store.get_context_by_type_and_name(
        'node', f'{self._pipeline_name}.{node_id}')
    if context is None:
      return None
    executions = self._store.get_executions_by_context(context.id)
    return max(executions, key=lambda e: e.id) if executions else None

  def outputs(self, node_id: str, key: str) -> List[metadata_store_pb2.Artifact]:
    """Output artifacts under `key` of the node's latest execution."""
    execution = self.last_execution(node_id)
    if execution is None:
      return []
    return self.execution_artifacts(execution.id, key)

  def execution_artifacts(self, execution_id: int, key: str,
                          events=OUTPUT_EVENTS) -> List[metadata_store_pb2.Artifact]:
    """Artifacts under `key` of one execution (its outputs, or `events` of another type)."""
    ids = []
    for event in self._store.get_events_by_execution_ids([execution_id]):
      if event.type in events and any(step.key == key for step in event.path.steps):
        ids.append(event.artifact_id)
    return self._store.get_artifacts_by_id(ids) if ids else []

  def execution(self, execution_id: int) -> Optional[metadata_store_pb2.Execution]:
    found = self._store.get_executions_by_id([execution_id])
    return found[0] if found else None

  def node_of_executions(self) -> Dict[int, str]:
    """Execution id -> node id, for every execution of this pipeline's nodes."""
    prefix = f'{self._pipeline_name}.'
    nodes = {}
    for context in self._store.get_contexts_by_type('node'):
      if context.name.startswith(prefix):
        for execution in self._store.get_executions_by_context(context.id):
          nodes[execution.id] = context.name[len(prefix):]
    return nodes

  def pipeline_runs(self) -> List[PipelineRun]:
    """Every run of this pipeline recorded in the store, oldest first.

    A run is a `pipeline_run` context; a cached execution belongs to the run that reused the
    earlier result, and a node skipped by a condition (Pusher on an unblessed model) has no
    execution in it.
    """
    nodes = self.node_of_executions()
    runs = []
    for context in self._store.get_contexts_by_type('pipeline_run'):
      executions = sorted((e for e in self._store.get_executions_by_context(context.id)
                           if e.id in nodes), key=lambda e: e.id)
      if executions:
        runs.append(PipelineRun(run_id=context.name,
                                executions={nodes[e.id]: e for e in executions}))
    return sorted(runs, key=lambda run: min(e.id for e in run.executions.values()))

  def output_uri(self, node_id: str, key: str) -> Optional[str]:
    artifacts = self.outputs(node_id, key)
    return artifacts[-1].uri if artifacts else None

  def was_cached(self, node_id: str) -> bool:
    execution = self.last_execution(node_id)
    return bool(execution and
                execution.last_known_state == metadata_store_pb2.Execution.CACHED)


def _slice_key(metrics_for_slice) -> tuple:
  """((feature, value as text), ...) of a MetricsForSlice; () for the overall slice."""
  key = []
  for single in metrics_for_slice.slice_key.single_slice_keys:
    kind = single.WhichOneof('kind')
    value = getattr(single, kind) if kind else ''
    key.append((single.column, value.decode() if isinstance(value, bytes) else str(value)))
  return tuple(key)


def evaluator_metrics(eval_uri: str, model_name: str = '',
                      slice_key: tuple = ()) -> Dict[str, float]:
  """Metrics of one model and slice from an Evaluator output, keyed like rank_metrics.

  Args:
    eval_uri: the Evaluator's `evaluation` artifact uri.
    model_name: the model's name in a candidate/baseline evaluation; '' for a single model.
    slice_key: ((feature, value), ...) of the slice; () for the overall slice. A slice with
      no examples gives NaN metrics and 0 users.
  """
  values = {}
  for metrics_for_slice in tfma.load_metrics(eval_uri):
    if _slice_key(metrics_for_slice) != tuple(slice_key):
      continue
    for key_and_value in metrics_for_slice.metric_keys_and_values:
      if key_and_value.key.model_name not in (model_name, ''):
        continue
      if key_and_value.key.is_diff:
        continue
      values[key_and_value.key.name] = key_and_value.value.double_value.value
  result = {metrics_lib.metric_name(kind, k): values.get(metrics_lib.metric_name(kind, k),
                                                          math.nan)
            for kind, k in metrics_lib.REPORTED}
  if metrics_lib.INDEX_RECALL_METRIC in values:
    result[metrics_lib.INDEX_RECALL_METRIC] = values[metrics_lib.INDEX_RECALL_METRIC]
  result['users'] = int(values.get('example_count', 0))
  return result


def model_roles(config) -> Tuple[str, Optional[str]]:
  """(candidate, baseline) model names of a tfma.EvalConfig; baseline None without one."""
  specs = list(config.model_specs)
  baseline = next((spec.name for spec in specs if spec.is_baseline), None)
  candidate = next((spec.name for spec in specs if not spec.is_baseline),
                   specs[0].name if specs else '')
  return candidate, baseline


def evaluated_models(eval_uri: str) -> Tuple[str, Optional[str]]:
  """model_roles of the EvalConfig an Evaluator output was computed with."""
  return model_roles(eval_config_writer.load_eval_run(eval_uri)[0])


def blessing_failures(eval_uri: str) -> List[str]:
  """Human-readable reasons why the Evaluator did not bless, empty when it did."""
  result = tfma.load_validation_result(eval_uri)
  _, baseline = evaluated_models(eval_uri)
  baseline_metrics = evaluator_metrics(eval_uri, baseline) if baseline is not None else {}
  reasons = []
  for failure in result.metric_validations_per_slice:
    for failed in failure.failures:
      value = failed.metric_value.double_value.value
      threshold = failed.metric_threshold
      name = failed.metric_key.name
      model = f' ({failed.metric_key.model_name})' if failed.metric_key.model_name else ''
      if threshold.value_threshold.HasField('lower_bound'):
        reasons.append(f'{name}{model} = {value:.4f} is below the floor '
                       f'{threshold.value_threshold.lower_bound.value:g}')
      elif threshold.change_threshold.HasField('relative') and baseline is not None:
        # The failure's value is TFMA's diff (candidate - baseline).
        base = baseline_metrics.get(name, math.nan)
        needed = 1.0 + threshold.change_threshold.relative.value
        kept = (base + value) / base if base else math.nan
        reasons.append(f'{name}{model} = {base + value:.4f} keeps {kept:.1%} of the {baseline} '
                       f'model\'s {base:.4f}; the gate needs at least {needed:.1%}')
      else:
        reasons.append(f'{name}{model} = {value:.4f} fails '
                       f'{text_format.MessageToString(threshold, as_one_line=True)}')
  if result.missing_thresholds:
    reasons.append(f'{len(result.missing_thresholds)} threshold(s) had no metric')
  return reasons


# report.json keys copied into run_summary.json's `compression` section.
COMPRESSION_FIGURES = ('size_ratio', 'gzip_size_ratio', 'speedup_batch1',
                       'speedup_search_batch1', 'speedup_batch64', 'speedup_search_batch64',
                       'session_speedup_batch1', 'session_speedup_search_batch1',
                       'recall_retention', 'search_recall_retention')


def compression_section(report_uri: str, trained: Dict[str, float],
                        compressed: Dict[str, float]) -> Dict[str, Any]:
  """run_summary.json's `compression`: the Compressor report's figures and the gate's view.

  `recall_retention` is the report's (eval split, measured by the Compressor);
  `test_recall_retention` is the Evaluator's, on the test split the gate decides on.
  """
  report = artifacts.read_compression_report(report_uri)
  section = {key: report.get(key) for key in COMPRESSION_FIGURES}
  for name in ('trained', 'compressed'):
    model = report[name]
    section[name] = {'bytes': model['bytes'], 'gzip_bytes': model['gzip_bytes'],
                     'latency_ms': model['latency_ms']}
  base = trained.get('recall@10')
  section['test_recall_retention'] = (compressed['recall@10'] / base
                                      if base and not math.isnan(base) else None)
  chosen = report.get('chosen') or {}
  kept = (report.get('candidates') or [{}])[chosen.get('index', 0)] if chosen else {}
  # The kept candidate's settings (the Compressor's search picks them per run).
  section['candidate'] = chosen.get('name')
  section['candidates_tried'] = len(report.get('candidates') or [])
  section['fell_back'] = chosen.get('fell_back')
  section['sparsity'] = kept.get('sparsity', (report.get('config') or {}).get('target_sparsity'))
  section['quantized'] = [q['name'] for q in report.get('quantized') or []]
  section['distilled'] = bool(report.get('distillation'))
  section['fast_id_path'] = bool((report.get('fast_id_path') or {}).get('enabled'))
  section['index'] = index_summary(report.get('index'), compressed)
  section['report'] = os.path.join(report_uri, artifacts.COMPRESSION_REPORT_MD)
  return section


def index_summary(index: Optional[Dict[str, Any]],
                  compressed: Dict[str, float]) -> Optional[Dict[str, Any]]:
  """The approximate index's line of the compression section (compression.ivf's report, and
  the Evaluator's index recall on test); None when the Compressor built none."""
  if not index:
    return None
  chosen = next((r for r in index['rows'] if r['nprobe'] == index['nprobe']), {})
  return {'used': index['used'], 'why': index['why'], 'n_lists': index['n_lists'],
          'nprobe': index['nprobe'], 'scanned_share': chosen.get('scanned_share'),
          'validation_index_recall@10': chosen.get('index_recall@10'),
          'test_index_recall@10': compressed.get(metrics_lib.INDEX_RECALL_METRIC)}


def training_section(model_uri: Optional[str]) -> Optional[Dict[str, Any]]:
  """run_summary.json's `training`: how validation decided the Trainer's epochs, and the
  per-epoch curves (training loss, validation loss, validation Recall@10), from the Model
  artifact's trainer_state/training.json; None when the artifact has none."""
  path = os.path.join(model_uri or '', features.TRAINER_STATE_DIR,
                      features.TRAINING_STATE_FILE)
  if not model_uri or not os.path.isfile(path):
    return None
  with open(path) as f:
    state = json.load(f)
  validation = state.get('validation') or {}
  return {'max_epochs': state['params'].get('epochs'),
          **{key: validation.get(key) for key in ('epochs_run', 'best_epoch', 'patience')},
          'best_val_recall@10': validation.get('best_val_recall@10'),
          # Text models: the id-embedding shrinkage validation chose after training.
          'id_shrinkage': state.get('id_shrinkage'),
          # With --tune: the Tuner's best values the Trainer used (None: not tuned).
          'tuned': state.get('tuned'),
          # The exported model's (the best epoch's, with the chosen shrinkage).
          'val_recall@10': state.get('validation_recall@10',
                                     validation.get('best_val_recall@10')),
          'per_epoch': state.get('history') or {}}


# CPU features that change which kernels TensorFlow (oneDNN) picks, and so the last digits of
# the figures (docs/evaluation.md, "Reproducibility").
_CPU_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_tile', 'amx_bf16')


def machine() -> Dict[str, Any]:
  """run_summary.json's `machine`: what this process ran on, so a figure names its machine."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  cpu, flags = platform.processor() or platform.machine(), set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          cpu = value.strip()
        elif key.strip() == 'flags':
          flags = set(value.split())
          break
  except OSError:
    pass
  return {'cpu': cpu, 'cpu_flags': [flag for flag in _CPU_FLAGS if flag in flags],
          'cores': os.cpu_count(), 'os': platform.platform(),
          'python': platform.python_version(), 'tensorflow': tf.__version__,
          'TF_ENABLE_ONEDNN_OPTS': os.environ.get('TF_ENABLE_ONEDNN_OPTS')}


def write_json_atomic(path: str, payload: Dict[str, Any]) -> None:
  """Writes JSON via a temporary file, so that readers never see a half-written file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp')
  with os.fdopen(handle, 'w') as f:
    json.dump(payload, f, indent=2, sort_keys=False)
    f.write('\n')
  os.replace(tmp, path)


def export_split(split_uri: str, destination: str) -> None:
  """Copies the split CSVs to `destination`, replacing an older export only when complete."""
  staging = destination + '.tmp'
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  for name in artifacts.SPLIT_FILES.values():
    shutil.copyfile(os.path.join(split_uri, name), os.path.join(staging, name))
  shutil.rmtree(destination, ignore_errors=True)
  os.replace(staging, destination)


def build_summary(reader: RunReader, node_ids: Dict[str, str],
                  timings: Dict[str, float]) -> Dict[str, Any]:
  """Assembles run_summary.json from MLMD (node_ids: role -> component id)."""
  split_uri = reader.output_uri(node_ids['example_gen'], 'split')
  report = artifacts.read_split_report(split_uri)
  eval_uri = reader.output_uri(node_ids['evaluator'], 'evaluation')
  # The Pusher's condition: the BaselineGate's blessing (the Evaluator's, and the baselines
  # beaten on validation).
  blessing = reader.outputs(node_ids['baseline_gate'], 'blessing')
  blessed = bool(blessing and blessing[-1].custom_properties['blessed'].int_value == 1)
  gate = artifacts.read_gate(blessing[-1].uri) if blessing else None
  classic = artifacts.read_baselines(
      reader.output_uri(node_ids['baselines'], 'baselines'))
  pushed = reader.outputs(node_ids['pusher'], 'pushed_model') if blessed else []
  pushed_model = None
  if pushed and pushed[-1].custom_properties['pushed'].int_value == 1:
    pushed_model = pushed[-1].custom_properties['pushed_destination'].string_value
  candidate, baseline = evaluated_models(eval_uri)
  # With compression the Evaluator's candidate is the compressed model, its baseline the
  # trained one; without, its one model is the trained one.
  models = ({'trained': baseline, 'compressed': candidate} if baseline is not None
            else {'trained': candidate})
  summary = {
      'data': {key: report[key] for key in ('users', 'items', 'interactions', 'test_users')},
      'timings': timings,
      'metrics': {
          **{role: evaluator_metrics(eval_uri, name) for role, name in models.items()},
          # The classic recommenders of the Baselines component, fit on train + validation.
          'baselines': {name: entry['test'] for name, entry in classic.items()},
      },
      'blessed': blessed,
      'pushed_model': pushed_model,
      'data_quality': {'bad_rows': report['bad_rows'], 'examples': report['examples']},
      'baseline_gate': dict(gate or {}, baselines={
          name: {'validation_recall@10': entry['validation_recall@10'],
                 'params': entry['params'], 'seconds': entry['seconds']}
          for name, entry in classic.items()}),
  }
  # Cold start: test targets without fit interactions, a slice of the Evaluator's output.
  summary['cold_start'] = {role: evaluator_metrics(eval_uri, name,
                                                   slice_key=((features.COLD_START, 'true'),))
                           for role, name in models.items()}
  search_uri = reader.output_uri(node_ids['search_evaluator'], 'evaluation')
  if search_uri:
    summary['search'] = {role: evaluator_metrics(search_uri, name)
                         for role, name in models.items()}
    summary['search']['protocol'] = ('contract.protocol.search_query: 2-3 title words of '
                                     'each test target, no user, no history')
  training = training_section(reader.output_uri(node_ids['trainer'], 'model'))
  if training:
    summary['training'] = training
  report_uri = reader.output_uri(node_ids['compressor'], 'report') if baseline else None
  if report_uri:
    summary['compression'] = compression_section(report_uri, summary['metrics']['trained'],
                                                 summary['metrics']['compressed'])
  if not blessed:
    summary['not_blessed_because'] = blessing_failures(eval_uri) + (
        [gate['reason']] if gate and gate['evaluator_blessed'] else [])
  return summary


def verdict(summary: Dict[str, Any], floor: float, min_retention: Optional[float]) -> str:
  """The run's last line: blessed or not, on which thresholds, with both numbers of each."""
  if not summary['blessed']:
    reasons = summary.get('not_blessed_because') or ['no reason recorded']
    return 'verdict: NOT blessed, nothing pushed: ' + '; '.join(reasons)
  metrics = summary['metrics']
  role = 'compressed' if 'compressed' in metrics else 'trained'
  recall = metrics[role]['recall@10']
  checks = [f'recall@10 ({role}) = {recall:.4f} >= floor {floor:g}']
  if role == 'compressed' and min_retention is not None:
    base = metrics['trained']['recall@10']
    kept = recall / base if base else math.nan
    checks.append(f"keeps {kept:.1%} of the trained model's {base:.4f} "
                  f'(gate: at least {min_retention:.1%})')
  gate = summary.get('baseline_gate') or {}
  if gate.get('reason'):
    checks.append(gate['reason'])
  return f"verdict: blessed: {'; '.join(checks)}; pushed {summary['pushed_model']}"


def format_summary(summary: Dict[str, Any]) -> str:
  """The readable end-of-run summary: data, metrics table, timings, pushed path."""
  data = summary['data']
  lines = [f"data: {data['users']} users, {data['items']} items, "
           f"{data['interactions']} interactions, {data['test_users']} test users"]
  bad = summary.get('data_quality', {}).get('bad_rows') or {}
  for reason, count in bad.items():
    lines.append(f'  bad rows: {reason}: {count}')
  names = [metrics_lib.metric_name(kind, k) for kind, k in metrics_lib.REPORTED]
  lines.append('')
  lines.append(f"{'model':<22}" + ''.join(f'{n:>11}' for n in names) + f"{'users':>8}")
  rows = [('trained', summary['metrics']['trained'])]
  if 'compressed' in summary['metrics']:
    rows.append(('compressed', summary['metrics']['compressed']))
  rows += [(f'baseline: {name}', values)
           for name, values in summary['metrics']['baselines'].items()]
  rows += [(f"{section.replace('_', ' ')}: {role}", summary[section][role])
           for section in ('cold_start', 'search') if section in summary
           for role in ('trained', 'compressed') if role in summary[section]]
  for label, values in rows:
    lines.append(f'{label:<22}' + ''.join(f'{values[n]:>11.4f}' for n in names) +
                 f"{values['users']:>8}")
  lines.append('')
  compression = summary.get('compression')
  if compression:
    def x(value, pattern='{:.2f}x'):
      return '-' if value is None else pattern.format(value)
    if compression.get('candidate'):
      lines.append(f"compression kept: {compression['candidate']} ("
                   f"{compression['candidates_tried']} candidate(s) tried"
                   f"{'; none reached the validation target: fallback' if compression.get('fell_back') else ''})")
    lines.append(f"compression: {x(compression['size_ratio'])} smaller on disk, batch-1 "
                 f"speed-up {x(compression['speedup_batch1'])} (search "
                 f"{x(compression['speedup_search_batch1'])}), recall@10 retention "
                 f"{x(compression['test_recall_retention'], '{:.1%}')} on test, "
                 f"{x(compression['recall_retention'], '{:.1%}')} on eval; report "
                 f"{compression['report']}")
    index = compression.get('index')
    if index and index['used']:
      lines.append(f"index: {index['n_lists']} lists, nprobe {index['nprobe']} (scans "
                   f"{x(index['scanned_share'], '{:.1%}')} of the catalog): index recall@10 "
                   f"{x(index['test_index_recall@10'], '{:.4f}')} on test, "
                   f"{x(index['validation_index_recall@10'], '{:.4f}')} on validation")
    elif index:
      lines.append(f"index: not used ({index['why']}); serving_default is brute force")
  training = summary.get('training')
  if training and training.get('epochs_run'):
    lines.append(f"training: {training['epochs_run']} of at most {training['max_epochs']} "
                 f"epochs, best validation recall@10 {training['best_val_recall@10']:.4f} at "
                 f"epoch {training['best_epoch']} (patience {training['patience']})")
    shrinkage = training.get('id_shrinkage')
    if shrinkage:
      tried = ', '.join(f'm={m} {r:.4f}'
                        for m, r in shrinkage['validation_recall@10'].items())
      lines.append(f"item-id shrinkage c/(c+m): m={shrinkage['chosen']:g} chosen on validation "
                   f"recall@10 ({tried})")
    if training.get('tuned'):
      lines.append('tuned on validation (Tuner): ' + ', '.join(
          f'{k}={v:g}' if isinstance(v, (int, float)) else f'{k}={v}'
          for k, v in sorted(training['tuned'].items())))
  lines.append('timings (s): ' + ', '.join(f'{k} {v:.1f}' for k, v in summary['timings'].items()))
  if summary['blessed']:
    lines.append(f"blessed; pushed model: {summary['pushed_model']}")
  else:
    lines.append('NOT blessed: ' + '; '.join(summary.get('not_blessed_because') or ['unknown']))
  return '\n'.join(lines)
