"""int8 weight quantization with float32 scales, dequantized in the graph with standard ops.

Symmetric linear quantization: `q = round(w / scale)` clipped to [-127, 127], `w ~ q * scale`.

- Embedding tables and the candidate index: one scale per row (`per_row`): a lookup gathers
  the int8 rows and their scales and dequantizes only those rows.
- Dense kernels [in, out]: one scale per output channel (`per_output_channel`): the layer
  computes `(x @ float(q)) * scale + bias`, which equals `x @ (float(q) * scale) + bias`.

Everything the graph needs is `Cast`, `Mul`, `GatherV2`/`ResourceGather`, `MatMul` and
`AddV2` on int8 and float32 tensors: ops every TensorFlow build, stock TF Serving included,
has. (TFLite-style fused int8 kernels would be faster but are not in TF Serving's op set.)
Pruned weights stay exactly zero: 0 quantizes to 0.
"""

import dataclasses
import re
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

PER_ROW = 'per_row'
PER_OUTPUT_CHANNEL = 'per_output_channel'
INT8_MAX = 127


def quantize(values: np.ndarray, axis: int):
  """Symmetric int8 quantization with one float32 scale per slice along `axis`.

  Args:
    values: float array, rank 2.
    axis: the axis the scales run along: 0 for one scale per row, 1 for one per column.

  Returns:
    (q int8 array of values' shape, scale float32 [values.shape[axis]]).
  """
  values = np.asarray(values, np.float32)
  reduce_axis = 1 - axis
  max_abs = np.abs(values).max(axis=reduce_axis)
  # An all-zero slice (a fully pruned row, the OOV row) gets scale 1: it dequantizes to 0.
  scale = np.where(max_abs > 0, max_abs / INT8_MAX, 1.0).astype(np.float32)
  expanded = scale[:, None] if axis == 0 else scale[None, :]
  q = np.clip(np.rint(values / expanded), -INT8_MAX, INT8_MAX).astype(np.int8)
  return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
  """The float32 values an int8 tensor and its scales stand for (numpy, for reports)."""
  expanded = scale[:, None] if axis == 0 else scale[None, :]
  return q.astype(np.float32) * expanded


def _module_name(name: str) -> str:
  """A tf.Module name (a Python identifier) for a report name such as 'query_mlp/dense'."""
  return re.sub(r'\W', '_', name)


@dataclasses.dataclass
class QuantizedTensorInfo:
  """One quantized tensor, as the compression report lists it."""
  name: str
  shape: List[int]
  dtype: str
  scale_shape: List[int]
  scale_dtype: str
  scheme: str
  float_bytes: int
  quantized_bytes: int
  max_abs_error: float
  max_abs_value: float
  storage: str = 'variable (dequantized per call)'

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _info(name: str, values: np.ndarray, q: np.ndarray, scale: np.ndarray, axis: int,
          scheme: str) -> QuantizedTensorInfo:
  error = np.abs(dequantize(q, scale, axis) - values)
  return QuantizedTensorInfo(
      name=name, shape=list(q.shape), dtype='int8', scale_shape=list(scale.shape),
      scale_dtype='float32', scheme=scheme, float_bytes=int(values.size * 4),
      quantized_bytes=int(q.size + scale.size * 4),
      max_abs_error=float(error.max()) if error.size else 0.0,
      max_abs_value=float(np.abs(values).max()) if values.size else 0.0)


class Int8Table(tf.Module):
  """An embedding table (or any row-indexed matrix) as int8 rows with one scale per row."""

  def __init__(self, values: np.ndarray, name: str):
    super().__init__(name=_module_name(name))
    values = np.asarray(values, np.float32)
    q, scale = quantize(values, axis=0)
    self.info = _info(name, values, q, scale, 0, PER_ROW)
    self.q = tf.Variable(q, trainable=False, name=f'{name}_int8')
    self.scale = tf.Variable(scale, trainable=False, name=f'{name}_scale')
    self.width = int(values.shape[1])

  def __call__(self, ids) -> tf.Tensor:
    """float32 [..., width] rows of `ids` (an int tensor of any shape), dequantized."""
    rows = tf.cast(tf.gather(self.q, ids), tf.float32)
    return rows * tf.gather(self.scale, ids)[..., None]

  def dense(self) -> tf.Tensor:
    """The whole table, dequantized: float32 [rows, width]."""
    return tf.cast(self.q, tf.float32) * self.scale[:, None]


