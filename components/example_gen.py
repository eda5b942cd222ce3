"""SequenceExampleGen: contract files -> per-user sequence tf.Examples in protocol splits.

A TFX ExampleGen with a custom executor (ComponentSpec + BaseBeamExecutor, as in
tfx/examples/custom_components). It validates the interactions and items files
(contract.data), groups interactions per user in Beam, applies the evaluation protocol of
docs/contracts.md §2 (contract.protocol) and writes:

- `examples`: one Split-<name> per trainers.features.SPLITS, gzipped TFRecords of tf.Example
  with the features of trainers.features. Train holds one example per training-history
  position (the target and up to MAX_TRAIN_HISTORY previous distinct items); eval holds each
  evaluated user's validation target with the whole training history; test holds the test
  target with the whole history before it (training history + validation item); catalog holds
  one example per item of the items file (its text, no user); search holds each test target
  as a search request (no user, no history, contract.protocol.search_query's query). Every
  example carries the slicing features (user activity, target popularity in the fit data,
  cold start).
- `split`: train.csv / valid.csv / test.csv (`user_id,item_id`, users sorted, each user's items
  in sequence order), items.csv (the validated catalog) and report.json (counts, bad rows).
"""

import csv
import io
import json
import os
from typing import Any, Dict, Iterable, Iterator, List, Tuple

import apache_beam as beam
import tensorflow as tf
from tfx import types
from tfx.components.util import examples_utils
from tfx.dsl.components.base import base_beam_component
from tfx.dsl.components.base import base_beam_executor
from tfx.dsl.components.base import executor_spec
from tfx.proto import example_gen_pb2
from tfx.types import artifact_utils
from tfx.types import component_spec
from tfx.types import standard_artifacts

from contract import data as contract
from contract import protocol
from evaluation import artifacts
from trainers import features

_COUNTER_NAMESPACE = 'SequenceExampleGen'


class SplitExport(types.Artifact):
  """The exported split (CSV), the validated catalog and the data report."""
  # '<namespace>.<Name>': the form Kubeflow Pipelines v2 requires of custom artifact types.
  TYPE_NAME = 'recommender.SplitExport'


class SequenceExampleGenSpec(types.ComponentSpec):
  """Spec of SequenceExampleGen."""
  PARAMETERS = {
      'interactions': component_spec.ExecutionParameter(type=str),
      'items': component_spec.ExecutionParameter(type=str),
      # Content fingerprint of both files, so that the cache notices changed data under an
      # unchanged path.
      'input_fingerprint': component_spec.ExecutionParameter(type=str),
  }
  INPUTS = {}
  OUTPUTS = {
      'examples': component_spec.ChannelParameter(type=standard_artifacts.Examples),
      'split': component_spec.ChannelParameter(type=SplitExport),
  }


def _bytes(values: List[str]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))


# Slice buckets: (exclusive upper bound or None, name), by history length and by fit count.
ACTIVITY_BUCKETS = ((5, '<5'), (20, '5-19'), (50, '20-49'), (None, '50+'))
POPULARITY_BUCKETS = ((1, '0'), (5, '1-4'), (20, '5-19'), (100, '20-99'), (None, '100+'))
NO_USER = 'no user'  # the activity slice of catalog and search examples


def bucket(value: int, buckets) -> str:
  """The name of the bucket `value` falls in."""
  for upper, name in buckets:
    if upper is None or value < upper:
      return name
  raise AssertionError('the last bucket has no upper bound')


def _example(user: str, item: str, timestamp: int, query: str, history: List[str],
             fit_count: int, item_text: str = '', activity: str = '') -> bytes:
  """One tf.Example with every feature (all splits share one schema)."""
  return tf.train.Example(features=tf.train.Features(feature={
      features.USER_ID: _bytes([user]),
      features.ITEM_ID: _bytes([item]),
      features.HISTORY: _bytes(history),
      features.QUERY: _bytes([query]),
      features.TIMESTAMP: tf.train.Feature(int64_list=tf.train.Int64List(value=[timestamp])),
      features.ITEM_TEXT: _bytes([item_text]),
      features.USER_ACTIVITY: _bytes([activity or bucket(len(history), ACTIVITY_BUCKETS)]),
      features.ITEM_POPULARITY: _bytes([bucket(fit_count, POPULARITY_BUCKETS)]),
      features.COLD_START: _bytes(['true' if fit_count == 0 else 'false']),
  })).SerializeToString()


