"""Transform module: id vocabularies with an out-of-vocabulary bucket.

The item vocabulary is fit on the training targets, so it is exactly the catalog of items
present in the data the model is fit on (GUIDE §3 step 4); ids are ordered by training
frequency and the OOV bucket is the last index. History items share that vocabulary.
"""

import tensorflow_transform as tft

from trainers import features


def preprocessing_fn(inputs):
  """tf.Transform preprocessing_fn: raw string ids -> vocabulary indices."""
  item_vocab = tft.vocabulary(inputs[features.ITEM_ID], vocab_filename=features.ITEM_VOCAB)
  return {
      features.USER_IDX: tft.compute_and_apply_vocabulary(
          inputs[features.USER_ID], num_oov_buckets=1, vocab_filename=features.USER_VOCAB),
      features.ITEM_IDX: tft.apply_vocabulary(
          inputs[features.ITEM_ID], item_vocab, num_oov_buckets=1),
      features.HISTORY_IDX: tft.apply_vocabulary(
          inputs[features.HISTORY], item_vocab, num_oov_buckets=1),
  }