class FloatTable(tf.Module):
  """The float32 counterpart of Int8Table (quantize=False)."""

  def __init__(self, values: np.ndarray, name: str):
    super().__init__(name=_module_name(name))
    self.info = None
    self.values = tf.Variable(np.asarray(values, np.float32), trainable=False, name=name)
    self.width = int(values.shape[1])

  def __call__(self, ids) -> tf.Tensor:
    return tf.gather(self.values, ids)

  def dense(self) -> tf.Tensor:
    return tf.convert_to_tensor(self.values)


# int8 tensors up to this size are graph constants rather than variables (see Int8Matrix).
MAX_CONSTANT_BYTES = 4 << 20


class Int8Matrix(tf.Module):
  """A float32 matrix held as int8 with one float32 scale per row (axis 0) or column (axis 1).

  A matrix of at most MAX_CONSTANT_BYTES is an int8 constant of the serving graph (in
  saved_model.pb) rather than a variable: the dequantization `cast(q) * scale` then has only
  constant inputs, and Grappler's constant folding (TF Serving runs it when it loads a model)
  does it once at load instead of on every request. Larger matrices are variables and
  dequantize per call, the scale applied to the matmul's output rather than to the matrix.
  """

  def __init__(self, values: np.ndarray, axis: int, scheme: str, name: str, info_name: str,
               codes=None):
    """Quantizes `values`; or, with `codes` = (q, scale, info), holds those as they are."""
    super().__init__(name=_module_name(name))
    if codes is None:
      q, scale = quantize(values, axis=axis)
      info = _info(info_name, values, q, scale, axis, scheme)
    else:
      q, scale, info = codes
    self.axis = axis
    self.info = info
    self._constant = None
    if q.nbytes <= MAX_CONSTANT_BYTES:
      self._constant = (q, scale)
      self.info.storage = 'graph constant (folded to float32 at load)'
    else:
      self.q = tf.Variable(q, trainable=False, name=f'{name}_int8')
      self.scale = tf.Variable(scale, trainable=False, name=f'{name}_scale')
      self.info.storage = 'variable (dequantized per call)'

  def _parts(self):
    """(int8 q, float32 scale) tensors: graph constants or the variables."""
    if self._constant is not None:
      return tf.constant(self._constant[0]), tf.constant(self._constant[1])
    return self.q, self.scale

  def rows(self, ids) -> tf.Tensor:
    """float32 rows `ids` of the dequantized matrix (row scales: axis 0)."""
    if self.axis != 0:
      raise ValueError('rows() needs one scale per row')
    q, scale = self._parts()
    return tf.cast(tf.gather(q, ids), tf.float32) * tf.gather(scale, ids)[:, None]

  def row_order(self, order: np.ndarray) -> 'Int8Matrix':
    """The same int8 codes and row scales with the rows in `order` (no requantization)."""
    if self.axis != 0:
      raise ValueError('row_order() needs one scale per row')
    q, scale = (part.numpy() for part in self._parts())
    return Int8Matrix(None, 0, self.info.scheme, self.name, self.info.name,
                      codes=(q[order], scale[order], self.info))

  def dense(self) -> np.ndarray:
    """The dequantized matrix, float32 (numpy)."""
    q, scale = self._parts()
    scale = scale.numpy()
    return q.numpy().astype(np.float32) * (scale[:, None] if self.axis == 0 else scale)

  def matmul(self, x, transpose_b: bool = False) -> tf.Tensor:
    """x @ matrix (transpose_b: x @ matrix^T); the scaled axis is the output's."""
    if (self.axis == 0) != transpose_b:
      raise ValueError('the scaled axis must be the output axis of the matmul')
    if self._constant is not None:
      q, scale = self._constant
      scale = tf.constant(scale)
      matrix = tf.cast(tf.constant(q), tf.float32) * (scale[:, None] if self.axis == 0
                                                      else scale)
      return tf.matmul(x, matrix, transpose_b=transpose_b)
    return tf.matmul(x, tf.cast(self.q, tf.float32), transpose_b=transpose_b) * self.scale