def item_text(row: Dict[str, str]) -> str:
  """The text the item tower reads: title, description, category and brand, non-empty ones."""
  return ' . '.join(row[c] for c in ('title', 'description', 'category', 'brand') if row[c])


def _split_user(keyed: Tuple[str, Iterable[protocol.Event]]) -> Tuple[str, protocol.UserSplit]:
  user, events = keyed
  return user, protocol.split_user(events)


def _fit_items(keyed: Tuple[str, protocol.UserSplit]) -> Iterator[Tuple[str, int]]:
  """(item, 1) for each of a user's fit items: training history and validation target."""
  _, split = keyed
  fit = split.n_train + (1 if split.valid is not None else 0)
  for item, _, _ in split.sequence[:fit]:
    yield item, 1


def _examples(keyed: Tuple[str, protocol.UserSplit], fit_counts: Dict[str, int],
              titles: Dict[str, str]) -> Iterator[Tuple[str, bytes]]:
  """Yields (split name, serialized tf.Example) for one user."""
  user, split = keyed
  items = [item for item, _, _ in split.sequence]

  def example(position, history, **kwargs):
    item, timestamp, query = split.sequence[position]
    return _example(user, item, timestamp, query, history, fit_counts.get(item, 0), **kwargs)

  for position in range(split.n_train):
    history = items[max(0, position - features.MAX_TRAIN_HISTORY):position]
    yield features.TRAIN_SPLIT, example(position, history)
  for name, position in ((features.EVAL_SPLIT, split.valid), (features.TEST_SPLIT, split.test)):
    if position is not None:
      beam.metrics.Metrics.counter(_COUNTER_NAMESPACE, name).inc()
      yield name, example(position, items[:position])
  if split.test is not None:
    target = items[split.test]
    beam.metrics.Metrics.counter(_COUNTER_NAMESPACE, features.SEARCH_SPLIT).inc()
    yield features.SEARCH_SPLIT, _example(
        '', target, split.sequence[split.test][1],
        protocol.search_query(user, target, titles.get(target, '')), [],
        fit_counts.get(target, 0), activity=NO_USER)
  beam.metrics.Metrics.counter(_COUNTER_NAMESPACE, features.TRAIN_SPLIT).inc(split.n_train)


def _catalog_example(row: Dict[str, str], fit_counts: Dict[str, int]) -> bytes:
  beam.metrics.Metrics.counter(_COUNTER_NAMESPACE, features.CATALOG_SPLIT).inc()
  return _example('', row['item_id'], 0, '', [], fit_counts.get(row['item_id'], 0),
                  item_text=item_text(row), activity=NO_USER)


def _csv_rows(keyed: Tuple[str, protocol.UserSplit]) -> Iterator[Tuple[str, Tuple[str, str]]]:
  """Yields (split name, one user's CSV rows), the user's rows in sequence order."""
  user, split = keyed
  items = [item for item, _, _ in split.sequence]
  yield features.TRAIN_SPLIT, (user, _csv_text([(user, i) for i in items[:split.n_train]]))
  for name, position in ((features.EVAL_SPLIT, split.valid), (features.TEST_SPLIT, split.test)):
    if position is not None:
      yield name, (user, _csv_text([(user, items[position])]))


def _csv_text(rows: List[Tuple[str, str]]) -> str:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator='\n').writerows(rows)
  return buffer.getvalue()


