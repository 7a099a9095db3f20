"""The life cycle of outputs and temporary files: nothing leaked, nothing else destroyed.

Every test checks what is left on disk afterwards: the output (or the
untouched earlier one) and nothing named like the tool's temporary files.
"""

import gzip
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import time
import zipfile

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_close
from conv3d_cli import Conv3D
from conv3d_cli.api import apply_to_file
from conv3d_cli.cli.main import cli
from conv3d_cli.errors import OutputExistsError, VolumeError, WeightsError
from conv3d_cli.io import create_output, open_volume, tempfiles, write_volume
from reference import conv3d as ref_conv3d

zarr = pytest.importorskip("zarr", reason="zarr is part of the test extra")
MODELS = os.path.join(os.path.dirname(__file__), "fixtures", "models")


def run(*args, **kwargs):
    return CliRunner(**kwargs).invoke(cli, ["run", *map(str, args)])


def _temps(*folders):
    """The tool's temporary names in ``folders`` (recursively)."""
    found = []
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            found += [os.path.join(root, n) for n in dirs + files if ".conv3d-" in n]
    return found


def _layer():
    layer = Conv3D(1, 3, padding="same", kernel_initializer="ones")
    layer.build((1, 4, 4, 4, 1))
    return layer


@pytest.fixture
def npy(tmp_path, rng):
    a = rng.standard_normal((6, 7, 8)).astype(np.float32)
    np.save(tmp_path / "in.npy", a)
    return tmp_path / "in.npy"


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------- temporary files
def test_keras_file_that_fails_to_parse_leaves_no_unpacked_weights(tmp_path, monkeypatch):
    from conv3d_cli.io.keras_files import ModelFile
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with zipfile.ZipFile(tmp_path / "bad.keras", "w") as z:
        z.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {"layers": [
            {"class_name": "Conv3D", "config": {"name": "c", "filters": 1, "kernel_size": 3}}]}}))
        z.writestr("model.weights.h5", b"not HDF5" * 1000)
    with pytest.raises(WeightsError):
        ModelFile(tmp_path / "bad.keras")
    assert os.listdir(tmp_path / "tmp") == []


def test_nii_gz_is_decompressed_beside_output_or_tmp_dir_and_verbose_says_where(
        tmp_path, rng, monkeypatch):
    a = rng.standard_normal((5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "in.nii.gz")
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.delenv("CONV3D_TMPDIR", raising=False)
    (tmp_path / "out").mkdir()
    seen = []
    real = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (seen.append(str(p)), real(p, *a, **k)))
    r = run(tmp_path / "in.nii.gz", tmp_path / "out" / "o.nii", "--filters", 1,
            "--kernel-size", 3, "-v", "-q")
    assert r.exit_code == 0, r.output
    decompressed = [p for p in seen if ".in.nii.gz.decompressed.conv3d-" in p]
    assert len(decompressed) == 1 and os.path.dirname(decompressed[0]) == str(tmp_path / "out")
    assert f"decompressing {tmp_path / 'in.nii.gz'} to {decompressed[0]}" in r.output
    (tmp_path / "mine").mkdir()
    r = run(tmp_path / "in.nii.gz", tmp_path / "out" / "o2.nii", "--filters", 1,
            "--kernel-size", 3, "-v", "-q", "--tmp-dir", tmp_path / "mine")
    assert r.exit_code == 0
    assert f"to {tmp_path / 'mine'}{os.sep}.in.nii.gz.decompressed.conv3d-" in r.output
    monkeypatch.setenv("CONV3D_TMPDIR", str(tmp_path / "mine"))
    r = run(tmp_path / "in.nii.gz", tmp_path / "out" / "o3.nii", "--filters", 1,
            "--kernel-size", 3, "-v", "-q")
    assert r.exit_code == 0
    assert f"to {tmp_path / 'mine'}{os.sep}.in.nii.gz.decompressed.conv3d-" in r.output
    assert os.listdir(system_tmp) == [] and _temps(tmp_path) == []
    r = run(tmp_path / "in.nii.gz", tmp_path / "out" / "o4.nii", "--filters", 1,
            "--kernel-size", 3, "--tmp-dir", tmp_path / "missing")
    assert r.exit_code != 0 and "--tmp-dir" in r.output and "not a writable directory" in r.output


