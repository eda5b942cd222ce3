"""The Pusher's executor publishes each version directory atomically (components/pusher.py)."""

import filecmp
import os

import pytest
from tfx.dsl.io import fileio
from tfx.proto import pusher_pb2
from tfx.types import standard_artifacts
from tfx.types import standard_component_specs as specs
from tfx.utils import proto_utils

import serving_fixtures as fx
from components import pusher


def _push(tmp_path, model_dir, blessed=True):
  model = standard_artifacts.Model()
  model.uri = str(tmp_path / 'model')
  os.makedirs(model.uri)
  os.rename(model_dir, os.path.join(model.uri, 'Format-Serving'))
  blessing = standard_artifacts.ModelBlessing()
  blessing.uri = str(tmp_path / 'blessing')
  blessing.set_int_custom_property('blessed', int(blessed))
  pushed = standard_artifacts.PushedModel()
  pushed.uri = str(tmp_path / 'pushed')
  destination = pusher_pb2.PushDestination(filesystem=pusher_pb2.PushDestination.Filesystem(
      base_directory=str(tmp_path / 'serving')))
  pusher.Executor().Do({specs.MODEL_KEY: [model], specs.MODEL_BLESSING_KEY: [blessing]},
                       {specs.PUSHED_MODEL_KEY: [pushed]},
                       {specs.PUSH_DESTINATION_KEY: proto_utils.proto_to_json(destination)})
  return os.path.join(model.uri, 'Format-Serving'), pushed


def _versions(base):
  return sorted(n for n in os.listdir(base) if n.isdigit()) if os.path.isdir(base) else []


def test_no_version_directory_is_visible_before_it_is_complete(tmp_path, monkeypatch):
  """While files are copied, the base path holds no version; then one complete version."""
  seen_while_copying = []
  copy = fileio.copy

  def watched_copy(src, dst, overwrite=False):
    seen_while_copying.append(_versions(tmp_path / 'serving'))
    return copy(src, dst, overwrite)

  monkeypatch.setattr(fileio, 'copy', watched_copy)
  source, pushed = _push(tmp_path, fx.save_model(str(tmp_path / 'saved'), seed=1))
  assert seen_while_copying and all(seen == [] for seen in seen_while_copying)
  [version] = _versions(tmp_path / 'serving')
  final = tmp_path / 'serving' / version
  assert os.listdir(tmp_path / 'serving') == [version]  # no staging directory left
  assert not filecmp.dircmp(source, final).diff_files
  assert sorted(os.listdir(final)) == sorted(os.listdir(source))
  assert pushed.get_int_custom_property('pushed') == 1
  assert pushed.get_string_custom_property('pushed_destination') == str(final)
  assert pushed.get_string_custom_property('pushed_version') == version


def test_an_unblessed_model_leaves_nothing(tmp_path):
  _, pushed = _push(tmp_path, fx.save_model(str(tmp_path / 'saved'), seed=1), blessed=False)
  assert pushed.get_int_custom_property('pushed') == 0
  assert not os.path.exists(tmp_path / 'serving') or os.listdir(tmp_path / 'serving') == []


def test_an_existing_version_is_not_overwritten(tmp_path):
  os.makedirs(tmp_path / 'serving')
  staged = tmp_path / 'staged'
  os.makedirs(staged)
  (tmp_path / 'serving' / '7').mkdir()
  assert not pusher.move_into_place(str(staged), str(tmp_path / 'serving' / '7'))
  assert os.listdir(tmp_path / 'serving' / '7') == [] and staged.exists()
  assert pusher.move_into_place(str(staged), str(tmp_path / 'serving' / '8'))
  assert not staged.exists()
  with pytest.raises(Exception):
    pusher.move_into_place(str(tmp_path / 'missing'), str(tmp_path / 'serving' / '9'))
