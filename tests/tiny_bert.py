"""Small random BERT checkpoints in Hugging Face's layout, for tests that need a fast encoder.

`hf_tensors` gives the tensors of a BERT of any config under Hugging Face's names;
`write_checkpoint` writes a whole checkpoint directory (config.json, vocab.txt,
model.safetensors, and sentence-transformers' mean-pooling config) that `pipeline.py run
--text-encoder DIR` converts like the packaged all-MiniLM-L6-v2.
"""

import json
import os
import shutil
from typing import Dict, Optional

import numpy as np
from safetensors.numpy import save_file

from trainers import text_encoder


def hf_tensors(config: dict, prefix: str = '', seed: int = 0,
               scale: float = 1.0) -> Dict[str, np.ndarray]:
  """Random tensors of a BERT with `config`, named as Hugging Face's BertModel names them.

  LayerNorms get scale 1 and offset 0 when `scale` < 1 (a plausible initialization, as BERT's
  own), random values otherwise (a harder test of a conversion).
  """
  rng = np.random.default_rng(seed)
  h, i = config['hidden_size'], config['intermediate_size']
  shapes = {'embeddings.word_embeddings.weight': (config['vocab_size'], h),
            'embeddings.position_embeddings.weight': (config['max_position_embeddings'], h),
            'embeddings.token_type_embeddings.weight': (config['type_vocab_size'], h),
            'pooler.dense.weight': (h, h), 'pooler.dense.bias': (h,)}
  norms = ['embeddings.LayerNorm']
  for layer in range(config['num_hidden_layers']):
    for name, (out, inp) in {'attention.self.query': (h, h), 'attention.self.key': (h, h),
                             'attention.self.value': (h, h), 'attention.output.dense': (h, h),
                             'intermediate.dense': (i, h), 'output.dense': (h, i)}.items():
      shapes[f'encoder.layer.{layer}.{name}.weight'] = (out, inp)
      shapes[f'encoder.layer.{layer}.{name}.bias'] = (out,)
    norms += [f'encoder.layer.{layer}.attention.output.LayerNorm',
              f'encoder.layer.{layer}.output.LayerNorm']
  tensors = {k: scale * rng.normal(size=v) for k, v in shapes.items()}
  for norm in norms:
    if scale < 1:
      tensors[f'{norm}.weight'], tensors[f'{norm}.bias'] = np.ones(h), np.zeros(h)
    else:
      tensors[f'{norm}.weight'], tensors[f'{norm}.bias'] = rng.normal(size=h), rng.normal(size=h)
  return {prefix + k: v.astype(np.float32) for k, v in tensors.items()}


def write_checkpoint(directory: str, hidden: int = 32, layers: int = 2, heads: int = 2,
                     vocab_file: Optional[str] = None, seed: int = 0) -> str:
  """A random BERT checkpoint over a real WordPiece vocabulary (all-MiniLM-L6-v2's by default)."""
  os.makedirs(directory, exist_ok=True)
  vocab_file = vocab_file or os.path.join(text_encoder.default_checkpoint_dir(), 'vocab.txt')
  shutil.copy(vocab_file, os.path.join(directory, 'vocab.txt'))
  with open(vocab_file) as f:
    vocab_size = len(f.read().splitlines())
  config = {'architectures': ['BertModel'], 'model_type': 'bert', 'vocab_size': vocab_size,
            'hidden_size': hidden, 'num_hidden_layers': layers, 'num_attention_heads': heads,
            'intermediate_size': 4 * hidden, 'hidden_act': 'gelu',
            'max_position_embeddings': 128, 'type_vocab_size': 2, 'do_lower_case': True}
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f)
  os.makedirs(os.path.join(directory, '1_Pooling'), exist_ok=True)
  with open(os.path.join(directory, '1_Pooling', 'config.json'), 'w') as f:
    json.dump({'word_embedding_dimension': hidden, 'pooling_mode_mean_tokens': True}, f)
  save_file(hf_tensors(config, seed=seed, scale=0.02),
            os.path.join(directory, 'model.safetensors'))
  return directory
