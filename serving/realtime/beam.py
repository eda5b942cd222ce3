"""The event transforms as Apache Beam PTransforms: Kafka or Pub/Sub in, the feature store out.

    python -m serving.realtime.beam --source kafka --bootstrap-servers broker:9092 \\
        --topic interactions --redis redis://feature-store:6379/0 \\
        --runner DataflowRunner --project ... --streaming

The same plain functions as the Redis Streams consumer (serving/realtime/events.py) do the work:
`ParseEvents` validates (invalid messages go to the `invalid` output with their reason, a dead
letter, instead of failing the pipeline), `DeduplicateEvents` keeps the earliest arrival of each
event key, and `LastNHistories` combines each user's events with `events.merge_entries`. That
merge is commutative and associative, so it is a CombineFn: Beam may combine in any order, on
any worker, pane by pane, and `WriteToFeatureStore` merges each pane into Redis with the same
function, giving the same histories as the stream consumer and as `events.last_n_histories`.

In streaming, panes fire every `--trigger-seconds` (processing time, discarding), so duplicates
are dropped within a pane; across panes a duplicate only refreshes an item's position within one
timestamp. Elements carry (raw message, sequence); the sequence breaks ties between equal
timestamps: Kafka's record timestamp or Pub/Sub's publish time (the element timestamp, in
microseconds) and the position in the message.
"""

import argparse
import json
import logging
from typing import Any, Dict, List, Optional, Tuple

import apache_beam as beam
from apache_beam.options import pipeline_options
from apache_beam.transforms import trigger
from apache_beam.transforms import window

from serving.realtime import events as ev

INVALID = 'invalid'

log = logging.getLogger('realtime.beam')


def decode_message(message: Any) -> Any:
  """The JSON payload of a message: Kafka's (key, value), Pub/Sub bytes or PubsubMessage, text.

  Raises:
    ValueError: the payload is not JSON.
  """
  if isinstance(message, tuple) and len(message) == 2:  # Kafka (key, value)
    message = message[1]
  if hasattr(message, 'data') and not isinstance(message, (bytes, str)):  # PubsubMessage
    message = message.data
  if isinstance(message, (bytes, str)):
    return json.loads(message)
  return message  # already decoded (beam.Create of dicts in tests)


class ParseEvents(beam.DoFn):
  """(message, sequence) -> (Event, sequence) pairs; invalid ones to the INVALID output."""

  def process(self, element: Tuple[Any, Tuple[int, ...]]):
    message, seq = element
    try:
      payload = decode_message(message)
    except (ValueError, UnicodeDecodeError) as e:
      yield beam.pvalue.TaggedOutput(INVALID, f'not JSON: {e}')
      return
    events, errors = ev.parse_events(payload)
    for error in errors:
      yield beam.pvalue.TaggedOutput(INVALID, str(error))
    # The position among the message's valid events breaks ties within one message.
    for position, event in enumerate(events):
      yield event, tuple(seq) + (position,)


class SequenceByTimestamp(beam.DoFn):
  """message -> (message, (element timestamp in microseconds,)): Kafka's or Pub/Sub's time."""

  def process(self, message, timestamp=beam.DoFn.TimestampParam):
    yield message, (int(timestamp.micros),)


class _Earliest(beam.CombineFn):
  """The (event, sequence) pair with the smallest sequence."""

  def create_accumulator(self):
    return None

  def add_input(self, accumulator, pair):
    return pair if accumulator is None or pair[1] < accumulator[1] else accumulator

  def merge_accumulators(self, accumulators):
    result = None
    for accumulator in accumulators:
      if accumulator is not None:
        result = self.add_input(result, accumulator)
    return result

  def extract_output(self, accumulator):
    return accumulator


