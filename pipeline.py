"""E-commerce retrieval pipeline: TFX DAG, local runner and Kubeflow compiler.

  python pipeline.py run [--interactions F --items F] [--output DIR]
  python pipeline.py compile --target kubeflow --output pipeline.json
  python pipeline.py report --pipeline-root DIR --output report.html

`create_pipeline` builds the DAG (as tfx/examples/penguin/penguin_pipeline_local.py does);
the runners stay thin.
"""

import argparse
import logging
import os
import sys
import time
import warnings
from typing import Dict, List, Optional

os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# google-api-core warns on every import that Python 3.10 is old; TFX 1.16 needs 3.10.
warnings.filterwarnings('ignore', category=FutureWarning, module='google')

# pylint: disable=g-import-not-at-top
import tensorflow_model_analysis as tfma
from tfx import v1 as tfx
from tfx.dsl.components.base import executor_spec

from components import anomalies_gate
from components import baseline_gate
from components import baselines_component
from components import compressor as compressor_lib
from components import example_gen
from components import pusher as atomic_pusher
from components import text_encoder as text_encoder_component
from compression import compress as compress_lib
from configs import NODE_IDS, PIPELINE_NAME, TUNER_ID
from contract import data as contract
from evaluation import run_report
from evaluation import run_summary
from runners import beam as beam_runners
from runners import cache_keys
from runners import progress as progress_lib
from trainers import features
from trainers import metrics
from trainers import model as model_lib
from trainers import text_encoder
from trainers import tuning

REPO = os.path.dirname(os.path.abspath(__file__))
SAMPLE_DIR = os.path.join(REPO, 'data', 'online_retail_sample')
DEFAULT_RECALL_FLOOR = 0.05
# The compressed model must keep this share of the trained model's test Recall@10 (issue 4).
DEFAULT_MIN_RETENTION = 0.98
# The gate's floor on index_recall@10 of the compressed model's approximate index on test.
DEFAULT_MIN_INDEX_RECALL = 0.95
# Exit statuses of `pipeline.py run` (docs/evaluation.md, "Verdict and exit status").
EXIT_BLESSED = 0        # ran; the model was blessed and pushed
EXIT_ERROR = 1          # an unexpected failure (a traceback)
EXIT_USAGE = 2          # bad input data or flags: one line on stderr, nothing run
EXIT_NOT_BLESSED = 3    # ran to the end; the gate refused the model, nothing was pushed
# Model names in the Evaluators' candidate/baseline EvalConfig.
CANDIDATE, BASELINE = 'compressed', 'trained'

# --setup_file ships this project to Beam workers on distributed runners; it also stops TFX
# from building an sdist of itself before every Beam component (runners/beam.py).
SETUP_FILE = os.path.join(REPO, 'setup.py')
BEAM_IN_MEMORY = beam_runners.beam_pipeline_args('in-memory', setup_file=SETUP_FILE)


def eval_config(recall_floor: Optional[float], min_retention: Optional[float] = None,
                with_baseline: bool = False,
                min_index_recall: Optional[float] = None) -> tfma.EvalConfig:
  """TFMA config: the eval_ranks signature, full-catalog metrics, the blessing gate.

  Metrics are computed overall and per slice of each slicing feature (user activity, target
  popularity, cold start: trainers.features.SLICE_FEATURES); the gate applies overall:
  recall@10 >= `recall_floor` and, against the baseline, >= `min_retention` of its recall@10,
  and index_recall@10 (serving_default's share of the exact top-10) >= `min_index_recall`.
  None: no such threshold (the search Evaluator reports, it does not gate).
  `with_baseline`: two models, CANDIDATE (the compressed one) and BASELINE (the trained one).
  """
  def spec(name='', is_baseline=False):
    # No prediction_key: the metrics read both outputs (rank, index_recall).
    return tfma.ModelSpec(name=name, signature_name=features.EVAL_SIGNATURE,
                          is_baseline=is_baseline)
  return tfma.EvalConfig(
      model_specs=([spec(CANDIDATE), spec(BASELINE, is_baseline=True)] if with_baseline
                   else [spec()]),
      slicing_specs=[tfma.SlicingSpec()] + [tfma.SlicingSpec(feature_keys=[name])
                                            for name in features.SLICE_FEATURES],
      metrics_specs=[tfma.MetricsSpec(metrics=metrics.metric_configs(
          recall_floor, min_retention if with_baseline else None,
          min_index_recall if with_baseline else None))])


