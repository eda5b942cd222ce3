"""Interaction events (the data contract's fields) and the transforms applied to them.

Every function here is plain Python on plain values, so that the Redis Streams consumer
(serving/realtime/stream.py), the embedded store and the Beam pipeline (serving/realtime/beam.py)
run the same code:

- `parse_event`: one JSON object or stream entry -> an `Event`, or `EventError` with a one-line
  reason naming the field.
- `Event.dedup_key`: the client's `event_id` when it sends one, else (user, item, timestamp,
  event_type); `deduplicate` keeps the first arrival of each key.
- `merge_entries`: a user's recent distinct items. Each item is kept once, at its latest
  interaction, ordered by (timestamp, arrival sequence), and only the last N are kept. This
  merge is commutative, associative and idempotent (the top N of each item's latest key), so the
  result does not depend on the order in which events arrive, on batching, or on a replay after
  a crash, and it needs no state beyond the N entries: that is what lets a stream consumer, a
  Beam combiner and a batch recomputation agree exactly.

Offline, the evaluation protocol (docs/contracts.md §2) orders a user's distinct items by their
*first* occurrence; online, an item the user comes back to becomes recent again. Both hold the
same set of items (until the cap N applies); only the position of a repeated item differs.
"""

import dataclasses
import datetime
import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from contract import data as contract

EVENT_TYPES = contract.EVENT_TYPES
DEFAULT_EVENT_TYPE = 'purchase'
FIELDS = contract.INTERACTION_COLUMNS + ('event_id',)
REQUIRED = contract.INTERACTION_REQUIRED
MAX_ID_LENGTH = 256
MAX_QUERY_LENGTH = 1024
DEFAULT_HISTORY_SIZE = 50  # as the train examples' history (trainers/features.MAX_TRAIN_HISTORY)
# The file contract's ranges: timestamps outside them are a producer's bug (milliseconds sent as
# seconds, a sign error) and would pin the event at the start or end of a user's history forever.
MIN_TIMESTAMP = contract.MIN_TIMESTAMP
MAX_TIMESTAMP = contract.MAX_TIMESTAMP
MAX_QUANTITY = contract.MAX_QUANTITY

# (timestamp, sequence, item_id): one item of a user's history, at its latest interaction. The
# sequence breaks ties between equal timestamps (the items of one invoice) by arrival order: the
# Redis stream entry id, the Kafka offset, a row index (docs/contracts.md §1: row order
# breaks ties).
Entry = Tuple[int, Tuple[int, ...], str]
Sequenced = Tuple['Event', Tuple[int, ...]]

# ASCII digits only (str.isdigit, int() and \d also take '²' or Arabic-Indic digits): the file
# contract's number grammar.
_INTEGER = re.compile(contract.INTEGER_PATTERN)
_NUMBER = re.compile(contract.NUMBER_PATTERN)
_TIMESTAMP_HINT = 'expected int64 unix seconds or an ISO-8601 date-time'
_TIMESTAMP_RANGE = (f'outside the accepted range {MIN_TIMESTAMP} <= unix seconds < '
                    f'{MAX_TIMESTAMP} (1970-01-01 to 2100-01-01 UTC)')


class EventError(ValueError):
  """An event does not follow the data contract; the message is one line naming the field."""

  def __init__(self, field: str, message: str, index: Optional[int] = None):
    prefix = '' if index is None else f'event {index}: '
    super().__init__(f"{prefix}field '{field}': {message}")
    self.field = field
    self.reason = message
    self.index = index


@dataclasses.dataclass(frozen=True)
class Event:
  """One validated interaction event.

  Attributes:
    user_id: the user.
    item_id: the item.
    timestamp: unix seconds.
    event_type: one of EVENT_TYPES.
    quantity: a positive integer.
    query: the search text that led to the event, '' for none.
    event_id: the client's id of the event, '' for none (then the fields are the identity).
  """
  user_id: str
  item_id: str
  timestamp: int
  event_type: str = DEFAULT_EVENT_TYPE
  quantity: int = 1
  query: str = ''
  event_id: str = ''

  def dedup_key(self) -> str:
    """The identity duplicates share: the client's event id, else user, item, time and type."""
    if self.event_id:
      return 'id\x1f' + self.event_id
    return '\x1f'.join(('ev', self.user_id, self.item_id, str(self.timestamp), self.event_type))

  def to_fields(self) -> Dict[str, str]:
    """The event as flat string fields (a Redis stream entry, a CSV row)."""
    fields = {'user_id': self.user_id, 'item_id': self.item_id,
              'timestamp': str(self.timestamp), 'event_type': self.event_type,
              'quantity': str(self.quantity), 'query': self.query}
    if self.event_id:
      fields['event_id'] = self.event_id
    return fields

  def to_json(self) -> Dict[str, Any]:
    """The event as a JSON object of the data contract (timestamp and quantity as numbers)."""
    value = dataclasses.asdict(self)
    if not self.event_id:
      del value['event_id']
    return value