def test_nii_gz_decompression_stops_at_the_header_size(tmp_path):
    """A small .nii.gz whose stream goes on far beyond the image (a gzip bomb)."""
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "s.nii")
    raw = (tmp_path / "s.nii").read_bytes()
    os.unlink(tmp_path / "s.nii")
    with gzip.open(tmp_path / "bomb.nii.gz", "wb") as fh:
        fh.write(raw)
        for _ in range(16):
            fh.write(b"\0" * (4 << 20))  # 64 MiB that the header does not account for
    assert os.path.getsize(tmp_path / "bomb.nii.gz") < 200_000
    vol = open_volume(str(tmp_path / "bomb.nii.gz"), tmp_dir=str(tmp_path))
    try:
        assert os.path.getsize(vol.temp_files[0]) == len(raw)
        np.testing.assert_array_equal(vol.array[:, :, :], 1)
    finally:
        vol.close()
    assert _temps(tmp_path) == []


def test_stale_names_are_recognised_and_nothing_else(tmp_path):
    dead = _dead_pid()
    host = tempfiles._host()
    names = {f".o.npy.conv3d-{dead}-123-{host}.tmp": True,     # a dead run here
             f".o.npy.conv3d-{dead}.tmp": True,                # an earlier version's name
             f".o.npy.conv3d-{dead}-123-abcdef.tmp": host == "abcdef",  # another host's run
             f".o.npy.conv3d-{os.getpid()}-1-{host}.tmp": False,  # this run
             f".o.npy.conv3d-1-999999999999-{host}.tmp": True,  # PID 1 started at another time
             f"o.npy.conv3d-{dead}.tmp": False,                # no leading dot
             f".o.npy.conv3d-{dead}.tmp.bak": False, "o.npy": False}
    for name, stale in names.items():
        assert tempfiles.is_stale(name) == stale, name
        (tmp_path / name).write_bytes(b"x")
    tempfiles.remove_stale(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, s in names.items() if not s)


# ------------------------------------------------------------------ commits
def test_output_created_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    out = tmp_path / "o.npy"
    target = create_output(str(out), shape=(3, 3, 3), dtype=np.float32)
    out.write_bytes(b"another run's result")
    with pytest.raises(OutputExistsError, match="created by another process"):
        try:
            target.commit()
        except BaseException:
            target.abort()
            raise
    assert out.read_bytes() == b"another run's result" and os.listdir(tmp_path) == ["o.npy"]


@pytest.mark.parametrize("option", ["--save-weights", "--report"])
def test_side_outputs_are_checked_before_output_is_written(npy, tmp_path, option):
    name = "w.npz" if option == "--save-weights" else "r.json"
    (tmp_path / "o.npy").write_bytes(b"earlier")
    args = [npy, tmp_path / "o.npy", "--filters", 1, "--kernel-size", 3, "--overwrite", "-q"]
    r = run(*args, option, tmp_path / "missing" / name)
    assert r.exit_code != 0 and "does not exist" in r.output and option in r.output
    (tmp_path / name).write_bytes(b"keep")
    r = run(*args[:-2], "-q", option, tmp_path / name)  # no --overwrite: OUTPUT exists too
    assert r.exit_code != 0
    os.unlink(tmp_path / "o.npy")
    r = run(*args[:-2], "-q", option, tmp_path / name)
    assert r.exit_code != 0 and f"{option} {tmp_path / name} exists" in r.output
    assert not (tmp_path / "o.npy").exists() and (tmp_path / name).read_bytes() == b"keep"
    r = run(*args, option, tmp_path / name)
    assert r.exit_code == 0 and (tmp_path / "o.npy").exists()
    assert (tmp_path / name).read_bytes() != b"keep"
    if option == "--report":
        r = run(*args, option, tmp_path / "o.npy")
        assert r.exit_code != 0 and "give each output its own file" in r.output
    assert _temps(tmp_path) == []


