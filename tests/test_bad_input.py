"""Each kind of bad input gives a one-line error and leaves no output behind."""

import os
import subprocess
import sys

import pandas as pd
import pytest

import pipeline
from contract import data as contract
from conftest import REPO, write_csv

GOOD_HEADER = ['user_id', 'item_id', 'timestamp']


def _run(capsys, interactions, items, output):
  status = pipeline.main(['run', '--interactions', str(interactions), '--items', str(items),
                          '--output', str(output)])
  return status, capsys.readouterr().err.strip()


@pytest.mark.parametrize('name, header, rows, expected', [
    ('missing_column', ['user_id', 'item_id'], [('u1', 'a')],
     "interactions.csv, row 1 (header): missing required column 'timestamp'"),
    ('bad_timestamp', GOOD_HEADER, [('u1', 'a', '1291191960'), ('u1', 'b', 'yesterday')],
     "interactions.csv, line 3, column 'timestamp': cannot parse 'yesterday'"),
    ('header_only', GOOD_HEADER, [], 'interactions.csv: file has a header but no data rows'),
    ('duplicated_column', GOOD_HEADER + ['user_id'], [('u1', 'a', '1291191960', 'u2')],
     "interactions.csv, row 1 (header): duplicated column 'user_id', 2 times"),
])
def test_bad_interactions_file(tmp_path, capsys, items_file, name, header, rows, expected):
  interactions = write_csv(tmp_path / 'interactions.csv', header, rows)
  output = tmp_path / f'out_{name}'
  status, err = _run(capsys, interactions, items_file, output)
  assert status == 2
  assert len(err.splitlines()) == 1 and err.startswith('error: ')
  assert expected in err
  assert not output.exists()


def test_empty_file(tmp_path, capsys, items_file):
  interactions = tmp_path / 'interactions.csv'
  interactions.write_text('')
  status, err = _run(capsys, interactions, items_file, tmp_path / 'out')
  assert status == 2 and 'interactions.csv: file is empty' in err
  assert len(err.splitlines()) == 1


def test_missing_items_title_column(tmp_path, capsys):
  interactions = write_csv(tmp_path / 'interactions.csv', GOOD_HEADER, [('u1', 'a', 1)])
  items = write_csv(tmp_path / 'items.csv', ['item_id'], [('a',)])
  status, err = _run(capsys, interactions, items, tmp_path / 'out')
  assert status == 2 and "items.csv, row 1 (header): missing required column 'title'" in err


def test_existing_output_is_left_untouched(tmp_path, capsys, items_file):
  output = tmp_path / 'out'
  output.mkdir()
  (output / 'run_summary.json').write_text('{"kept": true}')
  interactions = write_csv(tmp_path / 'interactions.csv', ['user_id', 'item_id'], [('u1', 'a')])
  status, _ = _run(capsys, interactions, items_file, output)
  assert status == 2
  assert sorted(os.listdir(output)) == ['run_summary.json']
  assert (output / 'run_summary.json').read_text() == '{"kept": true}'


def test_bad_value_rows_are_counted_not_silently_dropped(tmp_path, items_file):
  interactions = write_csv(
      tmp_path / 'interactions.csv', GOOD_HEADER + ['event_type', 'quantity'],
      [('u1', 'a', 1, 'purchase', 1), ('', 'b', 2, 'purchase', 1), ('u1', 'c', 3, 'teleport', 1),
       ('u1', 'd', 4, 'view', -2), ('u1', 'zz', '2011-01-01T10:00:00', '', '')])
  data = contract.read_contract(interactions, items_file)
  assert list(data.interactions['item_id']) == ['a', 'zz']
  assert data.interactions['timestamp'].tolist()[1] == 1293876000
  assert data.bad_rows == {
      'interactions: empty user_id': 1,
      'interactions: event_type not one of view/click/add_to_cart/purchase': 1,
      'interactions: quantity not a positive integer': 1,
      'interactions: item_id not in items file (kept, no text)': 1,
  }