class _WriteSplitCsv(beam.PTransform):
  """Writes one split's rows as a CSV, users sorted so that two runs diff cleanly."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def expand(self, rows):
    def write(all_rows):
      with tf.io.gfile.GFile(self._path, 'w') as f:
        f.write('user_id,item_id\n')
        for _, text in sorted(all_rows):
          f.write(text)
    return (rows
            | 'Gather' >> beam.combiners.ToList()
            | 'Write' >> beam.Map(write))


class Executor(base_beam_executor.BaseBeamExecutor):
  """Validates the contract files and writes the protocol splits with Beam."""

  def Do(self, input_dict: Dict[str, List[types.Artifact]],
         output_dict: Dict[str, List[types.Artifact]],
         exec_properties: Dict[str, Any]) -> None:
    data = contract.read_contract(exec_properties['interactions'], exec_properties['items'])
    examples = artifact_utils.get_single_instance(output_dict['examples'])
    examples.split_names = artifact_utils.encode_split_names(list(features.SPLITS))
    examples_utils.set_file_format(examples, 'tfrecords_gzip')
    examples_utils.set_payload_format(examples, example_gen_pb2.PayloadFormat.FORMAT_TF_EXAMPLE)
    split_dir = artifact_utils.get_single_uri(output_dict['split'])
    tf.io.gfile.makedirs(split_dir)

    inter = data.interactions
    events = zip(inter['user_id'], zip(inter['timestamp'].tolist(),
                                       inter[contract.ROW_INDEX].tolist(),
                                       inter['item_id'], inter['query']))
    pipeline = self._make_beam_pipeline()
    splits = (pipeline
              | 'Create' >> beam.Create(list(events), reshuffle=False)
              | 'GroupByUser' >> beam.GroupByKey()
              | 'Split' >> beam.Map(_split_user))
    fit_counts = beam.pvalue.AsDict(splits
                                    | 'FitItems' >> beam.FlatMap(_fit_items)
                                    | 'CountFitItems' >> beam.CombinePerKey(sum))
    titles = dict(zip(data.items['item_id'], data.items['title']))
    user_examples = splits | 'Examples' >> beam.FlatMap(_examples, fit_counts, titles)
    catalog = (pipeline
               | 'CreateCatalog' >> beam.Create(data.items.to_dict('records'), reshuffle=False)
               | 'CatalogExamples' >> beam.Map(_catalog_example, fit_counts)
               | 'TagCatalog' >> beam.Map(lambda e: (features.CATALOG_SPLIT, e)))
    tagged = (user_examples, catalog) | 'AllExamples' >> beam.Flatten()
    csv_rows = splits | 'CsvRows' >> beam.FlatMap(_csv_rows)
    for name in features.SPLITS:
      (tagged
       | f'Select[{name}]' >> beam.Filter(lambda kv, n=name: kv[0] == n)
       | f'Values[{name}]' >> beam.Values()
       | f'Write[{name}]' >> beam.io.WriteToTFRecord(
           os.path.join(artifact_utils.get_split_uri([examples], name), 'data_tfrecord'),
           file_name_suffix='.gz'))
    for name in artifacts.SPLIT_FILES:
      (csv_rows
       | f'CsvSelect[{name}]' >> beam.Filter(lambda kv, n=name: kv[0] == n)
       | f'CsvValues[{name}]' >> beam.Values()
       | f'CsvWrite[{name}]' >> _WriteSplitCsv(os.path.join(split_dir, artifacts.SPLIT_FILES[name])))
    result = pipeline.run()
    result.wait_until_finish()

    example_counts = {}
    for name in features.SPLITS:
      counters = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(
          _COUNTER_NAMESPACE).with_name(name))['counters']
      example_counts[name] = int(sum(c.committed or c.attempted or 0 for c in counters))
    with tf.io.gfile.GFile(os.path.join(split_dir, artifacts.ITEMS_FILE), 'w') as f:
      data.items.to_csv(f, index=False)
    report = {
        'users': int(inter['user_id'].nunique()),
        'items': int(inter['item_id'].nunique()),
        'interactions': int(len(inter)),
        'test_users': example_counts[features.TEST_SPLIT],
        'catalog_items': int(len(data.items)),
        'examples': example_counts,
        'bad_rows': data.bad_rows,
    }
    with tf.io.gfile.GFile(os.path.join(split_dir, artifacts.SPLIT_REPORT_FILE), 'w') as f:
      json.dump(report, f, indent=2, sort_keys=True)


class SequenceExampleGen(base_beam_component.BaseBeamComponent):
  """ExampleGen for the data contract with the leave-last-out protocol splits."""

  SPEC_CLASS = SequenceExampleGenSpec
  EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

  def __init__(self, interactions: str, items: str, input_fingerprint: str = ''):
    """Creates the component.

    Args:
      interactions: Path or URI of the interactions file (CSV or Parquet).
      items: Path or URI of the items file (CSV or Parquet).
      input_fingerprint: Fingerprint of the files' contents, for the cache.
    """
    super().__init__(spec=SequenceExampleGenSpec(
        interactions=interactions, items=items, input_fingerprint=input_fingerprint,
        examples=types.Channel(type=standard_artifacts.Examples),
        split=types.Channel(type=SplitExport)))
