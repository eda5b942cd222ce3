"""compress(): prunes, distills and int8-quantizes the Trainer's model into a smaller
SavedModel: the algorithm the Compressor component (components/compressor.py) wraps. From the
Trainer's Model artifact (input `trained_model`; its `trainer_state/` rebuilds the Keras
model), the Transform graph and the transformed examples it:

1. distills the BERT query encoder into a small BertEncoder (compression.distillation), once,
   when `distill` is on and the model reads text (a budget in steps, never in seconds);
2. tries the ladder of candidates (compression.ladder), most compressed first: pruning by
   magnitude with tfmot at halving sparsities from `target_sparsity`, fine-tuned on the train
   split against the labels and the trained model's in-batch score distribution (ranking
   distillation, compression.pruning), with the student or the trained encoder for search,
   int8 everywhere; each candidate is exported (compression.export: int8 embedding tables,
   dense kernels and candidate index, dequantized in the graph with standard ops) and
   measured on the validation (eval) split; the first whose recall@10 keeps
   `min_validation_retention` of the trained model's is kept, else the least lossy (int8
   only) is, and the report says so. `search=0` builds exactly the settings given;
3. moves the kept candidate's SavedModel to `output_dir` (the component gives the Trainer's
   layout, `<model uri>/Format-Serving`), with the same signatures;
4. measures the trained and the compressed SavedModel in the same process (compression.
   benchmark) and returns the report (the component writes report.json and report.md).

Every phase prints progress lines (`[Compressor] ...`: step x/y, loss, elapsed, time left).

`Source.splits` (raw serialized examples) gives the eval (validation) split the candidates are
chosen on, each model's quality (eval_ranks + rank_metrics on the eval and search splits, as
the Evaluator computes it) and the latency requests; compress() stops with a clear error
without the eval split.

report.json's top level (stable keys; evaluation.run_summary reads them):
  size_ratio, gzip_size_ratio, speedup_batch1, speedup_search_batch1, speedup_batch64,
  speedup_search_batch64, session_speedup_batch1, session_speedup_search_batch1,
  recall_retention, search_recall_retention,
  trained / compressed: {path, bytes, gzip_bytes, variable_bytes, largest_variables,
                         latency_ms: {recommend|search: {batch_1|batch_64: {p50, p99, mean,
                         calls}}}, session_latency_ms: {the same through the Session API},
                         quality: {eval|search: rank_metrics}},
  sparsity: {layer: {weight, shape, weights, zeros, sparsity}},
  quantized: [{name, shape, dtype, scale_shape, scale_dtype, scheme, float_bytes,
               quantized_bytes, max_abs_error, max_abs_value}],
  kept_float: [what stays float32, with why], left_out: [what the trained model holds and
  the compressed one does not], index: {compression.ivf.choose's report: used, why, n_lists,
  nprobe, rows: [{nprobe, index_recall@10, scanned, batch1_p50_ms}], ...}, quantization_agreement: {...}, fast_id_path: {enabled,
  check}, ablation: {compressed_without_fast_ids: {latency_ms}} or null, pruning: {...},
  distillation: {...} or null, config: {the parameters}, seconds: {...},
  candidates: [{name, student, sparsity, m_by_n, quantize, validation_recall@10, retention,
                retention_lower, lost, gained, bytes, recommend_p50_ms, search_p50_ms,
                seconds}] (the ladder as tried; compression.ladder.retention),
  chosen: {index, name, why, target_validation_retention, fell_back},
  trained_validation: the trained model's rank_metrics on the eval split.
"""

import dataclasses
import functools
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, NamedTuple, Optional

# Keras 2 (tf_keras) before TensorFlow loads: TFRS and tfmot need it (docs/contracts.md §5).
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from tfx.utils import path_utils

