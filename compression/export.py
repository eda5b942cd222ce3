"""The compressed SavedModel: the trained model's signatures over int8 towers and index.

trainers.serving_model.ExportModule writes the signatures (serving_default, recommend_k,
eval_ranks, transform_features) of both the trained and the compressed model, so the two take
and return exactly the same tensors. Here it gets, in place of the Keras TwoTowerModel:

- `ServingTowers`: the query tower only, rebuilt from plain tensors: the user and item
  embedding tables (int8, per-row scales), the recency position weights (float32, 20 values),
  the query MLP and the text projection (int8 kernels, per-output-channel scales, float32
  biases). Its `query_embedding` is TwoTowerModel's own method applied to these tensors, so
  the tower computes what the trained one does, not a re-implementation of it.
- a CandidateIndex: the item-tower outputs of the whole catalog (int8, per-row scales),
  computed once from the pruned model; the item tower itself (with its [N, 384] item-text
  table and the id mask) is not needed at serving time and is left out.
- the student text encoder (compression.distillation) when distillation is on, else the
  teacher.

Nothing training-only travels: no optimizer slots, no item-text table, no sampling
probabilities, no training-query tables.

`CompressedModule` (an ExportModule subclass) also slims the serving graph of
`serving_default`, which is what makes query-less (recommendation) requests faster at batch 1,
where the towers cost little and the graph's fixed per-node cost dominates:
- a batch without any query skips the Transform graph (its WordPiece tokenizer runs on the
  empty query and item text on every request) and looks the user and history ids up in the
  Transform's own vocabulary files; the Compressor checks this against the Transform graph
  (check_fast_ids) and falls back to the plain path if they ever differ;
- its conds stay functional If ops (keep_conds_functional), so that a branch not taken (the
  text encoder, the Transform graph) costs nothing, instead of a visit per node.
eval_ranks and transform_features run the Transform graph as the trained model's do.
"""

import gzip
import io
import os
import tarfile
from typing import Dict, List

import numpy as np
import tensorflow as tf
import tensorflow_transform as tft
from tensorflow.core.framework import attr_value_pb2

from compression import quantization
from trainers import features
from trainers import serving_model
from trainers import model as model_lib


class ServingTowers(tf.Module):
  """The query tower of a trained TwoTowerModel, from (int8) tensors, for serving."""

  def __init__(self, model: model_lib.TwoTowerModel, quantize: bool = True):
    """Copies the tower's weights out of `model` (built, with its trained or pruned values).

    Args:
      model: the TwoTowerModel.
      quantize: int8 tables and kernels; False keeps float32 (for comparisons).
    """
    super().__init__(name='serving_towers')
    table = quantization.Int8Table if quantize else quantization.FloatTable
    self.max_history = int(model.max_history)
    self.uses_text = bool(model.uses_text)
    # The history encoder (trainers/history.py) stays float32, as trained.
    self.history_encoder = model.history_encoder
    self.user_embedding = table(model.user_embedding.embeddings.numpy(), 'user_embedding')
    self.item_embedding = table(model.item_embedding.embeddings.numpy(), 'item_embedding')
    self.query_mlp = quantization.DenseStack(
        [quantization.dense_from_keras(layer, f'query_mlp/layer_{i}', quantize)
         for i, layer in enumerate(model.query_mlp.layers)], 'query_mlp')
    if self.uses_text:
      self.text_projection = quantization.dense_from_keras(model.text_projection,
                                                           'text_projection', quantize)

  def query_embedding(self, user_idx, history_idx, query_text=None, has_query=None):
    """TwoTowerModel.query_embedding over this object's tensors."""
    return model_lib.TwoTowerModel.query_embedding(self, user_idx, history_idx,
                                                   query_text=query_text,
                                                   has_query=has_query)

  def quantized_modules(self) -> List[tf.Module]:
    modules = [self.user_embedding, self.item_embedding] + list(self.query_mlp.layers)
    if self.uses_text:
      modules.append(self.text_projection)
    return modules


class WithWidth(tf.Module):
  """A text encoder (the teacher TextFeatures) with the `width` of its features attached."""

  def __init__(self, text_features, width: int):
    super().__init__(name='text_features')
    self.text_features = text_features
    self.width = int(width)

  def __call__(self, tokens):
    return self.text_features(tokens)


