"""The evaluation protocol (docs/contracts.md §2) on hand-made cases with a known split."""

import csv
import glob
import json
import os

import tensorflow as tf
from tfx.types import standard_artifacts

from components import example_gen
from contract import protocol
from conftest import write_csv

# user u1: ties at t=10 are broken by row order (c before b), 'a' repeats (first kept).
# user u2: two distinct items only -> training data only.
# user u3: exactly three distinct items.
INTERACTIONS = [
    ('u1', 'a', 5), ('u1', 'c', 10), ('u1', 'b', 10), ('u1', 'a', 12), ('u1', 'd', 20),
    ('u1', 'e', 20),
    ('u2', 'a', 1), ('u2', 'b', 2), ('u2', 'b', 3),
    ('u3', 'f', 3), ('u3', 'g', 2), ('u3', 'h', 1),
]


def test_split_user_orders_by_time_then_row_and_keeps_first_occurrence():
  events = [(10, 2, 'b', ''), (5, 0, 'a', ''), (10, 1, 'c', 'q'), (12, 3, 'a', ''),
            (20, 4, 'd', ''), (20, 5, 'e', '')]
  split = protocol.split_user(events)
  assert [item for item, _, _ in split.sequence] == ['a', 'c', 'b', 'd', 'e']
  assert split.sequence[1] == ('c', 10, 'q')
  assert (split.n_train, split.valid, split.test) == (3, 3, 4)


def test_split_user_with_fewer_than_three_items_is_training_only():
  split = protocol.split_user([(1, 0, 'a', ''), (2, 1, 'b', ''), (3, 2, 'b', '')])
  assert (split.n_train, split.valid, split.test) == (2, None, None)


def _read_split(path):
  with open(path, newline='') as f:
    return [(r['user_id'], r['item_id']) for r in csv.DictReader(f)]


def _read_features(split_dir):
  """Every example of a split as {feature: first value, 'history': list}, sorted."""
  examples = []
  for path in glob.glob(os.path.join(split_dir, '*.gz')):
    for record in tf.data.TFRecordDataset(path, compression_type='GZIP'):
      feature = tf.train.Example.FromString(record.numpy()).features.feature
      values = {k: (v.bytes_list.value[0].decode() if v.bytes_list.value else
                    v.int64_list.value[0] if v.int64_list.value else None)
                for k, v in feature.items()}
      values['history'] = [v.decode() for v in feature['history'].bytes_list.value]
      examples.append(values)
  return sorted(examples, key=lambda e: (e['user_id'], e['item_id']))


def _read_examples(split_dir):
  return sorted((e['user_id'], e['item_id'], e['history']) for e in _read_features(split_dir))


def test_executor_writes_the_known_split(tmp_path, items_file):
  interactions = write_csv(tmp_path / 'interactions.csv', ['user_id', 'item_id', 'timestamp'],
                           INTERACTIONS)
  examples = standard_artifacts.Examples()
  examples.uri = str(tmp_path / 'examples')
  split = example_gen.SplitExport()
  split.uri = str(tmp_path / 'split')
  example_gen.Executor().Do({}, {'examples': [examples], 'split': [split]}, {
      'interactions': interactions, 'items': items_file, 'input_fingerprint': ''})

  assert _read_split(tmp_path / 'split' / 'train.csv') == [
      ('u1', 'a'), ('u1', 'c'), ('u1', 'b'), ('u2', 'a'), ('u2', 'b'), ('u3', 'h')]
  assert _read_split(tmp_path / 'split' / 'valid.csv') == [('u1', 'd'), ('u3', 'g')]
  assert _read_split(tmp_path / 'split' / 'test.csv') == [('u1', 'e'), ('u3', 'f')]

  assert _read_examples(tmp_path / 'examples' / 'Split-train') == sorted([
      ('u1', 'a', []), ('u1', 'c', ['a']), ('u1', 'b', ['a', 'c']),
      ('u2', 'a', []), ('u2', 'b', ['a']), ('u3', 'h', [])])
  assert _read_examples(tmp_path / 'examples' / 'Split-eval') == [
      ('u1', 'd', ['a', 'c', 'b']), ('u3', 'g', ['h'])]
  assert _read_examples(tmp_path / 'examples' / 'Split-test') == [
      ('u1', 'e', ['a', 'c', 'b', 'd']), ('u3', 'f', ['h', 'g'])]

  with open(tmp_path / 'split' / 'report.json') as f:
    report = json.load(f)
  assert report['users'] == 3 and report['interactions'] == len(INTERACTIONS)
  assert report['test_users'] == 2
  assert report['examples'] == {'train': 6, 'eval': 2, 'test': 2, 'catalog': 8, 'search': 2}
  assert examples.split_names == '["train", "eval", "test", "catalog", "search"]'

  # Fit data (train + valid): a and b twice, c d g h once; the test targets e and f are cold.
  test = {e['item_id']: e for e in _read_features(tmp_path / 'examples' / 'Split-test')}
  assert test['e']['cold_start_item'] == 'true' and test['e']['item_popularity_bucket'] == '0'
  assert test['e']['user_activity_bucket'] == '<5'
  catalog = {e['item_id']: e for e in _read_features(tmp_path / 'examples' / 'Split-catalog')}
  assert sorted(catalog) == list('abcdefgh')
  assert catalog['a']['item_text'] == 'item a' and catalog['a']['user_id'] == ''
  assert catalog['a']['item_popularity_bucket'] == '1-4'
  assert catalog['a']['cold_start_item'] == 'false' and catalog['f']['cold_start_item'] == 'true'
  search = _read_features(tmp_path / 'examples' / 'Split-search')
  assert [(e['user_id'], e['item_id'], e['history']) for e in search] == [
      ('', 'e', []), ('', 'f', [])]
  assert [e['query'] for e in search] == ['item e', 'item f']


def test_search_query_is_seeded_and_drawn_from_the_title():
  title = 'WHITE HANGING HEART T-LIGHT HOLDER'
  queries = {protocol.search_query(f'u{i}', 'x', title) for i in range(50)}
  assert len(queries) > 10
  for query in queries:
    words = query.split()
    assert 2 <= len(words) <= 3
    assert all(w in protocol.title_words(title) for w in words)
  assert protocol.search_query('u1', 'x', title) == protocol.search_query('u1', 'x', title)
  assert protocol.search_query('u1', 'x', 'LANTERN') == 'lantern'
  assert protocol.search_query('u1', 'x', '') == ''
