"""The default ``data_format`` comes from keras.json, as in Keras: ``$KERAS_HOME/keras.json``,
else ``~/.keras/keras.json``, else channels_last. The suite itself pins KERAS_HOME to an
empty folder (conftest.py), so a user's own keras.json cannot change what it tests."""

import json
import os

import pytest
from click.testing import CliRunner

from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.cli.main import cli


def _keras_json(folder, **settings):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "keras.json").write_text(json.dumps(settings))
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A user home whose ~/.keras/keras.json asks for channels_first."""
    _keras_json(tmp_path / "home" / ".keras", image_data_format="channels_first",
                backend="jax", floatx="float32")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_the_suite_does_not_read_the_users_keras_json(home):
    pinned = os.environ["KERAS_HOME"]
    assert os.path.isdir(pinned) and os.listdir(pinned) == []
    assert Conv3D(1, 3).data_format == "channels_last"


def test_home_keras_json_without_keras_home(home, monkeypatch):
    monkeypatch.delenv("KERAS_HOME")
    assert Conv3D(1, 3).data_format == "channels_first"
    assert Conv3DTranspose(1, 3).data_format == "channels_first"
    assert Conv3D(1, 3, data_format="channels_last").data_format == "channels_last"


def test_keras_home_wins_over_home(home, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(_keras_json(tmp_path / "kh",
                                                     image_data_format="channels_last")))
    assert Conv3D(1, 3).data_format == "channels_last"
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-such-folder"))  # as Keras: no fallback
    assert Conv3D(1, 3).data_format == "channels_last"


@pytest.mark.parametrize("content", ['{"image_data_format": "channels_middle"}', "not json",
                                     "[1, 2]", '{"backend": "jax"}'])
def test_unusable_keras_json_means_channels_last(tmp_path, monkeypatch, content):
    (tmp_path / "keras.json").write_text(content)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert Conv3D(1, 3).data_format == "channels_last"


def test_cli_default_follows_keras_json(home, monkeypatch):
    monkeypatch.delenv("KERAS_HOME")
    args = ["shape", "--input-shape", "1,4,8,9,10", "--filters", "3", "--kernel-size", "3",
            "--json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["output_shape"] == [1, 3, 6, 7, 8]
    r = CliRunner().invoke(cli, args[:-1] + ["--data-format", "channels_last", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["output_shape"] == [1, 2, 6, 7, 3]