def _vocab_table(tf_transform_output: tft.TFTransformOutput, name: str):
  """A Transform vocabulary as tft.apply_vocabulary(num_oov_buckets=1) applies it.

  Id = line number of the vocabulary file (an asset of the SavedModel), unknown = the
  vocabulary size (the one OOV bucket).
  """
  path = tf_transform_output.vocabulary_file_by_name(name)
  size = tf_transform_output.vocabulary_size_by_name(name)
  return tf.lookup.StaticHashTable(
      tf.lookup.TextFileInitializer(path, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                    tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER),
      default_value=size)


class CompressedModule(serving_model.ExportModule):
  """ExportModule with a fast path for recommendation requests.

  At batch 1 most of a recommendation request's time is the Transform graph, and most of that
  the WordPiece tokenization of the (empty) query and item text. A batch in which no request
  has a query needs only the user and history ids: this module looks them up directly in the
  Transform's own vocabulary files, as tft.apply_vocabulary does, and runs the whole
  Transform graph (tokenizer included) only for batches with a query. The Compressor checks
  the two paths against each other (`check_fast_ids`) before it exports, and exports without
  the fast path if they differ. eval_ranks and transform_features always run the Transform
  graph.
  """

  def __init__(self, towers, tf_transform_output: tft.TFTransformOutput, top_k: int,
               text_features, candidate_index, fast_ids: bool = True):
    super().__init__(towers, tf_transform_output, top_k, text_features,
                     candidate_index=candidate_index)
    self.fast_ids = bool(fast_ids)
    if self.fast_ids:
      self.user_table = _vocab_table(tf_transform_output, features.USER_VOCAB)
      self.item_table = _vocab_table(tf_transform_output, features.ITEM_VOCAB)

  @tf.function(input_signature=serving_model.ExportModule.serve.input_signature)
  def serve(self, user_id, history, query):
    """serving_default: ExportModule's, with its conds kept functional (keep_conds_functional)."""
    outputs = serving_model.ExportModule.serve.python_function(self, user_id, history, query)
    keep_conds_functional(tf.compat.v1.get_default_graph())
    return outputs

  @tf.function(input_signature=serving_model.ExportModule.serve_exact.input_signature)
  def serve_exact(self, user_id, history, query):
    """recommend_exact: ExportModule's, with its conds kept functional."""
    outputs = serving_model.ExportModule.serve_exact.python_function(self, user_id, history,
                                                                     query)
    keep_conds_functional(tf.compat.v1.get_default_graph())
    return outputs

  @tf.function(input_signature=serving_model.ExportModule.serve_k.input_signature)
  def serve_k(self, user_id, history, query, k):
    """recommend_k: ExportModule's, with its conds kept functional (keep_conds_functional)."""
    outputs = serving_model.ExportModule.serve_k.python_function(self, user_id, history, query,
                                                                 k)
    keep_conds_functional(tf.compat.v1.get_default_graph())
    return outputs

  def _ids(self, raw):
    history = raw[features.HISTORY]
    return (self.user_table.lookup(raw[features.USER_ID]),
            tf.SparseTensor(history.indices, self.item_table.lookup(history.values),
                            history.dense_shape))

  def _transform_request(self, raw):
    if not self.fast_ids:
      return self.tft_layer(raw)
    if self.text_features is None:
      user_idx, history_idx = self._ids(raw)
      return {features.USER_IDX: user_idx, features.HISTORY_IDX: history_idx}
    query = tf.reshape(raw[features.QUERY], [-1])

    # SparseTensors pass through tf.cond as their components.
    def full():
      transformed = self.tft_layer(raw)
      history, tokens = transformed[features.HISTORY_IDX], transformed[features.QUERY_TOKENS]
      return (transformed[features.USER_IDX], history.indices, history.values,
              history.dense_shape, tokens.indices, tokens.values, tokens.dense_shape)

    def ids_only():
      user_idx, history = self._ids(raw)
      batch = tf.shape(query, out_type=tf.int64)[0]
      return (user_idx, history.indices, history.values, history.dense_shape,
              tf.zeros([0, 2], tf.int64), tf.zeros([0], tf.int64), tf.stack([batch, 0]))

    parts = tf.cond(tf.reduce_any(tf.not_equal(query, '')), full, ids_only)
    return {features.USER_IDX: parts[0],
            features.HISTORY_IDX: tf.SparseTensor(parts[1], parts[2], parts[3]),
            features.QUERY_TOKENS: tf.SparseTensor(parts[4], parts[5], parts[6])}