from compression import benchmark
from compression import distillation
from compression import export as export_lib
from compression import ivf
from compression import ladder
from compression import markdown
from compression import progress
from compression import pruning
from trainers import features
from trainers import metrics as metrics_lib
from trainers import data as data_lib
from trainers import model as model_lib

# Latency calls per model at batch 1 (batch 64 gets a quarter as many).
DEFAULT_LATENCY_CALLS = 200
# Examples per split for quality and requests (0: all).
DEFAULT_EVAL_LIMIT = 0


# Parameter name -> (type, default). Switches are ints (0/1): every orchestrator, Kubeflow v2
# included, passes ints through unchanged.
PARAMETERS = {
    'target_sparsity': (float, 0.5),
    'sparsity_m_by_n': (int, 0),        # 1: 2:4 structured sparsity (GPU sparse tensor cores)
    'fine_tune_steps': (int, 0),        # 0: one pass over the train split
    'fine_tune_learning_rate': (float, 0.0005),
    # Weight of the ranking-distillation term (KL to the trained model's in-batch score
    # distribution) in the pruning fine-tune; 0: the retrieval loss alone.
    'ranking_distillation': (float, 1.0),
    # 1: try the ladder of candidates (compression.ladder) and keep the most compressed one
    # that keeps min_validation_retention of the trained model's validation recall@10;
    # 0: exactly the settings given (target_sparsity, distill, quantize), no search.
    'search': (int, 1),
    'min_validation_retention': (float, 0.99),
    'quantize': (int, 1),
    'fast_ids': (int, 1),               # query-less batches skip the tokenizer (checked)
    'distill': (int, 1),
    'student_layers': (int, 2),
    'student_hidden': (int, 128),
    'student_heads': (int, 2),
    'distill_epochs': (int, 8),
    'distill_max_steps': (int, 2000),   # a step budget (never seconds): same student anywhere
    # The approximate top-K index (compression.ivf): -1 where it scans <= 1/8 of the catalog
    # at the validation index recall target, 1 always, 0 never; 0 lists: round(sqrt(N)).
    'index': (int, -1),
    'index_lists': (int, 0),
    'index_recall_target': (float, 0.98),
    'latency_calls': (int, DEFAULT_LATENCY_CALLS),
    'eval_limit': (int, DEFAULT_EVAL_LIMIT),
    'seed': (int, 7),
    # The pipeline's fingerprint of the code this step runs (its cache key; pipeline.CODE).
    'code': (str, ''),
}


def parameters(exec_properties: Dict[str, Any]) -> Dict[str, Any]:
  """The Compressor's parameters with defaults filled in and types checked."""
  params = {}
  for name, (kind, default) in PARAMETERS.items():
    value = exec_properties.get(name)
    params[name] = kind(default if value is None else value)
  if not 0.0 <= params['target_sparsity'] < 1.0:
    raise ValueError(f'target_sparsity must be in [0, 1): {params["target_sparsity"]}')
  if not 0.0 < params['min_validation_retention'] <= 1.5:
    raise ValueError('min_validation_retention must be in (0, 1.5]: '
                     f'{params["min_validation_retention"]}')
  if params['index'] not in (-1, 0, 1):
    raise ValueError(f'index must be -1 (auto), 0 or 1: {params["index"]}')
  if not 0.0 < params['index_recall_target'] <= 1.0:
    raise ValueError(f'index_recall_target must be in (0, 1]: {params["index_recall_target"]}')
  if params['student_hidden'] % params['student_heads']:
    raise ValueError('student_hidden must be a multiple of student_heads')
  return params


@dataclasses.dataclass(frozen=True)
class Source:
  """What compress() reads: the Trainer's Model artifact, the Transform output, the
  transformed examples (as the Trainer's dataset helpers take them) and the raw examples."""
  trained_model_uri: str
  tf_transform_output: tft.TFTransformOutput
  fn_args: Any                       # FnArgs with train_files and data_accessor
  has_search_split: bool             # the transformed examples have the search split
  splits: Dict[str, List[bytes]]     # raw serialized examples of the eval and search splits


