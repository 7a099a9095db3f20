"""Start-up: each command imports only what it needs (benchmarks/startup.py times them).

A shell tool runs thousands of times from Makefiles and shell completion. The
heavy libraries (numba, SciPy, h5py, nibabel, Zarr, Dask, matplotlib, tqdm) each
cost about as much to import as NumPy and click together; these tests run the
commands in a fresh interpreter and check that the ones that need none of
them import none of them.
"""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conv3d_cli.engine import jit

HEAVY = ["numba", "llvmlite", "scipy", "h5py", "nibabel", "zarr", "dask", "distributed",
         "matplotlib", "tqdm"]
# --help, --version and completion need the commands' options, not the library
# (NumPy, which `conv3d preview`'s options use, is part of the baseline).
LIBRARY = ["conv3d_cli.api", "conv3d_cli.engine", "conv3d_cli.io", "conv3d_cli.layers"]
DEFAULT_MIN_COMPILED_FLOPS = jit.MIN_COMPILED_FLOPS  # before conftest's fixture lowers it

PROBE = """
import atexit, json, sys
watched = json.loads(sys.argv.pop(1))
atexit.register(lambda: sys.__stderr__.write(
    "\\nLOADED " + json.dumps([m for m in watched if m in sys.modules]) + "\\n"))
sys.argv[0] = "conv3d"
from conv3d_cli.cli.main import main
main()
"""


def loaded(args, watched, env=None, cwd=None):
    """The modules of ``watched`` that ``conv3d ARGS`` imported, run in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(watched), *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**_environ(), **(env or {})})
    assert proc.returncode == 0, proc.stderr
    line = [s for s in proc.stderr.splitlines() if s.startswith("LOADED ")][-1]
    return json.loads(line[len("LOADED "):])


def _environ():
    import os
    return dict(os.environ)


@pytest.mark.parametrize("args,env", [
    (["--help"], None),
    (["--version"], None),
    ([], {"_CONV3D_COMPLETE": "bash_complete", "COMP_WORDS": "conv3d ru", "COMP_CWORD": "1"}),
])
def test_help_version_and_completion_import_no_library(args, env):
    assert loaded(args, HEAVY + LIBRARY, env) == []


def test_shape_of_an_input_shape_imports_nothing_heavy():
    args = ["shape", "--input-shape", "2,16,16,16,3", "--filters", "4", "--kernel-size", "3",
            "--strides", "2", "--activation", "gelu", "--kernel-regularizer", "l2"]
    assert loaded(args, HEAVY) == []


def test_info_and_a_small_run_on_npy_import_nothing_heavy(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((8, 8, 8), np.float32))
    assert loaded(["info", "x.npy"], HEAVY, cwd=tmp_path) == []
    run = ["run", "x.npy", "y.npy", "--filters", "1", "--kernel-size", "3", "--seed", "0", "-q"]
    assert loaded(run, HEAVY, cwd=tmp_path) == []
    assert np.load(tmp_path / "y.npy").shape == (6, 6, 6)


def test_cli_output_dtypes_are_the_librarys():
    from conv3d_cli.cli.options import OUTPUT_DTYPES
    from conv3d_cli.io.dtypes import OUTPUT_DTYPES as LIBRARY_DTYPES
    assert OUTPUT_DTYPES == LIBRARY_DTYPES


def test_small_jobs_take_the_numpy_paths(monkeypatch):
    from conv3d_cli.engine.choose import candidates
    from conv3d_cli.engine.stencil import stencil_suits
    from conv3d_cli.layers import Conv3D
    monkeypatch.setattr(jit, "MIN_COMPILED_FLOPS", DEFAULT_MIN_COMPILED_FLOPS)
    small, large = Conv3D(1, 3).job((1, 8, 8, 8, 1)), Conv3D(1, 3).job((1, 96, 96, 96, 1))
    assert not stencil_suits(small) and stencil_suits(large)
    assert candidates(Conv3D(8, 3).job((1, 8, 8, 8, 8))) == ["direct"]
    assert candidates(Conv3D(16, 3).job((1, 48, 48, 48, 16))) == ["direct", "fft", "winograd"]


def test_lazy_kernels_pickle_by_reference_and_expose_the_dispatcher():
    from conv3d_cli.engine import stencil
    assert pickle.loads(pickle.dumps(stencil._kernel)) is stencil._kernel
    assert stencil._kernel.targetoptions["nogil"] is True
    assert stencil._kernel.py_func.__name__ == "_kernel"