def create_pipeline(pipeline_root: str,
                    interactions: str,
                    items: str,
                    serving_dir: str,
                    metadata_path: Optional[str] = None,
                    input_fingerprint: str = '',
                    trainer_config: Optional[Dict] = None,
                    recall_floor: float = DEFAULT_RECALL_FLOOR,
                    beam_pipeline_args: Optional[List[str]] = None,
                    text_encoder_spec: str = text_encoder.DEFAULT_ENCODER,
                    compression: Optional[Dict] = None,
                    min_retention: float = DEFAULT_MIN_RETENTION,
                    min_baseline_lift: float = baseline_gate.DEFAULT_MIN_LIFT,
                    min_index_recall: float = DEFAULT_MIN_INDEX_RECALL,
                    tune_trials: int = 0,
                    enable_cache: bool = True) -> tfx.dsl.Pipeline:
  """Builds the TFX pipeline.

  Args:
    pipeline_root: Root of the pipeline's artifacts (local path or object-store URI).
    interactions: Interactions file (docs/contracts.md §1).
    items: Items file (docs/contracts.md §1).
    serving_dir: Pusher destination; versions go to `<serving_dir>/recommender/<version>`.
    metadata_path: SQLite MLMD path for local runs; None for orchestrators that bring their own.
    input_fingerprint: Content fingerprint of the input files (cache key).
    trainer_config: Trainer hyperparameters (JSON scalars; see trainers.model.DEFAULTS).
    recall_floor: Evaluator's absolute floor on recall@10 for blessing.
    compression: Compressor parameters (compression.compress.PARAMETERS; {} for the
      defaults); None leaves the Compressor out: the trained model is evaluated and pushed.
    min_retention: With compression, the least share of the trained model's recall@10 the
      compressed model must keep to be blessed.
    min_baseline_lift: The candidate's validation recall@10 must be more than this multiple of
      the best classic baseline's (popularity, ItemKNN, ALS: the Baselines component) to be
      pushed; 0 turns that gate off.
    min_index_recall: With compression, the least index_recall@10 on test of the compressed
      model's serving_default (its approximate index, compression.ivf) to be blessed.
    beam_pipeline_args: Beam options for the Beam-powered components.
    text_encoder_spec: The BERT of the text features: 'minilm' (the packaged
      all-MiniLM-L6-v2), a Hugging Face checkpoint directory, a TF Hub handle or SavedModel
      path; 'none' for the id-only model.
    tune_trials: >0 adds the TFX Tuner (trainers/tuning.py) before the Trainer: this many
      trials on validation Recall@10, DEFAULTS first; its best hyperparameters feed the
      Trainer. 0: no Tuner, the Trainer uses DEFAULTS and trainer_config.
    enable_cache: Reuse earlier executions whose inputs and properties are unchanged.

  Returns:
    The tfx.dsl.Pipeline.
  """
  gen = example_gen.SequenceExampleGen(
      interactions=interactions, items=items,
      input_fingerprint=f'{input_fingerprint}:{code_fingerprint("example_gen")}')
  statistics_gen = tfx.components.StatisticsGen(examples=gen.outputs['examples'])
  schema_gen = tfx.components.SchemaGen(statistics=statistics_gen.outputs['statistics'],
                                        infer_feature_shape=True)
  example_validator = tfx.components.ExampleValidator(
      statistics=statistics_gen.outputs['statistics'], schema=schema_gen.outputs['schema'])
  gate = anomalies_gate.AnomaliesGate(anomalies=example_validator.outputs['anomalies'],
                                      schema=schema_gen.outputs['schema'])
  # The classic recommenders on the same split, tuned on validation: the bar to beat.
  baselines = baselines_component.Baselines(split=gen.outputs['split'],
                                            code=code_fingerprint('baselines'))
  uses_text = text_encoder_spec != text_encoder.NO_ENCODER
  # With text, the catalog split joins the analysis: every catalog item gets an id, so that
  # items without interactions can still be retrieved through their text.
  analyze = [features.TRAIN_SPLIT] + ([features.CATALOG_SPLIT] if uses_text else [])
  transform = tfx.components.Transform(
      examples=gen.outputs['examples'],
      schema=gate.outputs['validated_schema'],
      preprocessing_fn='trainers.transform.preprocessing_fn',
      splits_config=tfx.proto.SplitsConfig(analyze=analyze,
                                           transform=list(features.SPLITS)),
      custom_config={'text_encoder': text_encoder_spec, 'code': code_fingerprint('transform')})
  encoder = None
  if uses_text:
    checkpoint_dir, tfhub_handle = text_encoder.encoder_source(text_encoder_spec)
    encoder = text_encoder_component.TextEncoder(checkpoint_dir=checkpoint_dir,
                                       tfhub_handle=tfhub_handle,
                                       code_fingerprint=code_fingerprint('text_encoder'))
  tuner = None
  if tune_trials:
    tuner = tfx.components.Tuner(
        tuner_fn='trainers.tuning.tuner_fn',
        examples=transform.outputs['transformed_examples'],
        transform_graph=transform.outputs['transform_graph'],
        base_model=encoder.outputs['model'] if encoder else None,
        train_args=tfx.proto.TrainArgs(splits=[features.TRAIN_SPLIT]),
        eval_args=tfx.proto.EvalArgs(splits=[features.EVAL_SPLIT]),
        custom_config={**(trainer_config or {}), tuning.TRIALS_KEY: int(tune_trials),
                       'code': code_fingerprint('tuner')}).with_id(TUNER_ID)
  trainer = tfx.components.Trainer(
      run_fn='trainers.trainer.run_fn',
      hyperparameters=tuner.outputs['best_hyperparameters'] if tuner else None,
      examples=transform.outputs['transformed_examples'],
      transform_graph=transform.outputs['transform_graph'],
      # The pretrained text encoder is the model the Trainer starts from (frozen by default).
      base_model=encoder.outputs['model'] if encoder else None,
      train_args=tfx.proto.TrainArgs(splits=[features.TRAIN_SPLIT]),
      eval_args=tfx.proto.EvalArgs(splits=[features.EVAL_SPLIT]),
      custom_config={**(trainer_config or {}), 'code': code_fingerprint('trainer')})
  # The model that is evaluated and pushed: the compressed one, gated against the trained one
  # (its baseline), or the trained one itself when compression is off.
  compressor = None
  if compression is not None:
    compressor = compressor_lib.Compressor(
        trained_model=trainer.outputs['model'],
        transform_graph=transform.outputs['transform_graph'],
        examples=transform.outputs['transformed_examples'],
        raw_examples=gen.outputs['examples'],
        code=code_fingerprint('compressor'), **compression)
  candidate = compressor.outputs['model'] if compressor else trainer.outputs['model']
  baseline = trainer.outputs['model'] if compressor else None
  evaluator = tfx.components.Evaluator(
      examples=gen.outputs['examples'],
      model=candidate,
      baseline_model=baseline,
      eval_config=eval_config(recall_floor, min_retention, with_baseline=bool(compressor),
                              min_index_recall=min_index_recall),
      example_splits=[features.TEST_SPLIT])
  # Search quality (docs/contracts.md §2, contract.protocol.search_query): reported, not a
  # gate.
  search_evaluator = tfx.components.Evaluator(
      examples=gen.outputs['examples'],
      model=candidate,
      baseline_model=baseline,
      eval_config=eval_config(None, with_baseline=bool(compressor)),
      example_splits=[features.SEARCH_SPLIT]).with_id(NODE_IDS['search_evaluator'])
  # Pushed only when the Evaluator blessed it and it beats the baselines on validation.
  gate_baselines = baseline_gate.BaselineGate(
      evaluator_blessing=evaluator.outputs['blessing'],
      baselines=baselines.outputs['baselines'],
      trained_model=trainer.outputs['model'],
      compression_report=compressor.outputs['report'] if compressor else None,
      min_lift=float(min_baseline_lift), code=code_fingerprint('baseline_gate'))
  with tfx.dsl.Cond(gate_baselines.outputs['blessing'].future()[0].custom_property('blessed')
                    == 1):
    pusher = tfx.components.Pusher(
        model=candidate,
        custom_executor_spec=executor_spec.ExecutorClassSpec(atomic_pusher.Executor),
        model_blessing=gate_baselines.outputs['blessing'],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(
                base_directory=os.path.join(serving_dir, features.MODEL_NAME))))
  components = [gen, statistics_gen, schema_gen, example_validator, gate, baselines,
                transform] + ([encoder] if encoder else []) + (
                    [tuner] if tuner else []) + [trainer] + (
                    [compressor] if compressor else []) + [
                        evaluator, search_evaluator, gate_baselines, pusher]
  return tfx.dsl.Pipeline(
      pipeline_name=PIPELINE_NAME,
      pipeline_root=pipeline_root,
      components=components,
      enable_cache=enable_cache,
      metadata_connection_config=(
          tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path)
          if metadata_path else None),
      beam_pipeline_args=beam_pipeline_args or BEAM_IN_MEMORY)