class CompressionResult(NamedTuple):
  model_dir: str                     # the kept candidate's SavedModel
  report: Dict[str, Any]             # report.json (the module docstring lists its keys)


def compress(source: Source, params: Dict[str, Any], output_dir: str) -> CompressionResult:
  """Compresses the Trainer's model into a SavedModel at `output_dir`; returns the report.

  Args:
    source: the Trainer's Model, the Transform output, the transformed and the raw examples.
    params: parameters(...) of the component's execution properties (PARAMETERS, checked).
    output_dir: where the kept candidate's SavedModel goes (replaced if it exists).

  Returns:
    CompressionResult: the kept SavedModel's directory and the report (report.json's keys).
  """
  seconds = {}
  started = time.time()
  tf.config.experimental.enable_op_determinism()
  tf.keras.utils.set_random_seed(params['seed'])
  model_uri = source.trained_model_uri
  tf_transform_output = source.tf_transform_output
  fn_args = source.fn_args
  splits = source.splits
  trained_dir = path_utils.serving_model_path(model_uri)

  model, state, teacher, train_queries = model_lib.load_trainer_state(model_uri)
  pruning.build(model)
  trainer_params = state['params']
  item_ids = [i.decode() for i in tf_transform_output.vocabulary_by_name(features.ITEM_VOCAB)]
  tft_layer = tf_transform_output.transform_features_layer()
  seconds['load'] = time.time() - started
  ladder_candidates = ladder.candidates(
      params['target_sparsity'], bool(params['sparsity_m_by_n']), bool(params['distill']),
      bool(params['quantize']), bool(params['search']), teacher is not None)
  progress.say(f'{len(ladder_candidates)} candidate(s), most compressed first, kept on '
               f"validation recall@10 retention >= {params['min_validation_retention']:.1%}")

  # 1. Distillation, once: every student candidate serves the same student.
  student, student_queries, distill_report = None, None, None
  if any(c.student for c in ladder_candidates):
    t0 = time.time()
    catalog = _split_dataset(fn_args, features.CATALOG_SPLIT, tf_transform_output,
                             trainer_params.get('text_batch_size', 128), False, 0)
    texts = distillation.collect_texts(catalog, tft_layer, item_ids, teacher,
                                       model.item_text.numpy(), train_queries,
                                       query_seeds=distillation.DistillConfig.query_seeds)
    config = distillation.DistillConfig(
        layers=params['student_layers'], hidden=params['student_hidden'],
        heads=params['student_heads'], epochs=params['distill_epochs'],
        max_steps=params['distill_max_steps'], seed=params['seed'])
    student, distill_report = distillation.distill(teacher, texts, config)
    if source.has_search_split:
      tokens = _search_tokens(fn_args, tf_transform_output)
      if tokens is not None:
        distill_report['held_out_search_queries'] = distillation.feature_agreement(
            student, teacher, tokens)
    if train_queries is not None:
      student_queries = (_student_train_queries(student, tft_layer, catalog, item_ids,
                                                train_queries), train_queries[1])
    seconds['distill'] = time.time() - t0

  # 2. The ladder, on the validation (eval) split only.
  t0 = time.time()
  eval_examples = splits.get(features.EVAL_SPLIT) or []
  if not eval_examples:
    raise ValueError('the Compressor needs the eval (validation) split of raw_examples to '
                     'choose among its candidates')
  trained_ranks = benchmark.ranks(tf.saved_model.load(trained_dir), eval_examples)
  trained_eval = {features.EVAL_SPLIT: metrics_lib.rank_metrics(trained_ranks)}
  trained_recall = trained_eval[features.EVAL_SPLIT]['recall@10']
  ranking_teacher = None
  if params['ranking_distillation'] > 0 and any(c.sparsity > 0 for c in ladder_candidates):
    # The trained model, unpruned, once for every pruned candidate's fine-tune.
    ranking_teacher = model_lib.load_trainer_state(model_uri)[0]
    pruning.build(ranking_teacher)
  build = functools.partial(_build_candidate, model_uri=model_uri, params=params,
                            trainer_params=trainer_params, fn_args=fn_args,
                            tf_transform_output=tf_transform_output, teacher=teacher,
                            train_queries=train_queries, student=student,
                            student_queries=student_queries, splits=splits,
                            ranking_teacher=ranking_teacher)
  # The search stops at the first candidate that passes, else ends with the fallback: the
  # one kept is always the last one tried, so only the newest candidate's SavedModel,
  # model and ranks are held (a failed one is freed before the next is built).
  results, directory, details, ranks = [], None, None, None
  try:
    for i, candidate in enumerate(ladder_candidates):
      progress.say(f'candidate {i + 1}/{len(ladder_candidates)}: {candidate.name}')
      t1 = time.time()
      if directory:
        shutil.rmtree(directory, ignore_errors=True)
        details = None
      directory, details = build(candidate, model if i == 0 else None)
      result = dict(candidate.as_dict(), **_try_candidate(directory, splits, params,
                                                               model.max_history))
      ranks = result.pop('ranks')
      kept = ladder.retention(trained_ranks, ranks)
      result.update(retention=kept['point'], retention_lower=kept['lower'],
                    lost=kept['lost'], gained=kept['gained'],
                    seconds=round(time.time() - t1, 2))
      results.append(result)
      progress.say(f"candidate {i + 1}/{len(ladder_candidates)}: validation recall@10 "
                   f"{markdown.fmt(result['validation_recall@10'], '{:.4f}')} vs trained "
                   f"{markdown.fmt(trained_recall, '{:.4f}')} = {result['retention']:.1%} "
                   f"(lower bound {result['retention_lower']:.1%}; {kept['lost']} hits lost, "
                   f"{kept['gained']} gained), {result['bytes']:,} bytes, batch-1 p50 "
                   f"{markdown.fmt(result['recommend_p50_ms'], '{:.2f}')} ms")
      if result['retention_lower'] >= params['min_validation_retention']:
        break
    chosen, why = ladder.choose(results, params['min_validation_retention'],
                                single_is_search=bool(params['search']))
    if chosen != len(results) - 1:
      raise AssertionError(f'ladder.choose kept candidate {chosen}, not the last one tried')
    progress.say(f'kept candidate {chosen + 1}: {results[chosen]["name"]} ({why})')
    if tf.io.gfile.exists(output_dir):
      tf.io.gfile.rmtree(output_dir)
    tf.io.gfile.makedirs(os.path.dirname(output_dir))
    shutil.move(directory, output_dir)
  finally:
    if directory:
      shutil.rmtree(directory, ignore_errors=True)
  seconds['search'] = time.time() - t0
  candidate = ladder_candidates[chosen]
  agreement = None
  if candidate.quantize:
    float_module, _ = export_lib.build_module(details['model'], tf_transform_output,
                                              trainer_params['top_k'],
                                              details['text_features'], quantize=False,
                                              fast_ids=False)
    agreement = score_agreement(float_module, details['module'], tft_layer, eval_examples,
                                 tf_transform_output.raw_feature_spec())
    del float_module

  # 3. The approximate index, chosen on the validation split (compression.ivf).
  t0 = time.time()
  index_report = ivf.for_module(details['module'], eval_examples,
                                tf_transform_output.raw_feature_spec(), params)
  index = index_report.pop('index')
  with_index = lambda m: export_lib.with_index(m, index, tf_transform_output) if index else m
  progress.say(f"index: {'used' if index else 'not used'}: {index_report['why']}")
  if index is not None:
    tf.io.gfile.rmtree(output_dir)
    export_lib.export(with_index(details['module']), output_dir)
  seconds['index'] = time.time() - t0

  # 4. Both SavedModels, measured here (the fast-id ablation beside them).
  t0 = time.time()
  ablation_dir = None
  if details['fast_ids']['enabled'] and splits:
    # The same compressed model without the fast id path, timed beside the other two, so
    # that the report separates what the fast path and what the compression gains.
    ablation_dir = tempfile.mkdtemp(prefix='compressor_ablation_')
    ablation, _ = export_lib.build_module(details['model'], tf_transform_output,
                                          trainer_params['top_k'], details['text_features'],
                                          quantize=candidate.quantize, fast_ids=False)
    export_lib.export(with_index(ablation), ablation_dir)
    del ablation
  try:
    eval_quality = {'trained': trained_eval[features.EVAL_SPLIT],
                    'compressed': metrics_lib.rank_metrics(ranks)}
    report = _measure(trained_dir, output_dir, splits, params, model.max_history,
                           ablation_dir, eval_quality)
  finally:
    if ablation_dir:
      shutil.rmtree(ablation_dir, ignore_errors=True)
  seconds['measure'] = time.time() - t0
  seconds['total'] = time.time() - started
  report.update({
      'candidates': results,
      'chosen': {'index': chosen, 'name': results[chosen]['name'], 'why': why,
                 'target_validation_retention': params['min_validation_retention'],
                 'fell_back': bool(params['search']) and results[chosen][
                     'retention_lower'] < params['min_validation_retention']},
      'trained_validation': trained_eval.get(features.EVAL_SPLIT),
      'sparsity': details['sparsity'],
      'quantized': details['quantized'],
      'kept_float': export_lib.kept_float(candidate.quantize, candidate.student,
                                          teacher is not None, model.history_encoder),
      'left_out': export_lib.left_out(model),
      'quantization_agreement': agreement,
      'fast_id_path': details['fast_ids'],
      'index': index_report,
      'pruning': details['pruning'],
      'distillation': distill_report if candidate.student else None,
      'config': params,
      'seconds': {k: round(v, 2) for k, v in seconds.items()},
  })
  return CompressionResult(output_dir, report)