class Int8Dense(tf.Module):
  """A Dense layer with an int8 kernel and one float32 scale per output channel (Int8Matrix)."""

  def __init__(self, kernel: np.ndarray, bias: Optional[np.ndarray], activation: str,
               name: str, quantized: bool = True):
    super().__init__(name=_module_name(name))
    kernel = np.asarray(kernel, np.float32)
    self.quantized = quantized
    if quantized:
      self.kernel = Int8Matrix(kernel, 1, PER_OUTPUT_CHANNEL, f'{name}_kernel', f'{name}/kernel')
      self.info = self.kernel.info
    else:
      self.info = None
      self.kernel = tf.Variable(kernel, trainable=False, name=f'{name}_kernel')
    self.bias = (tf.Variable(np.asarray(bias, np.float32), trainable=False, name=f'{name}_bias')
                 if bias is not None else None)
    # A Keras activation name ('relu', 'linear'): in the graph, one standard op or none.
    self.activation_name = activation

  def __call__(self, x) -> tf.Tensor:
    y = self.kernel.matmul(x) if self.quantized else tf.matmul(x, self.kernel)
    if self.bias is not None:
      y = y + self.bias
    return tf.keras.activations.get(self.activation_name)(y)


def dense_from_keras(layer, name: str, quantized: bool = True) -> Int8Dense:
  """An Int8Dense with a Keras Dense layer's weights and activation."""
  bias = layer.bias.numpy() if layer.use_bias else None
  return Int8Dense(layer.kernel.numpy(), bias, tf.keras.activations.serialize(layer.activation),
                   name, quantized)


class DenseStack(tf.Module):
  """Dense layers applied in order: what a tf.keras.Sequential of Dense layers computes."""

  def __init__(self, layers: List[Int8Dense], name: str):
    super().__init__(name=_module_name(name))
    self.layers = layers

  def __call__(self, x) -> tf.Tensor:
    for layer in self.layers:
      x = layer(x)
    return x


class CandidateIndex(tf.Module):
  """The candidate index of the compressed model: [N, dim] item vectors, int8 with row scales.

  `scores(query)` is the brute-force inner product against the whole catalog, as the trained
  model's index computes it.
  """

  def __init__(self, candidates: np.ndarray, quantized: bool = True, name: str = 'candidates'):
    super().__init__(name=_module_name(name))
    candidates = np.asarray(candidates, np.float32)
    self.quantized = quantized
    if quantized:
      self.matrix = Int8Matrix(candidates, 0, PER_ROW, name, name)
      self.info = self.matrix.info
    else:
      self.info = None
      self.matrix = tf.Variable(candidates, trainable=False, name=name)

  def row_order(self, order: np.ndarray) -> 'CandidateIndex':
    """The same index with row r holding candidate order[r] (the same int8 codes, moved)."""
    moved = CandidateIndex.__new__(CandidateIndex)
    tf.Module.__init__(moved, name=self.name)
    moved.quantized, moved.info = self.quantized, self.info
    moved.matrix = (self.matrix.row_order(order) if self.quantized else
                    tf.Variable(self.matrix.numpy()[order], trainable=False,
                                name=self.matrix.name.split(':')[0]))
    return moved

  def rows(self, ids) -> tf.Tensor:
    """float32 [M, dim] candidate vectors of item ids [M] (the rows `scores` multiplies)."""
    if not self.quantized:
      return tf.gather(self.matrix, ids)
    return self.matrix.rows(ids)

  def vectors(self) -> np.ndarray:
    """The candidate vectors as `scores` sees them (dequantized), float32 [N, dim]."""
    if not self.quantized:
      return self.matrix.numpy()
    return self.matrix.dense()

  def scores(self, query) -> tf.Tensor:
    """float32 [B, N] scores of [B, dim] query vectors against every candidate."""
    if self.quantized:
      return self.matrix.matmul(query, transpose_b=True)
    return tf.matmul(query, self.matrix, transpose_b=True)


def quantized_infos(modules) -> List[Dict]:
  """The report entries of every quantized tensor among `modules` (None entries skipped)."""
  return [m.info.as_dict() for m in modules if getattr(m, 'info', None) is not None]
