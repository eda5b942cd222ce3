"""Each kind of bad input gives a one-line error and leaves no output behind."""

import os
import subprocess
import sys

import pytest

import pipeline
from components import contract
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
])
def test_bad_compression_and_trainer_flags(tmp_path, capsys, flags, expected):
  output = tmp_path / 'out'
  with pytest.raises(SystemExit) as exit_info:
    pipeline.main(['run', '--output', str(output), *flags])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1].startswith('pipeline.py run: error: argument ') and expected in err[-1], err
  assert not output.exists()
