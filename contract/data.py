"""Reading and validating the data contract (docs/contracts.md §1): interactions and items.

Structural problems (a missing file, an empty file, a missing required or a duplicated column,
an unparsable or out-of-range timestamp) raise `DataError` with one line naming the file, the
row and the column. Rows with bad values (an empty id, an unknown event type, a quantity that is
not a positive integer, not finite or above the int64 maximum, an item without a title, a
duplicated item) are dropped, but counted per reason and reported, never silently.
"""

import collections
import csv
import dataclasses
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np
import pandas as pd

INTERACTION_COLUMNS = ('user_id', 'item_id', 'timestamp', 'event_type', 'quantity', 'query')
INTERACTION_REQUIRED = ('user_id', 'item_id', 'timestamp')
ITEM_COLUMNS = ('item_id', 'title', 'description', 'category', 'brand', 'price')
ITEM_REQUIRED = ('item_id', 'title')
EVENT_TYPES = ('view', 'click', 'add_to_cart', 'purchase')

# Column that carries each interaction's position in its file; Beam keeps no order, and row
# order breaks timestamp ties (docs/contracts.md §1).
ROW_INDEX = 'row_index'

# Accepted timestamps: MIN_TIMESTAMP <= unix seconds < MAX_TIMESTAMP, from 1970-01-01 up to
# (excluding) 2100-01-01T00:00:00Z; fractional seconds are truncated. Anything outside is a
# producer's bug (milliseconds sent as seconds, a sign error, an overflow).
MIN_TIMESTAMP = 0
MAX_TIMESTAMP = 4_102_444_800  # 2100-01-01T00:00:00Z
# Accepted quantities: 1 <= quantity <= MAX_QUANTITY (the largest int64).
MAX_QUANTITY = 2**63 - 1

TIMESTAMP_HINT = ('expected int64 unix seconds or an ISO-8601 date-time '
                  'YYYY-MM-DD[THH:MM[:SS[.fff]]][Z|+HH:MM], '
                  'from 1970-01-01 up to 2100-01-01 UTC')

# Reasons for dropped interactions with a bad quantity (keys of ContractData.bad_rows).
QUANTITY_NOT_POSITIVE_INTEGER = 'interactions: quantity not a positive integer'
QUANTITY_NOT_FINITE = 'interactions: quantity not finite (nan/inf)'
QUANTITY_TOO_LARGE = 'interactions: quantity above the int64 maximum'

# ASCII digits only: \d also takes Arabic-Indic digits. serving/realtime/events.py reads stream
# entries with the same grammar.
INTEGER_PATTERN = r'[+-]?[0-9]+'
NUMBER_PATTERN = r'[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?'
_NON_FINITE = r'(?i:[+-]?(?:nan|inf|infinity))'
# YYYY-MM-DD, optionally a time (HH:MM, seconds and their fraction optional) with an optional
# zone (Z, +HH, +HHMM or +HH:MM). Never day-first or month-first.
_ISO_DATETIME = re.compile(
    r'^(?P<date>(?P<year>[0-9]{4})-[0-9]{2}-[0-9]{2})'
    r'(?:[Tt ](?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})'
    r'(?::(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?)?'
    r'(?P<zone>[Zz]|(?P<sign>[+-])(?P<zone_hour>[0-9]{2})(?::?(?P<zone_minute>[0-9]{2}))?)?)?$')
_MAX_SHOWN = 40


class DataError(ValueError):
  """A user's input file does not follow the data contract; the message is one line."""


@dataclasses.dataclass
class ContractData:
  """Validated contract data.

  Attributes:
    interactions: Columns of INTERACTION_COLUMNS plus ROW_INDEX; timestamp as int64 seconds.
    items: Columns of ITEM_COLUMNS, one row per item_id.
    bad_rows: '<file kind>: <reason>' -> number of rows dropped for that reason.
  """
  interactions: pd.DataFrame
  items: pd.DataFrame
  bad_rows: Dict[str, int]