def keep_conds_functional(graph) -> int:
  """Marks every tf.cond of `graph` to stay a functional If op when TensorFlow runs it.

  By default TensorFlow lowers an If op to Switch/Merge nodes, and then every node of the
  branch not taken is still visited, to propagate its deadness: a cond that skips the text
  encoder, or the Transform graph, still costs a visit per node of it on every request. An If
  op that stays functional runs the taken branch's function and does not touch the other.
  The `_lower_using_switch_merge` attribute is TensorFlow's own switch for this (cond_v2 sets
  it); it is a plain attribute of the GraphDef, which every TensorFlow runtime, TF Serving
  included, reads.

  Returns:
    How many If ops were marked.
  """
  marked = 0
  for op in graph.get_operations():
    if op.type in ('If', 'StatelessIf'):
      op._set_attr('_lower_using_switch_merge',  # pylint: disable=protected-access
                   attr_value_pb2.AttrValue(b=False))
      marked += 1
  return marked


def check_fast_ids(module: CompressedModule, requests) -> dict:
  """Compares the fast id path with the Transform graph on query-less requests.

  Args:
    module: the module (with fast_ids on).
    requests: serving_default inputs (dicts of user_id, history, query tensors); queries are
      blanked, and unknown ids are added.

  Returns:
    {'requests': n, 'equal': bool, 'mismatch': first difference or None}.
  """
  checked = 0
  unknown = {'user_id': tf.constant(['__unknown_user__', '']),
             'history': tf.constant([['__unknown_item__', ''], ['', '']])}
  for request in list(requests) + [dict(unknown, query=tf.constant(['', '']))]:
    history = tf.ragged.boolean_mask(request['history'],
                                     tf.not_equal(request['history'], '')).to_sparse()
    raw = serving_model.raw_request(request['user_id'], history,
                                tf.fill(tf.shape(request['user_id']), ''),
                                module.text_features is not None)
    expected = module.tft_layer(raw)
    fast = module._ids(raw)  # pylint: disable=protected-access
    pairs = ((features.USER_IDX, expected[features.USER_IDX], fast[0]),
             ('history_idx.indices', expected[features.HISTORY_IDX].indices, fast[1].indices),
             ('history_idx.values', expected[features.HISTORY_IDX].values, fast[1].values))
    for name, want, got in pairs:
      want, got = want.numpy(), got.numpy()
      if want.shape != got.shape or not np.array_equal(want, got):
        return {'requests': checked, 'equal': False,
                'mismatch': f'{name}: Transform graph {want.tolist()[:8]} vs fast path '
                            f'{got.tolist()[:8]}'}
    checked += int(request['user_id'].shape[0])
  return {'requests': checked, 'equal': True, 'mismatch': None}


def candidate_matrix(model: model_lib.TwoTowerModel, n_items: int) -> np.ndarray:
  """The item-tower outputs of the catalog, float32 [n_items, dim], as ExportModule's."""
  return model.candidate_embedding(tf.range(n_items, dtype=tf.int64)).numpy()


def build_module(model: model_lib.TwoTowerModel, tf_transform_output: tft.TFTransformOutput,
                 top_k: int, text_features, quantize: bool = True, fast_ids: bool = True):
  """The compressed module and the report entries of its quantized tensors."""
  n_items = model.n_items
  towers = ServingTowers(model, quantize)
  if text_features is not None and not hasattr(text_features, 'width'):
    text_features = WithWidth(text_features, model.item_text.shape[1])
  index = quantization.CandidateIndex(candidate_matrix(model, n_items), quantized=quantize)
  module = CompressedModule(towers, tf_transform_output, top_k, text_features, index,
                            fast_ids=fast_ids)
  modules = towers.quantized_modules() + [index]
  words = getattr(text_features, 'word_embeddings', None)
  if words is not None:
    modules.append(words)
  return module, quantization.quantized_infos(modules)