def _split_dataset(fn_args, split, tf_transform_output, batch_size, shuffle, seed):
  files = data_lib.split_files(fn_args, split)
  return data_lib.make_dataset(fn_args, files, tf_transform_output, batch_size, shuffle, seed)


def _student_train_queries(student, tft_layer, catalog, item_ids, train_queries):
  """The student's features of the Trainer's training queries (a train_query table)."""
  table = np.zeros_like(train_queries[0])
  n_items = len(item_ids)
  for batch in catalog:
    idx = batch[features.ITEM_IDX].numpy().reshape(-1)
    texts = [t.decode() for t in batch[features.ITEM_TEXT].numpy().reshape(-1)]
    queries = [data_lib.training_query(item_ids[i] if i < n_items else '', text)
               for i, text in zip(idx, texts)]
    vectors = student(data_lib.query_tokens(tft_layer, queries)).numpy()
    keep = idx < n_items
    table[idx[keep]] = vectors[keep]
  return table * train_queries[1][:, None]


def _search_tokens(fn_args, tf_transform_output, limit: int = 512) -> Optional[tf.SparseTensor]:
  """Query tokens of the transformed search split (held-out queries), for the report."""
  dataset = _split_dataset(fn_args, features.SEARCH_SPLIT, tf_transform_output, limit, False, 0)
  for batch in dataset.take(1):
    return batch[features.QUERY_TOKENS]
  return None