def _read_table(path: str, kind: str, columns, required) -> pd.DataFrame:
  """Reads a CSV or Parquet file as strings, with the optional columns filled in."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: {kind} file not found')
  if os.path.getsize(path) == 0:
    raise DataError(f'{path}: file is empty (expected a header row naming the columns '
                    f'{", ".join(required)} and at least one data row)')
  is_parquet = path.endswith('.parquet') or path.endswith('.pq')
  try:
    if is_parquet:
      frame = pd.read_parquet(path).astype(str)
      # Parquet nulls become the string 'None' / 'nan' after astype(str); the contract's
      # optional values are empty strings instead.
      frame = frame.replace({'None': '', 'nan': '', '<NA>': ''})
    else:
      frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
  except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as err:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise DataError(f'{path}: cannot read as {kind} CSV/Parquet: {first_line}') from None
  # pandas renames a repeated CSV column 'x' to 'x.1', so the names come from the raw header.
  names = [str(c) for c in frame.columns] if is_parquet else _csv_header(path)
  _check_unique_columns(path, [name.strip() for name in names])
  frame.columns = [str(c).strip() for c in frame.columns]
  _check_unique_columns(path, list(frame.columns))  # in case pandas read the header otherwise
  for column in required:
    if column not in frame.columns:
      raise DataError(f'{path}, row 1 (header): missing required column {column!r} '
                      f'(found: {", ".join(frame.columns) or "none"})')
  if frame.empty:
    raise DataError(f'{path}: file has a header but no data rows')
  for column in columns:
    if column not in frame.columns:
      frame[column] = ''
  return frame[list(columns)].copy()


def _csv_header(path: str) -> List[str]:
  """The column names of a CSV file's header as written (its first row that is not blank)."""
  with open(path, newline='', encoding='utf-8-sig', errors='replace') as f:
    for row in csv.reader(f):
      if any(cell.strip() for cell in row):
        return row
  return []


def _check_unique_columns(path: str, names: List[str]):
  """Raises DataError naming the first column name that the header repeats (empty ones aside)."""
  counts = collections.Counter(name for name in names if name)
  for name in names:
    if counts[name] > 1:
      raise DataError(f'{path}, row 1 (header): duplicated column {shown(name)}, '
                      f'{counts[name]} times (expected each column name once)')


def shown(value) -> str:
  """The value's repr for an error message: one line, at most about _MAX_SHOWN characters."""
  if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
    return f'an integer of {value.bit_length()} bits'  # repr fails beyond 4300 digits
  text = repr(value)
  return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + '...'


def _row_label(path: str, position: int) -> str:
  """Names a data row as a user sees it: the line number in a CSV (header is line 1)."""
  if path.endswith('.parquet') or path.endswith('.pq'):
    return f'row {position + 1}'
  return f'line {position + 2}'


def parse_timestamps(values: pd.Series, path: str) -> pd.Series:
  """Parses int64 unix seconds or ISO-8601 date-times; the first bad value is a DataError.

  A number (ASCII digits, an optional fraction or exponent) is unix seconds; a date-time is
  YYYY-MM-DD with an optional time and zone (naive means UTC), never read day- or month-first.
  Fractional seconds are truncated. Every timestamp must lie in [MIN_TIMESTAMP, MAX_TIMESTAMP).

  Args:
    values: The timestamp column, as strings.
    path: The file they come from, for the error message.

  Returns:
    int64 unix seconds, with the index of `values`.

  Raises:
    DataError: naming the first row whose value cannot be parsed or is out of range, with the
      number of such rows.
  """
  stripped = values.astype(str).str.strip()
  seconds = pd.Series(np.nan, index=values.index, dtype='float64')
  numeric = stripped.str.fullmatch(NUMBER_PATTERN)
  if numeric.any():
    # float() is exact up to 2**53 and monotonic beyond, so the range check below is exact.
    seconds[numeric] = stripped[numeric].astype('float64')
  dated = ~numeric & stripped.str.match(_ISO_DATETIME.pattern)
  if dated.any():
    seconds[dated] = _iso_seconds(stripped[dated])
  parsed = ~seconds.isna()
  # Truncated toward zero, as int() and serving/realtime/events.py do; inf stays inf.
  seconds = np.trunc(seconds)
  in_range = parsed & (seconds >= MIN_TIMESTAMP) & (seconds < MAX_TIMESTAMP)
  bad = ~in_range
  if bad.any():
    position = int(bad.to_numpy().nonzero()[0][0])
    value = shown(values.iloc[position])
    problem = (f'{value} is outside the accepted range {MIN_TIMESTAMP} <= unix seconds < '
               f'{MAX_TIMESTAMP}' if parsed.iloc[position] else f'cannot parse {value}')
    raise DataError(f'{path}, {_row_label(path, position)}, column \'timestamp\': {problem} '
                    f'({TIMESTAMP_HINT}); {int(bad.sum())} row(s) with a bad timestamp in '
                    f'the file')
  return seconds.astype('int64')