def _in_range(seconds: int, value: Any) -> int:
  if not MIN_TIMESTAMP <= seconds < MAX_TIMESTAMP:
    raise EventError('timestamp', f'{contract.shown(value)} is {_TIMESTAMP_RANGE}')
  return seconds


def parse_timestamp(value: Any) -> int:
  """Unix seconds from an int, a numeric string or an ISO-8601 date-time (naive means UTC).

  Agrees with contract.data.parse_timestamps, which reads the same field from files:
  fractional seconds are truncated. Numbers are ASCII digits with at most one sign; the result
  must lie in [MIN_TIMESTAMP, MAX_TIMESTAMP) (1970-01-01 to 2100-01-01 UTC).

  Raises:
    EventError: for anything else (never another exception, whatever the value).
  """
  unparsable = EventError('timestamp', f'cannot parse {contract.shown(value)} ({_TIMESTAMP_HINT})')
  if isinstance(value, bool):
    raise unparsable
  if isinstance(value, int):
    return _in_range(value, value)
  if isinstance(value, float):
    if not math.isfinite(value):
      raise EventError('timestamp', f'{contract.shown(value)} is not a finite number '
                       f'({_TIMESTAMP_HINT})')
    return _in_range(int(value), value)
  if not isinstance(value, str):
    raise unparsable
  text = value.strip()
  if not text.isascii():
    raise unparsable
  if _INTEGER.fullmatch(text):
    if len(text.lstrip('+-').lstrip('0')) > 30:  # far out of range (int() refuses 4300 digits)
      raise EventError('timestamp', f'{contract.shown(value)} is {_TIMESTAMP_RANGE}')
    return _in_range(int(text), value)
  if _NUMBER.fullmatch(text):
    number = float(text)
    if not math.isfinite(number):  # '1e400'
      raise EventError('timestamp', f'{contract.shown(value)} is not a finite number '
                       f'({_TIMESTAMP_HINT})')
    return _in_range(int(number), value)
  if text.endswith(('Z', 'z')):  # Python 3.10's fromisoformat does not read the Z suffix
    text = text[:-1] + '+00:00'
  try:
    parsed = datetime.datetime.fromisoformat(text)
    if parsed.tzinfo is None:
      parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    seconds = int(parsed.timestamp())
  except (ValueError, OverflowError, OSError):
    raise unparsable from None
  return _in_range(seconds, value)


def _text(raw: Mapping[str, Any], field: str, required: bool, limit: int) -> str:
  value = raw.get(field)
  if value is None:
    if required:
      raise EventError(field, 'required')
    return ''
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise EventError(field, f'expected a string, got {type(value).__name__} '
                     f'{contract.shown(value)}')
  if isinstance(value, int) and abs(value) >= 10**limit:  # str() refuses over 4300 digits
    raise EventError(field, f'longer than {limit} characters')
  text = str(value).strip()
  if not text.isascii():
    try:
      text.encode()
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8
      raise EventError(field, 'not valid UTF-8') from None
  if required and not text:
    raise EventError(field, 'must not be empty')
  if len(text) > limit:
    raise EventError(field, f'longer than {limit} characters')
  return text


def _quantity(value: Any) -> int:
  """A positive integer <= MAX_QUANTITY from an int, an integral float or ASCII digits."""
  if value is None or value == '':
    return 1
  number = None
  if isinstance(value, bool):
    pass
  elif isinstance(value, int):
    number = value
  elif isinstance(value, float) and value.is_integer():  # False for inf and nan
    number = int(value)
  elif isinstance(value, str):
    text = value.strip()
    if text.isascii() and _INTEGER.fullmatch(text):
      short = len(text.lstrip('+-').lstrip('0')) <= 30  # int() refuses 4300 digits
      number = int(text) if short else (-1 if text.startswith('-') else MAX_QUANTITY + 1)
  if number is None or number <= 0:
    raise EventError('quantity', f'expected a positive integer, got {contract.shown(value)}')
  if number > MAX_QUANTITY:
    raise EventError('quantity', f'expected a positive integer at most {MAX_QUANTITY}, got '
                     f'{contract.shown(value)}')
  return number


def _decoded(value: Any, field: str) -> Any:
  if not isinstance(value, bytes):
    return value
  try:
    return value.decode()
  except UnicodeDecodeError:
    raise EventError(field, 'not valid UTF-8') from None


