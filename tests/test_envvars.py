"""Environment defaults for the engine options (CONV3D_WORKERS, ...), as batch systems set them."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from conv3d_cli.cli.main import cli

SHAPE = ["shape", "--input-shape", "1,24,24,24,1", "--filters", "1", "--kernel-size", "3",
         "--json"]
VARS = ["CONV3D_WORKERS", "CONV3D_MEMORY_LIMIT", "CONV3D_METHOD", "CONV3D_CHUNK_SHAPE",
        "CONV3D_TMPDIR"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name in VARS:
        monkeypatch.delenv(name, raising=False)


def _plan(env, *args):
    r = CliRunner().invoke(cli, [*SHAPE, *args], env=env)
    assert r.exit_code == 0, r.output
    return json.loads(r.output)["plan"]


def test_the_environment_sets_the_defaults():
    # One worker more than the default (the cores here): a value equal to the
    # default would pass with the variable ignored.
    workers = _plan({}, "--chunk-shape", "8,11,22")["workers"] + 1
    plan = _plan({"CONV3D_WORKERS": str(workers), "CONV3D_MEMORY_LIMIT": "3G",
                  "CONV3D_METHOD": "FFT", "CONV3D_CHUNK_SHAPE": "8,11,22"})
    assert plan["method"] == "fft" and plan["memory_limit"] == 3 << 30
    assert plan["tile_shape"] == [8, 11, 22] and plan["workers"] == workers


def test_the_command_line_wins_over_the_environment():
    plan = _plan({"CONV3D_WORKERS": "2", "CONV3D_METHOD": "fft", "CONV3D_CHUNK_SHAPE": "8"},
                 "--workers", "1", "--method", "direct", "--chunk-shape", "11")
    assert plan["method"] == "direct" and plan["workers"] == 1 and plan["tile_shape"] == [11] * 3


@pytest.mark.parametrize("name,value,expected", [
    ("CONV3D_WORKERS", "abc", "not a valid integer"),
    ("CONV3D_WORKERS", "0", "x>=1"),
    ("CONV3D_MEMORY_LIMIT", "lots", "Expected a size like 512M"),
    ("CONV3D_METHOD", "fast", "'auto', 'measure', 'direct', 'fft', 'winograd'"),
    ("CONV3D_CHUNK_SHAPE", "1,2", "expected 3 sizes D,H,W"),
])
def test_an_invalid_value_names_the_variable_in_one_line(name, value, expected):
    r = CliRunner().invoke(cli, SHAPE, env={name: value})
    assert r.exit_code == 2
    assert r.output.count("\n") == 1 and "Traceback" not in r.output
    assert r.output.startswith(f"Error: Invalid value for {name}={value} (the default of '--")
    assert expected in r.output


def test_an_invalid_option_names_the_option_not_the_variable():
    r = CliRunner().invoke(cli, [*SHAPE, "--workers", "x"], env={"CONV3D_WORKERS": "2"})
    assert r.exit_code == 2 and "Invalid value for '--workers'" in r.output
    assert "CONV3D_WORKERS" not in r.output


@pytest.mark.parametrize("command", ["run", "shape"])
def test_help_shows_the_variables(command):
    r = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    for name in VARS[:4]:
        assert f"env var: {name}" in r.output
    assert ("env var: CONV3D_TMPDIR" in r.output) == (command == "run")


def test_tmpdir_from_the_environment_is_checked_and_named(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((6, 6, 6), np.float32))
    args = ["run", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--filters", "1",
            "--kernel-size", "3", "--seed", "0", "-q"]
    r = CliRunner().invoke(cli, args, env={"CONV3D_TMPDIR": str(tmp_path / "missing")})
    assert r.exit_code == 2 and "CONV3D_TMPDIR=" in r.output
    assert "not a writable directory" in r.output and not os.path.exists(tmp_path / "y.npy")
    r = CliRunner().invoke(cli, args, env={"CONV3D_TMPDIR": str(tmp_path)})
    assert r.exit_code == 0, r.output