# Timestamps outside the contract (docs/contracts.md §1): overflowing numbers once became the
# int64 minimum, inf a pandas traceback, and a month-first date was guessed.
@pytest.mark.parametrize('value, problem', [
    ('1e30', "'1e30' is outside the accepted range 0 <= unix seconds < 4102444800"),
    ('99999999999999999999', "'99999999999999999999' is outside the accepted range"),
    ('1e400', "'1e400' is outside the accepted range"),
    ('-1', "'-1' is outside the accepted range"),
    ('4102444800', "'4102444800' is outside the accepted range"),
    ('1700000000000', "'1700000000000' is outside the accepted range"),  # milliseconds
    ('2100-01-01T00:00:00Z', "'2100-01-01T00:00:00Z' is outside the accepted range"),
    ('1969-12-31', "'1969-12-31' is outside the accepted range"),
    ('inf', "cannot parse 'inf'"),
    ('-inf', "cannot parse '-inf'"),
    ('nan', "cannot parse 'nan'"),
    ('09/12/2011 12:00', "cannot parse '09/12/2011 12:00'"),
    ('12/09/2011', "cannot parse '12/09/2011'"),
    ('2011-13-01', "cannot parse '2011-13-01'"),
    ('2011-02-30', "cannot parse '2011-02-30'"),
    ('Dec 9 2011', "cannot parse 'Dec 9 2011'"),
])
def test_timestamp_outside_the_contract_is_a_one_line_error(tmp_path, items_file, value,
                                                            problem):
  interactions = write_csv(tmp_path / 'interactions.csv', GOOD_HEADER,
                           [('u1', 'a', '1291191960'), ('u1', 'b', value), ('u2', 'c', value)])
  with pytest.raises(contract.DataError) as error:
    contract.read_contract(interactions, items_file)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(f"{interactions}, line 3, column 'timestamp': {problem}"), message
  assert 'from 1970-01-01 up to 2100-01-01 UTC' in message
  assert message.endswith('; 2 row(s) with a bad timestamp in the file'), message


def test_timestamp_out_of_range_in_parquet_names_the_row(tmp_path, items_file):
  interactions = tmp_path / 'interactions.parquet'
  pd.DataFrame({'user_id': ['u1', 'u1'], 'item_id': ['a', 'b'],
                'timestamp': [1291191960.0, 1e30]}).to_parquet(interactions)
  with pytest.raises(contract.DataError) as error:
    contract.read_contract(str(interactions), items_file)
  assert str(error.value).startswith(
      f"{interactions}, row 2, column 'timestamp': '1e+30' is outside the accepted range")


def test_valid_timestamps_and_quantities_read_as_before(tmp_path, items_file):
  """Unix seconds and ISO-8601 date-times (year first, never month-first) within the range."""
  rows = [('u1', 'a', '1291191960', ''), ('u1', 'b', ' 1291191960.9 ', '2'),
          ('u1', 'c', '2010-12-01T08:26:00', '2.0'), ('u1', 'd', '2010-12-01 08:26', '1e3'),
          ('u1', 'e', '2010-12-01T08:26:00Z', '+5'), ('u1', 'f', '2010-12-01T09:26:00+01:00', 7),
          ('u1', 'g', '2011-12-09 12:00', '9223372036854775807'), ('u1', 'h', '2010-12-01', 1),
          ('u2', 'a', '0', 1), ('u2', 'b', '4102444799', 1),
          ('u2', 'c', '2099-12-31T23:59:59.999999Z', 1), ('u2', 'd', '2010-12-01T03:56-0430', 1)]
  interactions = write_csv(tmp_path / 'interactions.csv', GOOD_HEADER + ['quantity'], rows)
  data = contract.read_contract(interactions, items_file)
  assert data.bad_rows == {}
  assert data.interactions['timestamp'].tolist() == [
      1291191960, 1291191960, 1291191960, 1291191960, 1291191960, 1291191960,
      1323432000, 1291161600, 0, 4102444799, 4102444799, 1291191960]
  assert data.interactions['quantity'].tolist() == [1, 2, 2, 1000, 5, 7, 2**63 - 1, 1, 1, 1, 1, 1]
  assert str(data.interactions['timestamp'].dtype) == 'int64'
  assert str(data.interactions['quantity'].dtype) == 'int64'