def parse_event(raw: Any) -> Event:
  """Validates one event: a JSON object or a stream entry's fields (bytes are decoded).

  Required: user_id, item_id (strings; JSON numbers are taken as their digits), timestamp.
  Optional: event_type (default purchase), quantity (default 1), query (default ''),
  event_id. Other fields are ignored, so producers can add some.

  Raises:
    EventError: with a one-line reason naming the field.
  """
  if not isinstance(raw, Mapping):
    raise EventError('event', f'expected a JSON object, got {type(raw).__name__}')
  if any(isinstance(k, bytes) or isinstance(v, bytes) for k, v in raw.items()):
    fields = {}
    for key, value in raw.items():
      key = _decoded(key, 'event')
      fields[key] = _decoded(value, str(key)[:MAX_ID_LENGTH])
    raw = fields
  user_id = _text(raw, 'user_id', True, MAX_ID_LENGTH)
  item_id = _text(raw, 'item_id', True, MAX_ID_LENGTH)
  if raw.get('timestamp') is None or raw.get('timestamp') == '':
    raise EventError('timestamp', f'required ({_TIMESTAMP_HINT})')
  timestamp = parse_timestamp(raw['timestamp'])
  event_type = _text(raw, 'event_type', False, MAX_ID_LENGTH) or DEFAULT_EVENT_TYPE
  if event_type not in EVENT_TYPES:
    raise EventError('event_type', f'{event_type!r} is not one of {"/".join(EVENT_TYPES)}')
  return Event(user_id=user_id, item_id=item_id, timestamp=timestamp, event_type=event_type,
               quantity=_quantity(raw.get('quantity')),
               query=_text(raw, 'query', False, MAX_QUERY_LENGTH),
               event_id=_text(raw, 'event_id', False, MAX_ID_LENGTH))


def parse_events(payload: Any, max_events: int = 1000) -> Tuple[List[Event], List[EventError]]:
  """Validates one event (a JSON object) or a batch (a JSON list of them).

  Returns:
    (the valid events, the errors); a batch's errors carry the event's index in the list.
  """
  if isinstance(payload, Mapping):
    try:
      return [parse_event(payload)], []
    except EventError as e:
      return [], [e]
  if not isinstance(payload, list):
    return [], [EventError('event', f'expected a JSON object or a list of them, got '
                           f'{type(payload).__name__}')]
  if not payload:
    return [], [EventError('event', 'the list of events is empty')]
  if len(payload) > max_events:
    return [], [EventError('event', f'{len(payload)} events in one request, at most '
                           f'{max_events}')]
  parsed, errors = [], []
  for index, raw in enumerate(payload):
    try:
      parsed.append(parse_event(raw))
    except EventError as e:
      errors.append(EventError(e.field, e.reason, index))
  return parsed, errors


def deduplicate(events: Iterable[Sequenced], seen: Iterable[str] = ()) -> Tuple[List[Sequenced],
                                                                              int]:
  """Drops repeated events, keeping the earliest arrival (smallest sequence) of each key.

  Args:
    events: (event, sequence) pairs in any order.
    seen: keys already applied earlier (the store's dedup window).

  Returns:
    (the kept pairs in sequence order, the number of duplicates dropped).
  """
  first: Dict[str, Sequenced] = {}
  total = 0
  for event, seq in events:
    total += 1
    key = event.dedup_key()
    if key not in first or seq < first[key][1]:
      first[key] = (event, seq)
  already = set(seen)
  kept = sorted((pair for key, pair in first.items() if key not in already), key=lambda p: p[1])
  return kept, total - len(kept)


def entry(event: Event, seq: Tuple[int, ...]) -> Entry:
  """The history entry an event gives its item."""
  return (event.timestamp, tuple(seq), event.item_id)


def merge_entries(entries: Iterable[Entry], new: Iterable[Entry], size: int) -> List[Entry]:
  """A user's last `size` distinct items: each at its latest (timestamp, sequence), oldest first.

  Commutative, associative and idempotent, so any arrival order, batching or replay gives the
  same history.
  """
  latest: Dict[str, Entry] = {}
  for item_entry in list(entries) + list(new):
    current = latest.get(item_entry[2])
    if current is None or item_entry[:2] > current[:2]:
      latest[item_entry[2]] = item_entry
  return sorted(latest.values())[-size:] if size > 0 else []


def history_items(entries: Sequence[Entry]) -> List[str]:
  """The model's `history` input from entries: item ids, most recent last."""
  return [item for _, _, item in entries]


def last_n_histories(events: Iterable[Sequenced], size: int = DEFAULT_HISTORY_SIZE
                    ) -> Dict[str, List[str]]:
  """Deduplicates (event, sequence) pairs and gives each user's last `size` distinct items.

  This is the reference the stream consumer and the Beam pipeline are checked against.
  """
  kept, _ = deduplicate(events)
  per_user: Dict[str, List[Entry]] = {}
  for event, seq in kept:
    per_user.setdefault(event.user_id, []).append(entry(event, seq))
  return {user: history_items(merge_entries([], user_entries, size))
          for user, user_entries in per_user.items()}


def encode_entry(item_entry: Entry) -> str:
  """An entry's (timestamp, sequence) as text, for a Redis hash (item_id is the hash field)."""
  return ' '.join(str(part) for part in (item_entry[0],) + item_entry[1])


def decode_entry(item_id: str, text: str) -> Entry:
  """The inverse of encode_entry."""
  numbers = [int(part) for part in text.split()]
  return (numbers[0], tuple(numbers[1:]), item_id)


def stream_sequence(entry_id: str) -> Tuple[int, int]:
  """A Redis stream entry id `<ms>-<n>` as a sequence (arrival order)."""
  ms, _, n = entry_id.partition('-')
  return (int(ms), int(n or 0))
