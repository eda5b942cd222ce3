"""Reading and validating the data contract (docs/contracts.md §1): interactions and items.

Structural problems (a missing file, an empty file, a missing required column, an unparsable
timestamp) raise `DataError` with one line naming the file, the row and the column. Rows with
bad values (an empty id, an unknown event type, a non-positive quantity, an item without a
title, a duplicated item) are dropped, but counted per reason and reported, never silently.
"""

import collections
import dataclasses
import os
from typing import Dict, Optional

import pandas as pd

INTERACTION_COLUMNS = ('user_id', 'item_id', 'timestamp', 'event_type', 'quantity', 'query')
INTERACTION_REQUIRED = ('user_id', 'item_id', 'timestamp')
ITEM_COLUMNS = ('item_id', 'title', 'description', 'category', 'brand', 'price')
ITEM_REQUIRED = ('item_id', 'title')
EVENT_TYPES = ('view', 'click', 'add_to_cart', 'purchase')

# Column that carries each interaction's position in its file; Beam keeps no order, and row
# order breaks timestamp ties (docs/contracts.md §1).
ROW_INDEX = 'row_index'


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
  try:
    if path.endswith('.parquet') or path.endswith('.pq'):
      frame = pd.read_parquet(path).astype(str)
      # Parquet nulls become the string 'None' / 'nan' after astype(str); the contract's
      # optional values are empty strings instead.
      frame = frame.replace({'None': '', 'nan': '', '<NA>': ''})
    else:
      frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
  except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as err:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise DataError(f'{path}: cannot read as {kind} CSV/Parquet: {first_line}') from None
  frame.columns = [str(c).strip() for c in frame.columns]
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


def _row_label(path: str, position: int) -> str:
  """Names a data row as a user sees it: the line number in a CSV (header is line 1)."""
  if path.endswith('.parquet') or path.endswith('.pq'):
    return f'row {position + 1}'
  return f'line {position + 2}'


def parse_timestamps(values: pd.Series, path: str) -> pd.Series:
  """Parses int64 unix seconds or ISO-8601 date-times; the first bad value is a DataError."""
  stripped = values.str.strip()
  numeric = pd.to_numeric(stripped, errors='coerce')
  seconds = pd.Series(numeric, index=values.index, dtype='float64')
  not_numeric = seconds.isna()
  if not_numeric.any():
    parsed = pd.to_datetime(stripped[not_numeric], errors='coerce', utc=True)
    seconds[not_numeric] = parsed.map(lambda t: t.timestamp() if not pd.isna(t) else float('nan'))
  bad = seconds.isna()
  if bad.any():
    position = int(bad.to_numpy().nonzero()[0][0])
    raise DataError(f'{path}, {_row_label(path, position)}, column \'timestamp\': cannot parse '
                    f'{values.iloc[position]!r} (expected int64 unix seconds or an ISO-8601 '
                    f'date-time); {int(bad.sum())} such row(s) in the file')
  return seconds.astype('int64')


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
  quantity = inter['quantity'].str.strip().replace('', '1')
  inter['quantity'] = pd.to_numeric(quantity, errors='coerce')

  inter = _drop(inter, inter['user_id'] == '', 'interactions: empty user_id', bad_rows)
  inter = _drop(inter, inter['item_id'] == '', 'interactions: empty item_id', bad_rows)
  inter = _drop(inter, ~inter['event_type'].isin(EVENT_TYPES),
                f'interactions: event_type not one of {"/".join(EVENT_TYPES)}', bad_rows)
  bad_quantity = inter['quantity'].isna() | (inter['quantity'] <= 0) | (
      inter['quantity'] != inter['quantity'].round())
  inter = _drop(inter, bad_quantity, 'interactions: quantity not a positive integer', bad_rows)
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

