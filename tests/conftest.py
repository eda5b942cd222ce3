"""Test set-up: Keras 2 before TensorFlow loads, the repository on sys.path, data helpers."""

import os
import sys

os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top
import pytest


def write_csv(path, header, rows):
  """Writes a small CSV; rows are sequences of already-formatted values."""
  with open(path, 'w') as f:
    f.write(','.join(header) + '\n')
    for row in rows:
      f.write(','.join(str(v) for v in row) + '\n')
  return str(path)


@pytest.fixture
def items_file(tmp_path):
  """An items file covering the items a..h."""
  return write_csv(tmp_path / 'items.csv', ['item_id', 'title'],
                   [(i, f'item {i}') for i in 'abcdefgh'])
