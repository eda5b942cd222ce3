"""The query tower's history encoders: how the ordered history of item embeddings becomes one
vector (TwoTowerModel's `history_encoder` hyperparameter).

Both take the history's item embeddings [B, L, dim] (most recent at lengths - 1, zero-padded
after it), each position counted from the most recent item [B, L] (-1 past the end), which
positions are real [B, L] and the lengths [B]; both give float32 [B, dim], zeros for an empty
history. The serving towers (compression.export.ServingTowers) run the trained layer as it is.
"""

import tensorflow as tf


class HistoryPooling(tf.keras.layers.Layer):
  """'pool': a softmax over learned recency logits (one per position from the end) weighs the
  history's item embeddings."""

  def __init__(self, max_history: int, **kwargs):
    super().__init__(name='history_pooling', **kwargs)
    self.position_logits = self.add_weight(name='position_logits', shape=[max_history],
                                           initializer='zeros', trainable=True)

  def call(self, embedded, from_end, valid, lengths):
    del lengths  # Zero weights past the end: an empty history pools to zeros.
    logits = tf.gather(self.position_logits, tf.maximum(from_end, 0))
    weights = tf.nn.softmax(tf.where(valid, logits, -1e9), axis=1)
    weights = weights * tf.cast(valid, tf.float32)
    return tf.reduce_sum(weights[:, :, None] * embedded, axis=1)


class HistoryAttention(tf.keras.layers.Layer):
  """'attention', SASRec's encoder: the item embeddings plus position embeddings (counted from
  the most recent item, as the pooling's logits are), through causal self-attention blocks
  (attention, residual, layer norm, a two-layer feed-forward, residual, layer norm); the output
  at the most recent item is the history's vector."""

  def __init__(self, dim: int, max_history: int, blocks: int, heads: int, **kwargs):
    super().__init__(name='history_attention', **kwargs)
    self.position_embedding = tf.keras.layers.Embedding(max_history, dim,
                                                        name='position_embedding')
    self.attention = [tf.keras.layers.MultiHeadAttention(heads, max(dim // heads, 1),
                                                         name=f'attention_{i}')
                      for i in range(blocks)]
    self.feed_forward = [tf.keras.Sequential([tf.keras.layers.Dense(dim, activation='relu'),
                                              tf.keras.layers.Dense(dim)],
                                             name=f'feed_forward_{i}')
                         for i in range(blocks)]
    self.attention_norm = [tf.keras.layers.LayerNormalization(name=f'attention_norm_{i}')
                           for i in range(blocks)]
    self.feed_forward_norm = [tf.keras.layers.LayerNormalization(name=f'feed_forward_norm_{i}')
                              for i in range(blocks)]

  def call(self, embedded, from_end, valid, lengths):
    keep = tf.cast(valid, tf.float32)[:, :, None]
    x = (embedded + self.position_embedding(tf.maximum(from_end, 0))) * keep
    length = self.position_embedding.input_dim
    causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
    mask = tf.logical_and(causal[None], valid[:, None, :])
    for attention, norm, feed_forward, feed_forward_norm in zip(
        self.attention, self.attention_norm, self.feed_forward, self.feed_forward_norm):
      x = norm(x + attention(x, x, attention_mask=mask))
      x = feed_forward_norm(x + feed_forward(x)) * keep
    last = tf.gather(x, tf.maximum(lengths - 1, 0), batch_dims=1)
    return last * tf.cast(lengths > 0, tf.float32)[:, None]


ENCODERS = ('pool', 'attention')


def make(params: dict) -> tf.keras.layers.Layer:
  """The encoder that params['history_encoder'] names, sized by the other hyperparameters."""
  if params['history_encoder'] == 'attention':
    return HistoryAttention(params['embedding_dim'], params['max_history'],
                            params['attention_blocks'], params['attention_heads'])
  return HistoryPooling(params['max_history'])