def score_agreement(float_module, int8_module, tft_layer, serialized, raw_spec,
                     batch_size: int = 256) -> dict:
  """Full-catalog scores of the int8 model vs the same model in float32 on raw examples."""
  abs_errors, overlaps, n = [], [], 0
  for i in range(0, len(serialized), batch_size):
    transformed = tft_layer(tf.io.parse_example(tf.constant(list(serialized[i:i + batch_size])),
                                                raw_spec))
  
    float_scores = float_module.catalog_scores(transformed)[0].numpy()
    int8_scores = int8_module.catalog_scores(transformed)[0].numpy()
    abs_errors.append(np.abs(float_scores - int8_scores).reshape(-1))
    k = min(10, float_scores.shape[1])
    top_float = np.argsort(-float_scores, axis=1)[:, :k]
    top_int8 = np.argsort(-int8_scores, axis=1)[:, :k]
    overlaps.extend(len(set(a) & set(b)) / k for a, b in zip(top_float, top_int8))
    n += float_scores.shape[0]
  if not n:
    return {'examples': 0}
  errors = np.concatenate(abs_errors)
  return {'examples': int(n), 'max_abs_score_error': float(errors.max()),
          'mean_abs_score_error': float(errors.mean()),
          'top10_overlap': float(np.mean(overlaps)),
          'min_top10_overlap': float(np.min(overlaps))}