class DeduplicateEvents(beam.PTransform):
  """(event, sequence) pairs -> the earliest arrival of each Event.dedup_key()."""

  def expand(self, pairs):
    return (pairs
            | 'KeyByDedupKey' >> beam.Map(lambda pair: (pair[0].dedup_key(), pair))
            | 'Earliest' >> beam.CombinePerKey(_Earliest())
            | 'Values' >> beam.Values())


class LastNCombineFn(beam.CombineFn):
  """Entries of one user's events -> their last N distinct items (events.merge_entries)."""

  def __init__(self, size: int = ev.DEFAULT_HISTORY_SIZE):
    super().__init__()
    self._size = size

  def create_accumulator(self) -> List[ev.Entry]:
    return []

  def add_input(self, accumulator, pair):
    return ev.merge_entries(accumulator, [ev.entry(*pair)], self._size)

  def add_inputs(self, accumulator, pairs):
    return ev.merge_entries(accumulator, [ev.entry(*pair) for pair in pairs], self._size)

  def merge_accumulators(self, accumulators):
    merged: List[ev.Entry] = []
    for accumulator in accumulators:
      merged = ev.merge_entries(merged, accumulator, self._size)
    return merged

  def extract_output(self, accumulator):
    return accumulator


class LastNEntries(beam.PTransform):
  """(event, sequence) pairs -> (user_id, entries): the last N distinct items with their keys."""

  def __init__(self, size: int = ev.DEFAULT_HISTORY_SIZE):
    super().__init__()
    self._size = size

  def expand(self, pairs):
    return (pairs
            | 'KeyByUser' >> beam.Map(lambda pair: (pair[0].user_id, pair))
            | 'LastN' >> beam.CombinePerKey(LastNCombineFn(self._size)))


class LastNHistories(beam.PTransform):
  """(message, sequence) -> {'histories': (user_id, [item ids, most recent last]),
  'entries': (user_id, entries), 'invalid': reasons}: parse, deduplicate, last N."""

  def __init__(self, size: int = ev.DEFAULT_HISTORY_SIZE):
    super().__init__()
    self._size = size

  def expand(self, messages):
    parsed = messages | 'Parse' >> beam.ParDo(ParseEvents()).with_outputs(INVALID, main='events')
    entries = (parsed.events
               | 'Deduplicate' >> DeduplicateEvents()
               | 'LastNEntries' >> LastNEntries(self._size))
    histories = entries | 'Items' >> beam.MapTuple(lambda user, e: (user, ev.history_items(e)))
    return {'histories': histories, 'entries': entries, 'invalid': parsed[INVALID]}


class WriteToFeatureStore(beam.DoFn):
  """(user_id, entries) -> merged into the Redis feature store (RedisFeatureStore.merge)."""

  def __init__(self, redis_url: str, size: int = ev.DEFAULT_HISTORY_SIZE, prefix: str = 'rt:'):
    super().__init__()
    self._redis_url, self._size, self._prefix = redis_url, size, prefix
    self._store = None
    self._batch: Dict[str, List[ev.Entry]] = {}

  def setup(self):
    from serving.realtime import store as store_lib  # pylint: disable=g-import-not-at-top
    self._store = store_lib.RedisFeatureStore(self._redis_url, self._size, self._prefix,
                                              timeout_s=5.0)

  def start_bundle(self):
    self._batch = {}

  def process(self, element):
    user, entries = element
    self._batch[user] = ev.merge_entries(self._batch.get(user, []), entries, self._size)
    if len(self._batch) >= 500:
      self._flush()

  def finish_bundle(self):
    self._flush()

  def _flush(self):
    if self._batch:
      self._store.merge(self._batch)
      self._batch = {}

  def teardown(self):
    if self._store is not None:
      self._store.close()


