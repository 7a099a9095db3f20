"""Shell completion through click's completion environment (``_CONV3D_COMPLETE``).

Paths complete as files (the shell lists them), choices as their values; an
HDF5 file or Zarr store followed by ':' completes the arrays inside it.
"""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.shell_completion import BashComplete

from conv3d_cli.cli import complete
from conv3d_cli.cli.main import cli


def completions(*words, incomplete=""):
    """(type, value) of each completion of ``conv3d WORDS INCOMPLETE``."""
    shell = BashComplete(cli, {}, "conv3d", "_CONV3D_COMPLETE")
    return [(item.type, item.value) for item in shell.get_completions(list(words), incomplete)]


def test_the_executable_completes_through_the_environment(tmp_path):
    """The installed ``conv3d`` script, as bash calls it: a file for INPUT, values for --padding."""
    exe = os.path.join(os.path.dirname(sys.executable), "conv3d")

    def bash(line, cword):
        env = {**os.environ, "_CONV3D_COMPLETE": "bash_complete", "COMP_WORDS": line,
               "COMP_CWORD": str(cword)}
        proc = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=120,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()
    assert bash("conv3d run sca", 2) == ["file,sca"]
    assert bash("conv3d run a.npy b.npy --padding ", 5) == ["plain,valid", "plain,same"]
    assert bash("conv3d ru", 1) == ["plain,run"]


@pytest.mark.parametrize("words", [
    ["run"], ["run", "in.npy"], ["info"], ["shape"], ["preview"], ["preview", "a.nii"],
    ["run", "a", "b", "--weights"], ["run", "a", "b", "--config"], ["run", "a", "b", "--report"],
    ["run", "a", "b", "--save-weights"], ["preview", "a", "-o"], ["export"],
    ["layers"], ["shape", "--weights"],
])
def test_paths_complete_as_file_names(words):
    assert completions(*words, incomplete="sc") == [("file", "sc")]


@pytest.mark.parametrize("option,typed,expected", [
    ("--padding", "", ["valid", "same"]),
    ("--padding", "S", ["same"]),
    ("--layer", "conv3dt", ["Conv3DTranspose"]),
    ("--data-format", "channels_", ["channels_last", "channels_first"]),
    ("--activation", "rel", ["relu", "relu6"]),
    ("--activation", "leaky_relu:{", []),
    ("--method", "", ["auto", "measure", "direct", "fft", "winograd"]),
    ("--output-dtype", "f", ["float16", "float32", "float64"]),
    ("--dtype", "mixed", ["mixed_float16", "mixed_bfloat16"]),
])
def test_choices_complete_their_values(option, typed, expected):
    got = completions("run", "a.npy", "b.npy", option, incomplete=typed)
    assert got == [("plain", v) for v in expected]


def test_inner_arrays_of_hdf5_and_zarr_complete_after_the_colon(tmp_path):
    zarr = pytest.importorskip("zarr")
    with h5py.File(tmp_path / "v.h5", "w") as fh:
        fh["stacks/cells"] = np.zeros((2, 2, 2))
        fh["raw"] = np.zeros((2, 2, 2))
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    root.create_array("0", shape=(4, 4, 4), chunks=(2, 2, 2), dtype="f4")
    root.create_group("labels").create_array("a", shape=(4, 4, 4), dtype="f4")
    h5, store = str(tmp_path / "v.h5"), str(tmp_path / "s.zarr")
    assert completions("run", incomplete=h5 + ":") == [
        ("plain", h5 + ":/raw"), ("plain", h5 + ":/stacks/cells")]
    assert completions("run", incomplete=h5 + ":/st") == [("plain", h5 + ":/stacks/cells")]
    assert completions("info", incomplete=store + ":") == [
        ("plain", store + ":/0"), ("plain", store + ":/labels/a")]
    # Not a container, or unreadable: the shell completes file names as usual.
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    assert completions("run", incomplete=str(tmp_path / "bad.h5") + ":") == []
    assert completions("run", incomplete="x.npy:") == [("file", "x.npy:")]


def test_the_value_lists_are_the_librarys():
    from conv3d_cli.io.registry import BY_NAME
    from conv3d_cli.layers import activations, args
    from conv3d_cli.layers.conv import layer_class
    assert complete.ACTIVATIONS == tuple(activations.NAMES)
    assert complete.DTYPE_POLICIES == tuple(args.FLOAT_POLICIES)
    assert [args.standardize_padding(p) for p in complete.PADDINGS] == list(complete.PADDINGS)
    assert [args.standardize_data_format(f) for f in complete.DATA_FORMATS] == \
        list(complete.DATA_FORMATS)
    assert [layer_class(name).__name__ for name in complete.LAYER_CLASSES] == \
        list(complete.LAYER_CLASSES)
    assert complete._HDF5 == BY_NAME["hdf5"].extensions
    assert complete._ZARR == BY_NAME["zarr"].extensions


def test_a_path_argument_still_takes_an_inner_array_name(tmp_path):
    from click.testing import CliRunner
    with h5py.File(tmp_path / "v.h5", "w") as fh:
        fh["g/d"] = np.zeros((4, 5, 6), np.float32)
    r = CliRunner().invoke(cli, ["info", str(tmp_path / "v.h5") + ":/g/d", "--json"])
    assert r.exit_code == 0, r.output
    assert '"shape": [4, 5, 6]' in r.output