def _id_requests(tf_transform_output, splits, max_history: int) -> List[dict]:
  """Query-less requests for check_fast_ids: vocabulary entries, and eval users if any."""
  users = [u.decode() for u in tf_transform_output.vocabulary_by_name(features.USER_VOCAB)]
  items = [i.decode() for i in tf_transform_output.vocabulary_by_name(features.ITEM_VOCAB)]
  requests = []
  for start in range(0, min(len(users), 256), 32):
    chunk = users[start:start + 32]
    history = [[items[(start + j + k) % len(items)] for k in range(3)] for j in range(len(chunk))]
    requests.append({'user_id': tf.constant(chunk), 'history': tf.constant(history),
                     'query': tf.constant([''] * len(chunk))})
  # Every item once, as history.
  for start in range(0, len(items), 256):
    chunk = items[start:start + 256]
    requests.append({'user_id': tf.constant([''] * len(chunk)),
                     'history': tf.constant([[i] for i in chunk]),
                     'query': tf.constant([''] * len(chunk))})
  if splits.get(features.EVAL_SPLIT):
    requests += benchmark.requests(splits[features.EVAL_SPLIT], benchmark.RECOMMEND, 64,
                                   max_history, int(np.ceil(len(splits[features.EVAL_SPLIT]) / 64)))
  return requests


def _model_summary(path: str) -> dict:
  return {'path': path, 'bytes': export_lib.directory_bytes(path),
          'gzip_bytes': export_lib.gzip_bytes(path),
          'variable_bytes': export_lib.variable_bytes(path),
          'largest_variables': export_lib.largest_variables(path)}


