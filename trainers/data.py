"""The Trainer's datasets and text tables: transformed examples in batches, item frequencies,
the training queries drawn from catalog titles and their BERT features."""

import os

os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# pylint: disable=g-import-not-at-top
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf
from tfx_bsl.public import tfxio

from contract import protocol
from trainers import features
from trainers import model as model_lib
from trainers import serving_model

# The seed "user" of the training queries drawn from catalog titles; test queries use the real
# user ids, so the two draws differ.
TRAIN_QUERY_SEED = '__train_query__'


def make_dataset(fn_args, pattern, tf_transform_output, batch_size, shuffle, seed):
  dataset = fn_args.data_accessor.tf_dataset_factory(
      pattern,
      tfxio.TensorFlowDatasetOptions(batch_size=batch_size, shuffle=shuffle, num_epochs=1,
                                     shuffle_seed=seed),
      tf_transform_output.transformed_metadata.schema)
  # Multi-worker training shards by batch (the same seeded order on every worker, each
  # taking its share), not by file: a split is often one file, fewer than the workers.
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
  return dataset.with_options(options)


def train_statistics(dataset, n_items: int) -> Tuple[np.ndarray, np.ndarray, int]:
  """Training frequency of each item (smoothed), its count of training examples, and how many
  examples have a real query."""
  counts = np.zeros(n_items + 1, np.float64)
  with_query = 0
  for batch in dataset:
    np.add.at(counts, batch[features.ITEM_IDX].numpy().reshape(-1), 1)
    if features.QUERY_TOKENS in batch:
      with_query += int(model_lib.has_tokens(batch[features.QUERY_TOKENS]).numpy().sum())
  counts = counts[:n_items]
  return (counts + 1.0) / (counts + 1.0).sum(), counts, with_query


def split_files(fn_args, split: str):
  """File patterns of another split of the Trainer's examples (TrainArgs names only one)."""
  return [pattern.replace(f'Split-{features.TRAIN_SPLIT}', f'Split-{split}')
          for pattern in fn_args.train_files]


def training_query(item_id: str, item_text: str) -> str:
  """The training query of a catalog item: the search protocol's draw from its title (the first
  part of the item text, components.example_gen.item_text) with the training seed."""
  return protocol.search_query(TRAIN_QUERY_SEED, item_id, item_text.split(' . ')[0])


def query_tokens(tft_layer, queries) -> tf.SparseTensor:
  """WordPiece ids of query strings through the Transform graph, as serving tokenizes them."""
  n = len(queries)
  raw = serving_model.raw_request(tf.constant([''] * n), tf.sparse.from_dense(tf.constant([['']] * n)),
                    tf.constant(queries), uses_text=True)
  return tft_layer(raw)[features.QUERY_TOKENS]


def catalog_token_batches(fn_args, tf_transform_output, n_items: int, params):
  """WordPiece ids of each catalog item's text and of its training query (from its title).

  Returns:
    A list, per catalog batch, of (item indices [b] (within the vocabulary), item-text tokens,
    training-query tokens), both int64 RaggedTensors [b, (T)].
  """
  item_ids = [i.decode() for i in tf_transform_output.vocabulary_by_name(features.ITEM_VOCAB)]
  tft_layer = tf_transform_output.transform_features_layer()
  catalog = make_dataset(fn_args, split_files(fn_args, features.CATALOG_SPLIT),
                     tf_transform_output, params['text_batch_size'], False, params['seed'])
  batches = []
  for batch in catalog:
    idx = batch[features.ITEM_IDX].numpy().reshape(-1)
    in_vocab = idx < n_items
    texts = [t.decode() for t in batch[features.ITEM_TEXT].numpy().reshape(-1)]
    # The title is the first part of the item text (components.example_gen.item_text).
    queries = [training_query(item_ids[i], t)
               for i, t in zip(idx[in_vocab], np.array(texts, object)[in_vocab])]
    if not queries:
      continue
    tokens = query_tokens(tft_layer, queries)
    item_tokens = tf.ragged.boolean_mask(
        tf.RaggedTensor.from_sparse(batch[features.ITEM_TEXT_TOKENS]), in_vocab)
    batches.append((idx[in_vocab], item_tokens, tf.RaggedTensor.from_sparse(tokens)))
  if not batches:
    raise ValueError('the catalog split is empty: the text model has no item text to encode')
  return batches


def text_tables(catalog_tokens, text_features, n_items: int
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Encodes the catalog: item-text features and a training query per item.

  Returns:
    item_text float32 [n_items + 1, H] (zeros for items without text and for OOV),
    train_query float32 [n_items + 1, H], has_train_query bool [n_items + 1].
  """
  tables = None
  for idx, item_tokens, query_tokens in catalog_tokens:
    item_vectors = text_features(item_tokens.to_sparse()).numpy()
    query_vectors = text_features(query_tokens.to_sparse()).numpy()
    if tables is None:
      width = item_vectors.shape[1]
      tables = (np.zeros([n_items + 1, width], np.float32),
                np.zeros([n_items + 1, width], np.float32), np.zeros([n_items + 1], bool))
    has_text = item_tokens.row_lengths().numpy() > 0
    has_query = query_tokens.row_lengths().numpy() > 0
    tables[0][idx[has_text]] = item_vectors[has_text]
    tables[1][idx[has_query]] = query_vectors[has_query]
    tables[2][idx[has_query]] = True
  return tables


def token_tables(catalog_tokens, n_items: int) -> Tuple[tf.RaggedTensor, tf.RaggedTensor]:
  """(item-text tokens, training-query tokens), int64 [n_items + 1, (T)] by item index."""
  item_rows, query_rows = [[] for _ in range(n_items + 1)], [[] for _ in range(n_items + 1)]
  for idx, item_tokens, query_tokens in catalog_tokens:
    for i, item, query in zip(idx, item_tokens.to_list(), query_tokens.to_list()):
      item_rows[i], query_rows[i] = item, query
  as_table = lambda rows: tf.ragged.constant(rows, dtype=tf.int64, ragged_rank=1,
                                             inner_shape=())
  return as_table(item_rows), as_table(query_rows)


def with_train_queries(train_query: np.ndarray, has_train_query: np.ndarray,
                        train_query_tokens: Optional[tf.RaggedTensor] = None):
  """A dataset map adding each example's target's training query (its features, or with
  train_query_tokens its WordPiece ids, for a fine-tuned encoder)."""
  train_query = tf.constant(train_query)
  has_train_query = tf.constant(has_train_query)

  def add(batch):
    target = tf.reshape(batch[features.ITEM_IDX], [-1])
    if train_query_tokens is None:
      batch[model_lib.TRAIN_QUERY_TEXT] = tf.gather(train_query, target)
    else:
      batch[model_lib.TRAIN_QUERY_TOKENS] = tf.gather(train_query_tokens, target)
    batch[model_lib.HAS_TRAIN_QUERY] = tf.gather(has_train_query, target)
    return batch
  return add