# Quantities that are not a positive int64 drop their row and are counted, never converted (1e30
# once became the int64 minimum, inf a traceback).
@pytest.mark.parametrize('value, reason', [
    ('1e30', contract.QUANTITY_TOO_LARGE),
    ('99999999999999999999', contract.QUANTITY_TOO_LARGE),
    ('9223372036854775808', contract.QUANTITY_TOO_LARGE),
    ('1e400', contract.QUANTITY_TOO_LARGE),
    ('inf', contract.QUANTITY_NOT_FINITE),
    ('-inf', contract.QUANTITY_NOT_FINITE),
    ('nan', contract.QUANTITY_NOT_FINITE),
    ('-1e30', contract.QUANTITY_NOT_POSITIVE_INTEGER),
    ('-2', contract.QUANTITY_NOT_POSITIVE_INTEGER),
    ('0', contract.QUANTITY_NOT_POSITIVE_INTEGER),
    ('1.5', contract.QUANTITY_NOT_POSITIVE_INTEGER),
    ('many', contract.QUANTITY_NOT_POSITIVE_INTEGER),
])
def test_bad_quantity_drops_the_row_and_counts_it(tmp_path, items_file, value, reason):
  interactions = write_csv(tmp_path / 'interactions.csv', GOOD_HEADER + ['quantity'],
                           [('u1', 'a', 1, 3), ('u1', 'b', 2, value), ('u2', 'c', 3, value),
                            ('u2', 'd', 4, '')])
  data = contract.read_contract(interactions, items_file)
  assert data.interactions['item_id'].tolist() == ['a', 'd']
  assert data.interactions['quantity'].tolist() == [3, 1]
  assert data.bad_rows == {reason: 2}


@pytest.mark.parametrize('kind, header, duplicated', [
    ('interactions', ['user_id', 'item_id', 'timestamp', 'user_id'], 'user_id'),
    ('interactions', ['user_id', 'item_id', 'timestamp', 'query', ' query '], 'query'),
    ('items', ['item_id', 'title', 'title'], 'title'),
])
def test_duplicated_column_is_a_one_line_error(tmp_path, items_file, kind, header, duplicated):
  files = {'interactions': write_csv(tmp_path / 'interactions.csv', GOOD_HEADER,
                                     [('u1', 'a', 1)]),
           'items': items_file}
  files[kind] = write_csv(tmp_path / f'{kind}_dup.csv', header,
                          [tuple(f'{kind[0]}{i}' if column != 'timestamp' else '1'
                                 for i, column in enumerate(header))])
  with pytest.raises(contract.DataError) as error:
    contract.read_contract(files['interactions'], files['items'])
  assert str(error.value) == (f"{files[kind]}, row 1 (header): duplicated column "
                              f"{duplicated!r}, 2 times (expected each column name once)")


def test_cli_prints_no_traceback(tmp_path, items_file):
  interactions = write_csv(tmp_path / 'interactions.csv', ['user_id'], [('u1',)])
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'pipeline.py'), 'run', '--interactions', interactions,
       '--items', items_file, '--output', str(tmp_path / 'out')],
      capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith('error: ')


@pytest.mark.parametrize('flags, expected', [
    (['--compression', 'sparsity=0.5'], "'sparsity=0.5': expected NAME=VALUE with NAME one of"),
    (['--compression', 'target_sparsity=lots'], 'target_sparsity takes a float'),
    (['--compression', 'target_sparsity=1.5'], 'target_sparsity must be in [0, 1)'),
    (['--min-recall-retention', '98'], "'98': expected a share between 0 and 1"),
    (['--trainer', 'layers=2'], "'layers=2': expected NAME=VALUE with NAME one of"),
    (['--trainer', 'fine_tune_layers=two'], 'fine_tune_layers takes an integer'),
    (['--trainer', 'fine_tune_layers=-1'], 'fine_tune_layers must be >= 0'),
    (['--trainer', 'fine_tune_layers=7'], 'has 6 transformer layers'),
    (['--trainer', 'fine_tune_layers=1', '--text-encoder', 'none'],
     'the id-only model (--text-encoder none) has no encoder'),
    (['--epochs', '0'], 'epochs must be > 0, not 0'),
])
def test_bad_compression_and_trainer_flags(tmp_path, capsys, flags, expected):
  output = tmp_path / 'out'
  with pytest.raises(SystemExit) as exit_info:
    pipeline.main(['run', '--output', str(output), *flags])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('pipeline.py run: error: argument ') and expected in err[-1], err
  assert not output.exists()