def _build_candidate(candidate: ladder.Candidate, model, *, model_uri, params,
                     trainer_params, fn_args, tf_transform_output, teacher, train_queries,
                     student, student_queries, splits, ranking_teacher):
  """Prunes (with ranking distillation), quantizes and exports one candidate.

  Args:
    candidate: the settings.
    model: the restored trained model to compress in place, or None for a fresh copy.
    ranking_teacher: the unpruned trained model the pruned one is distilled from, or None.

  Returns:
    (temporary SavedModel directory, details: the model, its text features, the exported
     module and the report's sparsity / quantized / pruning / fast_ids entries).
  """
  if model is None:
    model = model_lib.load_trainer_state(model_uri)[0]
    pruning.build(model)
  text_features = student if candidate.student else teacher
  queries = student_queries if candidate.student else train_queries
  if candidate.student and model.encodes_in_training:
    # Real queries of the fine-tune's examples go through the student, as serving.
    model.set_text_features(student)
  config = pruning.PruningConfig(
      target_sparsity=candidate.sparsity,
      sparsity_m_by_n=(2, 4) if candidate.m_by_n else None,
      fine_tune_steps=params['fine_tune_steps'],
      learning_rate=params['fine_tune_learning_rate'], seed=params['seed'])
  pruning_report = {'target_sparsity': config.target_sparsity,
                    'sparsity_m_by_n': list(config.sparsity_m_by_n or []) or None,
                    'applied': False}
  if candidate.sparsity > 0:
    t0 = time.time()
    batch_size = trainer_params['batch_size']
    train = _split_dataset(fn_args, features.TRAIN_SPLIT, tf_transform_output, batch_size,
                           True, params['seed'])
    if queries is not None:
      train = train.map(data_lib.with_train_queries(*queries))
    steps = pruning.train_steps(
        pruning.count_examples(_split_dataset(fn_args, features.TRAIN_SPLIT,
                                              tf_transform_output, batch_size, False, 0)),
        batch_size, config)
    tf.keras.utils.set_random_seed(params['seed'])
    history = pruning.fine_tune(model, train, config, steps, teacher=ranking_teacher,
                                distill_weight=params['ranking_distillation'],
                                what=f'pruning fine-tune ({candidate.name})')
    losses = history['loss']
    pruning_report.update({
        'applied': True, 'steps': steps, 'batch_size': batch_size,
        'learning_rate': config.learning_rate,
        'ranking_distillation_weight': params['ranking_distillation'],
        'loss_first_last': [losses[0], losses[-1]],
        'ranking_distillation_loss_first_last': (
            [history['ranking_distillation_loss'][0],
             history['ranking_distillation_loss'][-1]]
            if 'ranking_distillation_loss' in history else None),
        'seconds': round(time.time() - t0, 2)})
  sparsity = pruning.sparsity_report(model)
  top_k = trainer_params['top_k']
  module, quantized = export_lib.build_module(
      model, tf_transform_output, top_k, text_features, quantize=candidate.quantize,
      fast_ids=bool(params['fast_ids']))
  fast_ids = {'enabled': False, 'check': None}
  if params['fast_ids']:
    check = export_lib.check_fast_ids(module, _id_requests(tf_transform_output, splits,
                                                           model.max_history))
    fast_ids = {'enabled': check['equal'], 'check': check}
    if not check['equal']:
      # The Transform maps ids differently from its vocabularies: keep its graph for all.
      module, quantized = export_lib.build_module(
          model, tf_transform_output, top_k, text_features, quantize=candidate.quantize,
          fast_ids=False)
  directory = tempfile.mkdtemp(prefix='compressor_candidate_')
  export_lib.export(module, directory)
  return directory, {'model': model, 'text_features': text_features, 'sparsity': sparsity,
                     'quantized': quantized, 'pruning': pruning_report,
                     'fast_ids': fast_ids, 'module': module}