def test_every_output_respects_the_umask(tmp_path, npy):
    old = os.umask(0o022)
    try:
        base = [npy]
        opts = ["--filters", 1, "--kernel-size", 3, "--seed", 0, "-q"]
        for out in ("o.npy", "o.nii", "o.nii.gz", "o.h5:/x"):
            r = run(*base, tmp_path / out, *opts)
            assert r.exit_code == 0, r.output
        r = run(*base, tmp_path / "o.zarr", *opts, "--save-weights", tmp_path / "w.npz",
                "--report", tmp_path / "r.json")
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(cli, ["export", str(tmp_path / "m.keras"), "--filters", "1",
                                     "--kernel-size", "3", "--input-channels", "1"])
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old)
    for root, dirs, files in os.walk(tmp_path):
        for name in files:
            mode = stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode)
            assert mode == 0o644 or os.path.join(root, name) == str(npy), (name, oct(mode))
        for name in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o755, name
    assert {"o.npy", "o.nii", "o.nii.gz", "o.h5", "o.zarr", "w.npz", "r.json",
            "m.keras"} <= set(os.listdir(tmp_path))


# ------------------------------------------------------------------ HDF5
def _h5_with_keep(path, rng):
    keep = rng.standard_normal((64, 64, 16)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["keep"] = keep
        f["new"] = np.zeros(3)
    return keep


def test_hdf5_overwrite_replaces_only_the_dataset(npy, tmp_path, rng):
    keep = _h5_with_keep(tmp_path / "o.h5", rng)
    r = run(npy, f"{tmp_path}/o.h5:/new", "--filters", 1, "--kernel-size", 3, "-q")
    assert r.exit_code != 0 and "/new exists" in r.output
    r = run(npy, f"{tmp_path}/o.h5:/new", "--filters", 1, "--kernel-size", 3, "--overwrite",
            "-q")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert sorted(f) == ["keep", "new"] and f["new"].shape == (4, 5, 6)
        np.testing.assert_array_equal(f["keep"][...], keep)
    r = run(npy, f"{tmp_path}/o.h5:/", "--filters", 1, "--kernel-size", 3, "--overwrite", "-q")
    assert r.exit_code != 0 and "root group" in r.output
    assert _temps(tmp_path) == []


def test_hdf5_file_held_open_by_another_writer_is_never_replaced(npy, tmp_path, rng):
    keep = _h5_with_keep(tmp_path / "o.h5", rng)
    before = (tmp_path / "o.h5").read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r+'); "
         "print('open', flush=True); sys.stdin.read()", str(tmp_path / "o.h5")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        r = run(npy, f"{tmp_path}/o.h5:/new", "--filters", 1, "--kernel-size", 3,
                "--overwrite", "-q")
        assert r.exit_code != 0 and "open in another process" in r.output, r.output
        assert "not an HDF5 file" not in r.output
    finally:
        holder.communicate("")
    assert (tmp_path / "o.h5").read_bytes() == before and _temps(tmp_path) == []
    with h5py.File(tmp_path / "o.h5", "r") as f:
        np.testing.assert_array_equal(f["keep"][...], keep)


# One writer of a run, made to commit at the same moment as three others.
_WRITER = """
import os, sys, time
import numpy as np
from conv3d_cli.io import create_output
target = create_output(sys.argv[1], shape=(8, 8, 8), dtype=np.float32)
try:
    target[:, :, :] = float(sys.argv[3])
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.01)
    target.commit()
except BaseException:
    target.abort()
    raise
"""


def test_parallel_runs_into_one_hdf5_file_all_keep_their_dataset(tmp_path, rng):
    keep = _h5_with_keep(tmp_path / "o.h5", rng)
    for existing in (True, False):
        if not existing:
            os.unlink(tmp_path / "o.h5")
        go = tmp_path / f"go{existing}"
        procs = [subprocess.Popen([sys.executable, "-c", _WRITER, f"{tmp_path}/o.h5:/d{i}",
                                   str(go), str(i)], stderr=subprocess.PIPE, text=True)
                 for i in range(4)]
        deadline = time.monotonic() + 60
        while len(_temps(tmp_path)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        go.write_bytes(b"")
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        with h5py.File(tmp_path / "o.h5", "r") as f:
            assert sorted(f) == ["d0", "d1", "d2", "d3"] + (["keep", "new"] if existing else [])
            assert [f[f"d{i}"][0, 0, 0] for i in range(4)] == [0, 1, 2, 3]
            if existing:
                np.testing.assert_array_equal(f["keep"][...], keep)
    assert _temps(tmp_path) == []


def test_hdf5_no_room_fails_cleanly_and_keeps_the_file(npy, tmp_path, rng):
    """A file size limit makes writes fail with EFBIG, as a full disk fails with ENOSPC."""
    a = rng.standard_normal((40, 40, 40)).astype(np.float32)  # incompressible output
    np.save(tmp_path / "big.npy", a)
    keep = _h5_with_keep(tmp_path / "o.h5", rng)
    before = (tmp_path / "o.h5").read_bytes()
    limit = len(before) + 64 * 1024  # room for the temporary file, not for both in one

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    r = subprocess.run([sys.executable, "-m", "conv3d_cli.cli.main", "run",
                        str(tmp_path / "big.npy"), f"{tmp_path}/o.h5:/new", "--filters", "1",
                        "--kernel-size", "1", "--seed", "0", "--overwrite", "--workers", "1"],
                       preexec_fn=limited, restore_signals=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "o.h5").read_bytes() == before and _temps(tmp_path) == []
    with h5py.File(tmp_path / "o.h5", "r") as f:
        np.testing.assert_array_equal(f["keep"][...], keep)


# ------------------------------------------------------------------ Zarr
def _store(path, fmt=3):
    root = zarr.open_group(store=str(path), mode="w", zarr_format=fmt)
    root.create_array(name="raw", shape=(6, 7, 8), chunks=(3, 3, 3), dtype="f4")[:] = \
        np.arange(336, dtype=np.float32).reshape(6, 7, 8)
    root.create_array(name="labels", shape=(2,), dtype="i4")[:] = [1, 2]
    return root


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_array_of_a_store_replaces_only_that_array(tmp_path, fmt):
    _store(tmp_path / "s.zarr", fmt)
    layer = _layer()
    apply_to_file(layer, f"{tmp_path}/s.zarr:/raw", f"{tmp_path}/s.zarr:/grp/new",
                  progress=False, workers=1)
    with pytest.raises(OutputExistsError):
        apply_to_file(layer, f"{tmp_path}/s.zarr:/raw", f"{tmp_path}/s.zarr:/grp/new",
                      progress=False, workers=1)
    apply_to_file(layer, f"{tmp_path}/s.zarr:/raw", f"{tmp_path}/s.zarr:/grp/new",
                  overwrite=True, progress=False, workers=1)
    root = zarr.open_group(store=str(tmp_path / "s.zarr"), mode="r")
    names = sorted(n for n, _ in root.members(max_depth=None))
    assert names == ["grp", "grp/new", "labels", "raw"]
    assert root["raw"][0, 0, 1] == 1 and list(root["labels"][:]) == [1, 2]
    expected = layer(root["raw"][:][None, ..., None])[0, ..., 0]
    np.testing.assert_allclose(root["grp/new"][:], expected, rtol=1e-5)
    for out in ("s.zarr:/raw", "s.zarr"):  # the input itself, or the store holding it
        with pytest.raises(VolumeError, match="is or holds the input"):
            apply_to_file(layer, f"{tmp_path}/s.zarr:/raw", f"{tmp_path}/{out}",
                          overwrite=True, progress=False, workers=1)
    assert zarr.open_array(store=str(tmp_path / "s.zarr"), path="raw", mode="r")[0, 0, 1] == 1
    assert _temps(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["s.zarr"]


def test_failed_zarr_run_says_what_it_kept(npy, tmp_path, monkeypatch):
    import importlib
    task_mod = importlib.import_module("conv3d_cli.engine.task")

    def fail(*args, **kwargs):
        raise VolumeError("a read failed")
    monkeypatch.setattr(task_mod, "compute_tile", fail)
    r = run(npy, tmp_path / "o.zarr", "--filters", 1, "--kernel-size", 3, "--workers", 1)
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: a read failed; its partial output "
                                f"{tmp_path}/o.zarr.partial is kept: run again with --resume "
                                "to continue, or delete it")
    r = run(npy, tmp_path / "o.npy", "--filters", 1, "--kernel-size", 3, "--workers", 1)
    assert r.output.strip() == "Error: a read failed"
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "o.zarr.partial"]


def test_zarr_replacement_moves_the_old_output_aside_first(tmp_path, monkeypatch):
    from conv3d_cli.io import zarr_io
    write_volume(f"{tmp_path}/o.zarr", np.zeros((2, 2, 2), np.float32))
    real = zarr_io.place

    def crash(*args):
        raise OSError("the rename failed")
    monkeypatch.setattr(zarr_io, "place", crash)
    with pytest.raises(OSError):
        write_volume(f"{tmp_path}/o.zarr", np.ones((2, 2, 2), np.float32), overwrite=True)
    assert zarr.open_array(store=str(tmp_path / "o.zarr"), path="data")[0, 0, 0] == 0
    assert sorted(os.listdir(tmp_path)) == ["o.zarr"]
    # A run killed between the two renames: the old output is aside, under a dead run's name.
    monkeypatch.setattr(zarr_io, "place", real)
    aside = tmp_path / f".o.zarr.conv3d-{_dead_pid()}-1-{tempfiles._host()}.tmp"
    os.rename(tmp_path / "o.zarr", aside)
    with pytest.raises(OutputExistsError):  # the next run finds it back
        write_volume(f"{tmp_path}/o.zarr", np.ones((2, 2, 2), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["o.zarr"]
    write_volume(f"{tmp_path}/o.zarr", np.ones((2, 2, 2), np.float32), overwrite=True)
    assert zarr.open_array(store=str(tmp_path / "o.zarr"), path="data")[0, 0, 0] == 1
    assert sorted(os.listdir(tmp_path)) == ["o.zarr"]


def test_two_runs_to_one_zarr_output_do_not_mix(npy, tmp_path):
    first = create_output(f"{tmp_path}/o.zarr", shape=(2, 2, 2), dtype=np.float32)
    with pytest.raises(VolumeError, match="being written by another run"):
        create_output(f"{tmp_path}/o.zarr", shape=(2, 2, 2), dtype=np.float32)
    first.commit()
    assert sorted(os.listdir(tmp_path)) == ["in.npy", "o.zarr"]


def test_nii_gz_output_named_like_its_input_in_the_same_folder(tmp_path, rng):
    # make batch writes OUT/scan.nii.gz from IN/scan.nii.gz, decompressing beside the output:
    # the decompressed input and the output's temporary file must not be one file.
    a = rng.standard_normal((5, 6, 7)).astype(np.float32)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "in" / "scan.nii.gz")
    r = run(tmp_path / "in" / "scan.nii.gz", tmp_path / "out" / "scan.nii.gz", "--filters", 1,
            "--kernel-size", 3, "--padding", "same", "--seed", 0,
            "--save-weights", tmp_path / "w.npz", "-q")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "w.npz") as w:
        kernel, bias = w["kernel"], w["bias"]
    expected = ref_conv3d(a[None, ..., None], kernel, bias, padding="same")[0, ..., 0]
    assert_close(nib.load(tmp_path / "out" / "scan.nii.gz").get_fdata(), expected)
    assert _temps(tmp_path) == []