def _iso_seconds(values: pd.Series) -> pd.Series:
  """Unix seconds (float) of ISO-8601 strings matching _ISO_DATETIME; NaN for invalid dates."""
  parts = values.str.extract(_ISO_DATETIME.pattern)
  year = parts['year'].astype('int64')
  # Years far from the accepted range are out of range whatever the zone (they would also
  # overflow pandas' nanosecond timestamps): 1900 stands for all of them.
  clock = (parts['hour'].fillna('00') + ':' + parts['minute'].fillna('00') + ':'
           + parts['second'].fillna('00'))
  date = parts['date'].where((year >= 1900) & (year < 2200), '1900-01-01')
  naive = pd.to_datetime(date + ' ' + clock, format='%Y-%m-%d %H:%M:%S', errors='coerce')
  seconds = (naive - pd.Timestamp('1970-01-01')).dt.total_seconds()
  fraction = ('0.' + parts['fraction'].fillna('0').str.slice(0, 6)).astype('float64')
  zone_hour = parts['zone_hour'].fillna('0').astype('int64')
  zone_minute = parts['zone_minute'].fillna('0').astype('int64')
  offset = (zone_hour * 3600 + zone_minute * 60) * parts['sign'].map({'+': 1, '-': -1}).fillna(0)
  valid_zone = (zone_hour < 24) & (zone_minute < 60)
  return (seconds + fraction - offset).where(valid_zone)


def parse_quantities(values: pd.Series) -> Tuple[pd.Series, pd.Series]:
  """Reads the quantity column: a positive integer up to MAX_QUANTITY, empty meaning 1.

  An integer is read exactly (ASCII digits, an optional sign); a number with a fraction or an
  exponent counts when its value is integral ('2.0', '1e3'). Nothing is clipped or wrapped.

  Args:
    values: The quantity column, as strings.

  Returns:
    (quantities, reasons), both with the index of `values`: the quantity as an object Series of
    Python ints (0 where the value is bad), and '' or the bad_rows reason that drops the row
    (QUANTITY_NOT_POSITIVE_INTEGER, QUANTITY_NOT_FINITE or QUANTITY_TOO_LARGE).
  """
  text = values.astype(str).str.strip().replace('', '1')
  number: List[object] = [0] * len(text)
  reasons: List[str] = [QUANTITY_NOT_POSITIVE_INTEGER] * len(text)
  integer = text.str.fullmatch(INTEGER_PATTERN).to_numpy()
  decimal = text.str.fullmatch(NUMBER_PATTERN).to_numpy() & ~integer
  non_finite = text.str.fullmatch(_NON_FINITE).to_numpy()
  for position, value in enumerate(text.to_numpy()):
    if integer[position]:
      # int() of thousands of digits is slow or refused; 30 digits are far above the maximum.
      quantity = int(value) if len(value) <= 30 else MAX_QUANTITY + 1
    elif decimal[position]:
      as_float = float(value)  # '1e400' is inf, which is too large
      if as_float != as_float or (as_float < np.inf and not as_float.is_integer()):
        continue
      quantity = int(as_float) if as_float < 2.0**63 else MAX_QUANTITY + 1
    else:
      if non_finite[position]:
        reasons[position] = QUANTITY_NOT_FINITE
      continue
    if quantity <= 0:
      continue
    if quantity > MAX_QUANTITY:
      reasons[position] = QUANTITY_TOO_LARGE
      continue
    number[position], reasons[position] = quantity, ''
  return (pd.Series(number, index=values.index, dtype=object),
          pd.Series(reasons, index=values.index, dtype=object))