def _try_candidate(directory: str, splits, params, max_history: int) -> dict:
  """A candidate SavedModel's validation ranks and recall@10, bytes and batch-1 p50
  latencies."""
  loaded = tf.saved_model.load(directory)
  ranks = benchmark.ranks(loaded, splits[features.EVAL_SPLIT])
  recall = metrics_lib.rank_metrics(ranks)['recall@10']
  request_sets = {}
  for kind, split in ((benchmark.RECOMMEND, features.EVAL_SPLIT),
                      (benchmark.SEARCH, features.SEARCH_SPLIT)):
    if splits.get(split):
      request_sets[kind] = {1: benchmark.requests(splits[split], kind, 1, max_history,
                                                  20)}
  calls = max(10, params['latency_calls'] // 4)
  latency = (benchmark.latency({'candidate': loaded}, request_sets, {1: calls})['candidate']
             if request_sets else {})
  p50 = lambda kind: latency.get(kind, {}).get('batch_1', {}).get('p50')
  return {'ranks': ranks, 'validation_recall@10': recall, 'bytes': export_lib.directory_bytes(directory),
          'recommend_p50_ms': p50(benchmark.RECOMMEND),
          'search_p50_ms': p50(benchmark.SEARCH)}

def _measure(trained_dir: str, compressed_dir: str,
             splits: Dict[str, List[bytes]], params, max_history: int,
             ablation_dir: Optional[str], eval_quality: Dict[str, dict]) -> dict:
  """Size, latency and quality of both SavedModels; `eval_quality` (model name ->
  rank_metrics on the eval split, already measured by the candidate search) is reused."""
  models = {'trained': tf.saved_model.load(trained_dir),
            'compressed': tf.saved_model.load(compressed_dir)}
  if ablation_dir:
    models[markdown.ABLATION] = tf.saved_model.load(ablation_dir)
  calls = {1: params['latency_calls'], 64: max(5, params['latency_calls'] // 4)}
  request_sets = {}
  for kind, split in ((benchmark.RECOMMEND, features.EVAL_SPLIT),
                      (benchmark.SEARCH, features.SEARCH_SPLIT)):
    if splits.get(split):
      request_sets[kind] = {b: benchmark.requests(splits[split], kind, b, max_history, 20)
                            for b in benchmark.BATCH_SIZES}
  latency = benchmark.latency(models, request_sets, calls) if request_sets else {}
  session = (benchmark.session_latency({'trained': trained_dir, 'compressed': compressed_dir},
                                       request_sets, calls) if request_sets else {})
  report = {}
  for name, path in (('trained', trained_dir), ('compressed', compressed_dir)):
    summary = _model_summary(path)
    summary['latency_ms'] = latency.get(name, {})
    summary['session_latency_ms'] = session.get(name, {})
    known = ({features.EVAL_SPLIT: eval_quality[name]} if name in eval_quality else {})
    summary['quality'] = dict(known, **benchmark.quality(
        models[name], {k: v for k, v in splits.items() if k not in known}))
    report[name] = summary
  trained, compressed = report['trained'], report['compressed']
  report['ablation'] = ({markdown.ABLATION: {'latency_ms': latency.get(markdown.ABLATION, {})}}
                        if ablation_dir else None)

  def p50(summary, kind, batch, timings='latency_ms'):
    return summary[timings].get(kind, {}).get(f'batch_{batch}', {}).get('p50')

  def session_p50(summary, kind, batch):
    return p50(summary, kind, batch, 'session_latency_ms')

  def recall(summary, split):
    return summary['quality'].get(split, {}).get('recall@10')

  report.update({
      'size_ratio': benchmark.ratio(trained['bytes'], compressed['bytes']),
      'gzip_size_ratio': benchmark.ratio(trained['gzip_bytes'], compressed['gzip_bytes']),
      'speedup_batch1': benchmark.ratio(p50(trained, benchmark.RECOMMEND, 1),
                                        p50(compressed, benchmark.RECOMMEND, 1)),
      'speedup_search_batch1': benchmark.ratio(p50(trained, benchmark.SEARCH, 1),
                                               p50(compressed, benchmark.SEARCH, 1)),
      'speedup_batch64': benchmark.ratio(p50(trained, benchmark.RECOMMEND, 64),
                                         p50(compressed, benchmark.RECOMMEND, 64)),
      'speedup_search_batch64': benchmark.ratio(p50(trained, benchmark.SEARCH, 64),
                                                p50(compressed, benchmark.SEARCH, 64)),
      'session_speedup_batch1': benchmark.ratio(
          session_p50(trained, benchmark.RECOMMEND, 1),
          session_p50(compressed, benchmark.RECOMMEND, 1)),
      'session_speedup_search_batch1': benchmark.ratio(
          session_p50(trained, benchmark.SEARCH, 1),
          session_p50(compressed, benchmark.SEARCH, 1)),
      'recall_retention': benchmark.ratio(recall(compressed, features.EVAL_SPLIT),
                                          recall(trained, features.EVAL_SPLIT)),
      'search_recall_retention': benchmark.ratio(recall(compressed, features.SEARCH_SPLIT),
                                                 recall(trained, features.SEARCH_SPLIT)),
  })
  return report