def directory_bytes(path: str) -> int:
  """Bytes of every file under `path`."""
  total = 0
  for root, _, files in tf.io.gfile.walk(path):
    for name in files:
      total += tf.io.gfile.stat(os.path.join(root, name)).length
  return int(total)


def gzip_bytes(path: str) -> int:
  """Bytes of `path` as a gzip-compressed tar (what shipping the directory costs)."""
  buffer = io.BytesIO()
  with gzip.GzipFile(fileobj=buffer, mode='wb', compresslevel=6, mtime=0) as zipped:
    with tarfile.open(fileobj=zipped, mode='w') as tar:
      for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
          full = os.path.join(root, name)
          tar.add(full, arcname=os.path.relpath(full, path))
  return len(buffer.getvalue())


def variable_bytes(saved_model_dir: str) -> Dict[str, int]:
  """Bytes by dtype of the variables in a SavedModel's checkpoint."""
  reader = tf.train.load_checkpoint(os.path.join(saved_model_dir, 'variables', 'variables'))
  sizes = {}
  dtypes = reader.get_variable_to_dtype_map()
  for name, shape in reader.get_variable_to_shape_map().items():
    dtype = dtypes[name]
    sizes[dtype.name] = sizes.get(dtype.name, 0) + int(np.prod(shape) * dtype.size)
  return sizes


def largest_variables(saved_model_dir: str, n: int = 8) -> List[dict]:
  """The n largest variables of a SavedModel's checkpoint (name, shape, dtype, bytes)."""
  reader = tf.train.load_checkpoint(os.path.join(saved_model_dir, 'variables', 'variables'))
  dtypes = reader.get_variable_to_dtype_map()
  rows = []
  for name, shape in reader.get_variable_to_shape_map().items():
    if name.startswith('_CHECKPOINTABLE_OBJECT_GRAPH'):
      continue
    rows.append({'name': name, 'shape': list(shape), 'dtype': dtypes[name].name,
                 'bytes': int(np.prod(shape) * dtypes[name].size)})
  return sorted(rows, key=lambda r: -r['bytes'])[:n]

def with_index(module: CompressedModule, index: tf.Module,
               tf_transform_output: tft.TFTransformOutput) -> CompressedModule:
  """The same compressed module, serving_default answering from `index` (compression.ivf)."""
  return CompressedModule(module.model, tf_transform_output, module.top_k,
                          module.text_features, index, fast_ids=module.fast_ids)


def export(module, export_dir: str) -> None:
  """Saves the module with the trained model's five signatures."""
  serving_model.export(module, export_dir)


def kept_float(quantized: bool, distilled: bool, uses_text: bool,
               history_encoder: tf.keras.layers.Layer) -> List[dict]:
  """The report's list of what the compressed model keeps in float32, with why."""
  size = int(sum(np.prod(v.shape) for v in history_encoder.variables))
  kept = [{'name': f'serving_towers/{history_encoder.name}',
           'why': f'the history encoder, {size} values: served as trained (int8 not tried)'},
          {'name': 'query_mlp biases', 'why': 'a few hundred values; added after the matmul'}]
  if not quantized:
    kept.append({'name': 'every tower weight and the candidate index',
                 'why': 'quantize=0'})
  if distilled:
    kept.append({'name': 'student transformer layers, position/type embeddings, head',
                 'why': 'small (the word-embedding table, most of the student, is int8); '
                        'dequantizing them on every request would cost more time than the '
                        'bytes are worth'})
  elif uses_text:
    kept.append({'name': 'teacher BERT encoder', 'why': 'distill=0: the trained encoder, '
                                                        'unchanged'})
  return kept


def left_out(model) -> List[dict]:
  """The report's list of what the trained model holds and the compressed one does not."""
  out = [{'name': 'item tower (model.item_embedding for candidates, has_id)',
          'why': 'candidates are precomputed into the int8 index'},
         {'name': 'training state (optimizer, sampling probabilities, retrieval task)',
          'why': 'training only'}]
  if model.uses_text:
    out.insert(0, {'name': 'model.item_text', 'shape': list(model.item_text.shape),
                   'why': 'item-text BERT features: already folded into the candidate index'})
  return out