def event_source(args: argparse.Namespace) -> beam.PTransform:
  """The production read, not yet applied: ReadFromKafka or ReadFromPubSub from the flags.

  ReadFromKafka is a cross-language transform: applying it starts Beam's Java expansion
  service, so it is only applied when a pipeline is really built (not in tests).
  """
  if args.source == 'kafka':
    from apache_beam.io.kafka import ReadFromKafka  # pylint: disable=g-import-not-at-top
    return ReadFromKafka(consumer_config={'bootstrap.servers': args.bootstrap_servers,
                                          'group.id': args.consumer_group,
                                          'auto.offset.reset': 'earliest'},
                         topics=[args.topic], timestamp_policy='LogAppendTime',
                         commit_offset_in_finalize=True)
  if args.source == 'pubsub':
    from apache_beam.io import ReadFromPubSub  # pylint: disable=g-import-not-at-top
    if args.subscription:
      return ReadFromPubSub(subscription=args.subscription, id_label=args.id_label)
    return ReadFromPubSub(topic=args.topic, id_label=args.id_label)
  raise ValueError(f'unknown source {args.source!r} (kafka or pubsub)')


def build_pipeline(pipeline: beam.Pipeline, source: beam.PTransform, redis_url: str,
                   size: int = ev.DEFAULT_HISTORY_SIZE, trigger_seconds: Optional[float] = None,
                   prefix: str = 'rt:'):
  """source -> sequence -> (streaming panes) -> LastNHistories -> the Redis feature store.

  Args:
    pipeline: the pipeline to add to.
    source: a PTransform producing messages (event_source, or beam.Create in tests).
    redis_url: the feature store.
    size: N.
    trigger_seconds: in streaming, fire a pane this often (processing time, discarding).
    prefix: Redis key prefix (as the service's --prefix).

  Returns:
    LastNHistories' outputs.
  """
  messages = (pipeline
              | 'Read' >> source
              | 'Sequence' >> beam.ParDo(SequenceByTimestamp()))
  if trigger_seconds:
    messages = messages | 'Panes' >> beam.WindowInto(
        window.GlobalWindows(),
        trigger=trigger.Repeatedly(trigger.AfterProcessingTime(trigger_seconds)),
        accumulation_mode=trigger.AccumulationMode.DISCARDING)
  outputs = messages | 'LastNHistories' >> LastNHistories(size)
  _ = outputs['entries'] | 'WriteToFeatureStore' >> beam.ParDo(
      WriteToFeatureStore(redis_url, size, prefix))
  _ = outputs['invalid'] | 'LogInvalid' >> beam.Map(lambda reason: log.warning(
      'invalid event: %s', reason))
  return outputs


def parse_args(argv: Optional[List[str]] = None) -> Tuple[argparse.Namespace, List[str]]:
  parser = argparse.ArgumentParser(prog='python -m serving.realtime.beam',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('--source', choices=['kafka', 'pubsub'], required=True)
  parser.add_argument('--bootstrap-servers', help='Kafka brokers host:port,...')
  parser.add_argument('--topic', help='Kafka topic, or Pub/Sub projects/P/topics/T')
  parser.add_argument('--subscription', help='Pub/Sub projects/P/subscriptions/S')
  parser.add_argument('--consumer-group', default='realtime-histories', help='Kafka group.id')
  parser.add_argument('--id-label', help='Pub/Sub attribute with a unique message id (dedup)')
  parser.add_argument('--redis', required=True, help='redis://host:port/db feature store')
  parser.add_argument('--history-size', type=int, default=ev.DEFAULT_HISTORY_SIZE)
  parser.add_argument('--prefix', default='rt:')
  parser.add_argument('--trigger-seconds', type=float, default=1.0)
  return parser.parse_known_args(argv)


def main(argv: Optional[List[str]] = None):
  args, beam_args = parse_args(argv)
  options = pipeline_options.PipelineOptions(beam_args)
  options.view_as(pipeline_options.StandardOptions).streaming = True
  with beam.Pipeline(options=options) as pipeline:
    build_pipeline(pipeline, event_source(args), args.redis, args.history_size,
                   args.trigger_seconds, args.prefix)


if __name__ == '__main__':
  logging.basicConfig(level=logging.INFO)
  main()