def _drop(frame: pd.DataFrame, mask: pd.Series, reason: str, bad_rows: Dict[str, int]):
  count = int(mask.sum())
  if count:
    bad_rows[reason] = bad_rows.get(reason, 0) + count
  return frame[~mask]


def read_contract(interactions_path: str, items_path: str) -> ContractData:
  """Reads and validates both contract files.

  Args:
    interactions_path: CSV or Parquet file with INTERACTION_COLUMNS (required:
      user_id, item_id, timestamp).
    items_path: CSV or Parquet file with ITEM_COLUMNS (required: item_id, title).

  Returns:
    The validated ContractData.

  Raises:
    DataError: on a structural problem, with a one-line message.
  """
  bad_rows: Dict[str, int] = collections.OrderedDict()
  inter = _read_table(interactions_path, 'interactions', INTERACTION_COLUMNS,
                      INTERACTION_REQUIRED)
  inter[ROW_INDEX] = range(len(inter))
  inter['timestamp'] = parse_timestamps(inter['timestamp'], interactions_path)
  for column in ('user_id', 'item_id', 'event_type', 'query'):
    inter[column] = inter[column].str.strip()
  inter.loc[inter['event_type'] == '', 'event_type'] = 'purchase'
  quantity, quantity_reason = parse_quantities(inter['quantity'])
  inter['quantity'] = quantity

  inter = _drop(inter, inter['user_id'] == '', 'interactions: empty user_id', bad_rows)
  inter = _drop(inter, inter['item_id'] == '', 'interactions: empty item_id', bad_rows)
  inter = _drop(inter, ~inter['event_type'].isin(EVENT_TYPES),
                f'interactions: event_type not one of {"/".join(EVENT_TYPES)}', bad_rows)
  for reason in (QUANTITY_NOT_POSITIVE_INTEGER, QUANTITY_NOT_FINITE, QUANTITY_TOO_LARGE):
    inter = _drop(inter, quantity_reason.loc[inter.index] == reason, reason, bad_rows)
  inter['quantity'] = inter['quantity'].astype('int64')
  if inter.empty:
    raise DataError(f'{interactions_path}: no valid rows left after dropping bad rows '
                    f'({_format_bad_rows(bad_rows)})')

  items = read_items(items_path, bad_rows)
  unknown = ~inter['item_id'].isin(items['item_id'])
  if unknown.any():
    # Kept: the interaction is real, only its text is missing (it gets an empty title).
    bad_rows['interactions: item_id not in items file (kept, no text)'] = int(unknown.sum())
  return ContractData(inter.reset_index(drop=True), items.reset_index(drop=True),
                      dict(bad_rows))


def read_items(items_path: str, bad_rows: Optional[Dict[str, int]] = None) -> pd.DataFrame:
  """Reads and validates an items file alone (the baselines need the catalog text, no events).

  Args:
    items_path: CSV or Parquet file with ITEM_COLUMNS (required: item_id, title).
    bad_rows: If given, the dropped rows are counted into it per reason.

  Returns:
    Columns of ITEM_COLUMNS, stripped, one row per item_id (first kept), every title non-empty.

  Raises:
    DataError: on a structural problem, with a one-line message.
  """
  bad_rows = collections.OrderedDict() if bad_rows is None else bad_rows
  items = _read_table(items_path, 'items', ITEM_COLUMNS, ITEM_REQUIRED)
  for column in ITEM_COLUMNS:
    items[column] = items[column].str.strip()
  items = _drop(items, items['item_id'] == '', 'items: empty item_id', bad_rows)
  items = _drop(items, items['title'] == '', 'items: empty title', bad_rows)
  items = _drop(items, items['item_id'].duplicated(keep='first'),
                'items: duplicated item_id (first kept)', bad_rows)
  return items.reset_index(drop=True)


def _format_bad_rows(bad_rows: Dict[str, int]) -> str:
  return '; '.join(f'{reason}: {count}' for reason, count in bad_rows.items()) or 'none'

