"""Transform module: id vocabularies with an out-of-vocabulary bucket, BERT WordPiece tokens.

The item vocabulary is the catalog the model ranks (docs/contracts.md §2): the training targets,
plus, when the model reads item text, every item of the catalog split (it can represent an item
with no interactions through its text: cold start). Ids are ordered by frequency and the OOV
bucket is the last index. History items share that vocabulary. The user vocabulary leaves out
the empty user of catalog and search examples, which so maps to the OOV user.

Queries and item text are tokenized in the graph with `text.BertTokenizer` (stock TF Serving
runs its ops, unlike FastBertTokenizer's) over the text encoder's WordPiece vocabulary, held in
the graph, so that serving tokenizes exactly as training did.

`custom_config` (Transform's, JSON scalars): `text_encoder`, a `--text-encoder` value of
pipeline.py (components.text_encoder.encoder_source); 'none' for the id-only model.
"""

import tensorflow as tf
import tensorflow_transform as tft

from trainers import text_encoder
from trainers import features

QUERY_MAX_TOKENS = 16
ITEM_TEXT_MAX_TOKENS = 48


def encoder_spec(custom_config) -> str:
  """The text encoder named by a custom_config; text_encoder.NO_ENCODER for none."""
  return (custom_config or {}).get('text_encoder', text_encoder.DEFAULT_ENCODER)


def _tokens(tokenizer, strings, max_tokens):
  """WordPiece ids of [B, 1] strings as a SparseTensor [B, <= max_tokens]."""
  pieces = tokenizer.tokenize(tf.reshape(strings, [-1])).merge_dims(-2, -1)
  return pieces[:, :max_tokens].to_sparse()


def preprocessing_fn(inputs, custom_config=None):
  """tf.Transform preprocessing_fn: raw ids -> vocabulary indices; text -> WordPiece ids."""
  user_id = tf.reshape(inputs[features.USER_ID], [-1])
  user_vocab = tft.vocabulary(tf.boolean_mask(user_id, tf.not_equal(user_id, '')),
                              vocab_filename=features.USER_VOCAB)
  item_vocab = tft.vocabulary(inputs[features.ITEM_ID], vocab_filename=features.ITEM_VOCAB)
  outputs = {
      features.USER_IDX: tft.apply_vocabulary(inputs[features.USER_ID], user_vocab,
                                              num_oov_buckets=1),
      features.ITEM_IDX: tft.apply_vocabulary(
          inputs[features.ITEM_ID], item_vocab, num_oov_buckets=1),
      features.HISTORY_IDX: tft.apply_vocabulary(
          inputs[features.HISTORY], item_vocab, num_oov_buckets=1),
  }
  spec = encoder_spec(custom_config)
  if spec != text_encoder.NO_ENCODER:
    tokens, do_lower_case = text_encoder.encoder_vocabulary(spec)
    # Created once, outside the traced function and tracked by the Transform graph: a table
    # made inside it would be re-initialized (30k keys) on every call, every request.
    table = tft.make_and_track_object(lambda: text_encoder.vocab_table(tokens),
                                      name='wordpiece_vocab')
    tokenizer = text_encoder.in_graph_tokenizer(tokens, do_lower_case, table)
    outputs[features.QUERY_TOKENS] = _tokens(tokenizer, inputs[features.QUERY],
                                             QUERY_MAX_TOKENS)
    outputs[features.ITEM_TEXT_TOKENS] = _tokens(tokenizer, inputs[features.ITEM_TEXT],
                                                 ITEM_TEXT_MAX_TOKENS)
    # Raw item text passes through: the Trainer draws its training queries from catalog titles.
    outputs[features.ITEM_TEXT] = inputs[features.ITEM_TEXT]
  return outputs