# Each custom step's entry module: its code key covers that file and every project file it
# imports (runners/cache_keys.py).
CODE = {
    'example_gen': ('components/example_gen.py',),
    'text_encoder': ('components/text_encoder.py',),
    'transform': ('trainers/transform.py',),
    'trainer': ('trainers/trainer.py',),
    'tuner': ('trainers/tuning.py',),
    'baselines': ('components/baselines_component.py',),
    'compressor': ('components/compressor.py',),
    'baseline_gate': ('components/baseline_gate.py',),
}


def code_fingerprint(step: str) -> str:
  """The code part of a custom step's cache key (CODE[step] and what it imports)."""
  return cache_keys.code_fingerprint(REPO, CODE[step])


def _find_data_error(error: BaseException) -> Optional[contract.DataError]:
  """The DataError behind an exception the runner may have wrapped, if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, contract.DataError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def run(args) -> int:
  """`run`: validates the input, runs the DAG locally, writes the outputs and the summary."""
  interactions = args.interactions or os.path.join(SAMPLE_DIR, 'interactions.csv')
  items = args.items or os.path.join(SAMPLE_DIR, 'items.csv')
  beam_pipeline_args = beam_runners.from_flags(args, setup_file=SETUP_FILE)
  # Fail on bad input before anything is written under --output.
  contract.read_contract(interactions, items)
  output = os.path.abspath(args.output)
  pipeline_root = os.path.join(output, 'pipeline_root')
  os.makedirs(pipeline_root, exist_ok=True)
  handlers = progress_lib.capture_progress(os.path.join(output, 'pipeline.log'))
  progress = handlers[0]
  metadata_path = os.path.join(pipeline_root, 'metadata.db')
  started = time.time()
  try:
    tfx.orchestration.LocalDagRunner().run(create_pipeline(
        pipeline_root=pipeline_root,
        interactions=os.path.abspath(interactions),
        items=os.path.abspath(items),
        serving_dir=os.path.join(output, 'serving'),
        metadata_path=metadata_path,
        input_fingerprint=cache_keys.fingerprint(interactions, items),
        trainer_config=args.trainer_config,
        recall_floor=args.min_recall_at_10,
        beam_pipeline_args=beam_pipeline_args,
        text_encoder_spec=args.text_encoder,
        enable_cache=not args.no_cache,
        tune_trials=args.tune,
        **compression_arguments(args)))
  finally:
    for handler in handlers:
      logging.getLogger().removeHandler(handler)
      handler.close()
  timings = {node: progress.timings.get(node, 0.0) for node in NODE_IDS.values()}
  if args.tune:
    timings[TUNER_ID] = progress.timings.get(TUNER_ID, 0.0)
  timings['total'] = round(time.time() - started, 2)
  reader = run_summary.RunReader(metadata_path, PIPELINE_NAME)
  summary = run_summary.build_summary(reader, NODE_IDS, timings)
  summary['cached'] = sorted(progress.cached)
  summary['machine'] = run_summary.machine()
  run_summary.export_split(reader.output_uri(NODE_IDS['example_gen'], 'split'),
                           os.path.join(output, 'split'))
  run_summary.write_json_atomic(os.path.join(output, 'run_summary.json'), summary)
  print()
  print(run_summary.format_summary(summary))
  print(f'summary: {os.path.join(output, "run_summary.json")}')
  print(run_summary.verdict(summary, args.min_recall_at_10,
                            None if args.no_compression else args.min_recall_retention))
  return EXIT_BLESSED if summary['blessed'] else EXIT_NOT_BLESSED


def compile_pipeline(args) -> int:
  """`compile`: writes the Kubeflow Pipelines (v2) spec of the same DAG."""
  runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
      config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(
          default_image=args.image),
      output_filename=args.output)
  runner.run(create_pipeline(
      pipeline_root=args.pipeline_root,
      interactions=args.interactions,
      items=args.items,
      serving_dir=args.serving_dir,
      trainer_config=args.trainer_config,
      tune_trials=args.tune,
      **compression_arguments(args),
      # Beam components run inside the pipeline image: its setup.py, its own image as workers.
      beam_pipeline_args=beam_runners.from_flags(
          args, setup_file=beam_runners.CONTAINER_SETUP_FILE, image=args.image)))
  print(f'wrote {args.output}')
  return 0


def report(args) -> int:
  """`report`: a self-contained HTML page on the latest run of a pipeline root."""
  try:
    path = run_report.write_report(args.pipeline_root, args.output, PIPELINE_NAME, NODE_IDS,
                                   summary_path=args.run_summary,
                                   benchmark_path=args.benchmark)
  except run_report.ReportError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  print(f'wrote {path}')
  return 0


_KIND_NAMES = {int: 'an integer', float: 'a float', str: 'a string'}


def _parameter(text: str, kinds: Dict[str, type], validate):
  """`NAME=VALUE` -> (name, typed value), checked by `validate({name: value})`; argparse
  reports a bad one in one line."""
  name, sep, value = text.partition('=')
  if not sep or name not in kinds:
    raise argparse.ArgumentTypeError(
        f'{text!r}: expected NAME=VALUE with NAME one of {", ".join(sorted(kinds))}')
  kind = kinds[name]
  try:
    typed = kind(value)
  except ValueError:
    raise argparse.ArgumentTypeError(  # pylint: disable=raise-missing-from
        f'{text!r}: {name} takes {_KIND_NAMES.get(kind, kind.__name__)}, not {value!r}')
  try:
    validate({name: typed})
  except ValueError as error:
    raise argparse.ArgumentTypeError(f'{text!r}: {error}')  # pylint: disable=raise-missing-from
  return name, typed


def compression_parameter(text: str):
  """`NAME=VALUE` of --compression (components/compressor.py PARAMETERS)."""
  return _parameter(text, {name: kind for name, (kind, _) in compress_lib.PARAMETERS.items()
                           if name != 'code'}, compress_lib.parameters)


def trainer_parameter(text: str):
  """`NAME=VALUE` of --trainer (trainers/model.py DEFAULTS)."""
  return _parameter(text, {name: type(value) for name, value in model_lib.DEFAULTS.items()},
                    model_lib.hyperparameters)


def trainer_config(args, text_encoder_spec: str) -> Dict:
  """create_pipeline's `trainer_config` from --trainer (and run's --epochs, --distribution).

  Raises:
    argparse.ArgumentTypeError: a value the Trainer would refuse (--epochs 0), fine-tuning
      asked of no encoder, or of more layers than the configured checkpoint has.
  """
  config = dict(args.trainer)
  for name in ('epochs', 'distribution'):
    value = getattr(args, name, None)
    if value is not None:
      config[name] = value
  try:
    model_lib.hyperparameters(config)  # --epochs 0 is refused here, not inside the Trainer
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None
  layers = config.get('fine_tune_layers', 0)
  if layers and text_encoder_spec == text_encoder.NO_ENCODER:
    raise argparse.ArgumentTypeError(
        f'fine_tune_layers={layers}: the id-only model (--text-encoder none) has no encoder')
  checkpoint_dir, tfhub_handle = text_encoder.encoder_source(text_encoder_spec)
  if layers and not tfhub_handle:
    checkpoint_dir = checkpoint_dir or text_encoder.default_checkpoint_dir()
    available = text_encoder.read_bert_config(checkpoint_dir)['num_hidden_layers']
    if layers > available:
      raise argparse.ArgumentTypeError(
          f'fine_tune_layers={layers}: the text encoder ({checkpoint_dir}) has {available} '
          'transformer layers')
  return config


def share(text: str) -> float:
  """A float in [0, 1] (--min-recall-retention)."""
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0.0 <= value <= 1.0:
    raise argparse.ArgumentTypeError(f'{text!r}: expected a share between 0 and 1')
  return value


def non_negative(text: str) -> float:
  """A float >= 0 (--min-baseline-lift)."""
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not value >= 0.0:
    raise argparse.ArgumentTypeError(f'{text!r}: expected a number >= 0')
  return value


def compression_arguments(args) -> Dict:
  """create_pipeline's `compression` and the gates' `min_retention` and `min_baseline_lift`
  from their flags."""
  return {'compression': None if args.no_compression else dict(args.compression),
          'min_retention': args.min_recall_retention,
          'min_baseline_lift': args.min_baseline_lift,
          'min_index_recall': args.min_index_recall}


def add_trainer_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--trainer', type=trainer_parameter, action='append', default=[],
                      metavar='NAME=VALUE',
                      help='a Trainer hyperparameter, e.g. fine_tune_layers=2 (fine-tune the '
                           "text encoder's top 2 layers; for GPU hosts) or embedding_dim=128 "
                           '(repeatable; trainers/model.py DEFAULTS)')
  parser.add_argument('--tune', type=trials, default=0, metavar='N',
                      help='add the TFX Tuner: N trials on validation Recall@10 (DEFAULTS '
                           'first, then seeded random draws from trainers/tuning.py '
                           'SEARCH_SPACE; --trainer values stay fixed); default 0: no tuning')


def trials(text: str) -> int:
  """A trial count >= 0 (--tune)."""
  if not (text.isascii() and text.isdigit()):
    raise argparse.ArgumentTypeError(f'{text!r}: expected a number of trials (0: no tuning)')
  return int(text)


def add_compression_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--no-compression', action='store_true',
                      help='leave the Compressor out: evaluate and push the trained model')
  parser.add_argument('--compression', type=compression_parameter, action='append',
                      default=[], metavar='NAME=VALUE',
                      help='a Compressor parameter, e.g. target_sparsity=0.8 or distill=0 '
                           '(repeatable; components/compressor.py PARAMETERS)')
  parser.add_argument('--min-recall-retention', type=share, default=DEFAULT_MIN_RETENTION,
                      help="share of the trained model's test recall@10 the compressed model "
                           'must keep to be blessed (default: %(default)s)')
  parser.add_argument('--min-index-recall', type=share, default=DEFAULT_MIN_INDEX_RECALL,
                      help="least share of the exact top-10 that the compressed model's "
                           'approximate index returns on test, to be blessed (default: '
                           '%(default)s; 1 without an index)')
  parser.add_argument('--min-baseline-lift', type=non_negative,
                      default=baseline_gate.DEFAULT_MIN_LIFT,
                      help="pushed only if the model's validation recall@10 is more than this "
                           "multiple of the best classic baseline's (popularity, ItemKNN, ALS, "
                           'tuned on validation); 0 turns this gate off (default: %(default)s)')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='pipeline.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest='command', required=True)
  run_parser = commands.add_parser('run', help='run the whole DAG locally')
  run_parser.add_argument('--interactions', help='interactions CSV/Parquet (default: sample)')
  run_parser.add_argument('--items', help='items CSV/Parquet (default: bundled sample)')
  run_parser.add_argument('--output', default='output', help='output directory')
  run_parser.add_argument('--epochs', type=int, help='training epochs (default: trainer default)')
  run_parser.add_argument('--min-recall-at-10', type=float, default=DEFAULT_RECALL_FLOOR,
                          help='Evaluator blessing floor on recall@10')
  run_parser.add_argument('--no-cache', action='store_true', help='re-run every component')
  add_compression_flags(run_parser)
  add_trainer_flags(run_parser)
  run_parser.add_argument(
      '--distribution',
      choices=['default', 'mirrored', 'multi_worker_mirrored'],
      help="Trainer's tf.distribute strategy: one device (default), every GPU (or logical CPU) "
           'of the host, or the workers TF_CONFIG names')
  run_parser.add_argument(
      '--text-encoder', default=text_encoder.DEFAULT_ENCODER,
      help="BERT for item and query text: 'minilm' (packaged all-MiniLM-L6-v2, default), a "
           "Hugging Face checkpoint directory, a TF Hub handle or SavedModel path; 'none' for "
           'the id-only model')
  beam_runners.add_flags(run_parser)
  compile_parser = commands.add_parser('compile', help='compile for an orchestrator')
  compile_parser.add_argument('--target', default='kubeflow', choices=['kubeflow'])
  compile_parser.add_argument('--output', default='pipeline.json')
  compile_parser.add_argument('--image', default=beam_runners.PIPELINE_IMAGE,
                              help='pipeline container image (Dockerfile; default: %(default)s)')
  compile_parser.add_argument('--pipeline-root', default='gs://BUCKET/recommender/root')
  compile_parser.add_argument('--interactions', default='gs://BUCKET/data/interactions.csv')
  compile_parser.add_argument('--items', default='gs://BUCKET/data/items.csv')
  compile_parser.add_argument('--serving-dir', default='gs://BUCKET/recommender/serving')
  add_trainer_flags(compile_parser)
  add_compression_flags(compile_parser)
  beam_runners.add_flags(compile_parser)
  report_parser = commands.add_parser('report', help='HTML report on a pipeline root')
  report_parser.add_argument('--pipeline-root', required=True,
                             help='pipeline root (e.g. output/pipeline_root)')
  report_parser.add_argument('--output', default='report.html', help='HTML file to write')
  report_parser.add_argument('--run-summary',
                             help='run_summary.json (default: next to the pipeline root)')
  report_parser.add_argument('--benchmark', help='serving benchmark JSON (default: '
                             'benchmarks/serving.json next to the pipeline root)')
  args = parser.parse_args(argv)
  if args.command == 'report':
    return report(args)
  try:
    args.trainer_config = trainer_config(
        args, getattr(args, 'text_encoder', text_encoder.DEFAULT_ENCODER))
  except argparse.ArgumentTypeError as error:
    (run_parser if args.command == 'run' else compile_parser).error(
        f'argument --trainer: {error}')
  try:
    return run(args) if args.command == 'run' else compile_pipeline(args)
  except beam_runners.PresetError as error:
    print(f'error: {error}', file=sys.stderr)
    return EXIT_USAGE
  except Exception as error:  # pylint: disable=broad-except
    data_error = _find_data_error(error)
    if data_error is None:
      raise
    print(f'error: {data_error}', file=sys.stderr)
    return EXIT_USAGE


if __name__ == '__main__':
  status = main()
  # TensorFlow's function destructors print 'Exception ignored' tracebacks during interpreter
  # teardown; everything is written and flushed by now, so skip the teardown.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access
