"""``make batch`` through the real Makefile and GNU make, in temporary folders.

Every case calls ``make -C <clone> batch IN=... OUT=...`` from a folder outside
the clone, as the README says, with CONV3D pointing at this environment's
conv3d (so the Makefile never touches a venv). What is recomputed is read
from the recipe lines make prints.
"""

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import assert_close
from reference import conv3d as ref_conv3d

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONV3D = os.path.join(os.path.dirname(sys.executable), "conv3d")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(cwd, *args, in_clone=False):
    """make batch from cwd; returns (exit status, stdout, stderr)."""
    env = dict(os.environ, PWD=str(cwd))  # what a shell in cwd exports
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    where = ["-f", os.path.join(REPO, "Makefile")] if in_clone else ["-C", REPO]
    proc = subprocess.run(["make", "--no-print-directory", *where, "batch", f"CONV3D={CONV3D}",
                           *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def computed(stdout):
    """Output paths of the conv3d runs make started."""
    return sorted(line.split()[3] for line in stdout.splitlines() if " run " in line)


@pytest.fixture
def scans(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    a = rng.standard_normal((6, 7, 8)).astype(np.float32)
    np.save(tmp_path / "in" / "a.npy", a)
    b = rng.standard_normal((5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(b, np.diag([2.0, 2.0, 3.0, 1.0])), str(tmp_path / "in" / "b.nii.gz"))
    kernel = rng.standard_normal((3, 3, 3, 1, 1)).astype(np.float32)
    np.savez(tmp_path / "w.npz", kernel=kernel)
    return tmp_path, a, b, kernel


def test_outputs_are_remade_exactly_when_input_args_or_weights_change(scans):
    tmp, a, b, kernel = scans
    io = [f"IN={tmp}/in", f"OUT={tmp}/out", "NPROC=2"]
    args = f"ARGS=--weights {tmp}/w.npz --padding same"
    outs = [f"{tmp}/out/a.npy", f"{tmp}/out/b.nii.gz"]

    code, out, err = make(tmp, "-j2", *io, args)  # first run: all; 2 cores / 2 jobs
    assert code == 0, err
    assert computed(out) == outs
    assert out.count("--workers 1 ") == 2
    assert_close(np.load(outs[0]),
                 ref_conv3d(a[None, ..., None], kernel, padding="same")[0, ..., 0])
    got = nib.load(outs[1])
    assert_close(got.get_fdata(dtype=np.float32),
                 ref_conv3d(b[None, ..., None], kernel, padding="same")[0, ..., 0])
    assert np.allclose(got.affine, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert "batch: 2 volume(s) up to date" in out
    stamp = tmp / "out" / ".conv3d-batch.stamp"
    assert f"--weights {tmp}/w.npz --padding same" in stamp.read_text()

    code, out, err = make(tmp, *io, args)  # nothing changed: nothing recomputed
    assert code == 0 and computed(out) == [], out

    os.utime(f"{tmp}/in/a.npy")  # a newer input: its output only; 2 cores / 1 job
    code, out, err = make(tmp, *io, args)
    assert code == 0 and computed(out) == outs[:1], out
    assert "--workers 2 " in out

    args = f"ARGS=--weights {tmp}/w.npz --padding valid --workers 1"
    code, out, err = make(tmp, "-j2", *io, args)  # ARGS changed: all; its --workers wins
    assert code == 0 and computed(out) == outs, out
    assert all(line.count("--workers") == 1 for line in out.splitlines() if " run " in line)
    assert np.load(outs[0]).shape == (4, 5, 6)

    os.utime(tmp / "w.npz")  # weights touched: all
    code, out, err = make(tmp, *io, args)
    assert code == 0 and computed(out) == outs, out

    # Weights replaced by an older file (cp -p, a checkout): old mtime, new content.
    before = os.stat(outs[0]).st_mtime_ns
    np.savez(tmp / "w.npz", kernel=-kernel)
    os.utime(tmp / "w.npz", ns=(before - 10**9, before - 10**9))
    code, out, err = make(tmp, *io, args)
    assert code == 0 and computed(out) == outs, out
    assert_close(np.load(outs[0]), -ref_conv3d(a[None, ..., None], kernel)[0, ..., 0])


def test_missing_or_empty_in_fails(tmp_path):
    code, out, err = make(tmp_path, f"IN={tmp_path}/nope", f"OUT={tmp_path}/out")
    assert code != 0 and f"IN={tmp_path}/nope is not a directory" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a volume")
    code, out, err = make(tmp_path, f"IN={tmp_path}/empty", f"OUT={tmp_path}/out")
    assert code != 0 and f"IN={tmp_path}/empty holds no volumes" in err
    code, out, err = make(tmp_path, f"IN={tmp_path}/empty")
    assert code != 0 and "usage: make batch IN=dir OUT=dir" in err
    assert not (tmp_path / "out").exists()


def test_relative_paths_under_make_C_are_refused(scans):
    tmp = scans[0]
    for args in (["IN=in", f"OUT={tmp}/out"], [f"IN={tmp}/in", "OUT=out"],
                 [f"IN={tmp}/in", f"OUT={tmp}/out", "ARGS=--weights w.npz"]):
        code, out, err = make(tmp, *args)
        assert code != 0, args
        assert f"make runs in {REPO} (make -C), not in {tmp}: give absolute paths" in err
    # A value with a '/' that names no file is no path; a dry run writes nothing.
    code, out, err = make(tmp, "-n", f"IN={tmp}/in", f"OUT={tmp}/out",
                          f"ARGS=--weights {tmp}/m.keras --layer-name encoder/conv3d_2")
    assert code == 0, err
    assert f"--weights {tmp}/m.keras --layer-name encoder/conv3d_2" in out
    assert not (tmp / "out").exists()


def test_zarr_inputs_suffix_and_ext(tmp_path):
    zarr = pytest.importorskip("zarr", reason="zarr is part of the test extra")
    (tmp_path / "in").mkdir()
    z = np.random.default_rng(1).standard_normal((6, 6, 5)).astype(np.float32)
    zarr.create_array(store=str(tmp_path / "in" / "s.zarr"), shape=z.shape, chunks=(3, 3, 5),
                      dtype="f4")[:] = z
    io = [f"IN={tmp_path}/in", f"OUT={tmp_path}/out",
          "ARGS=--filters 1 --kernel-size 3 --seed 0 --workers 1"]

    code, out, err = make(tmp_path, *io)  # the output keeps its input's name and format
    assert code == 0, err
    assert computed(out) == [f"{tmp_path}/out/s.zarr"]
    assert out.count("--workers") == 1  # ARGS's own --workers, none added
    first = zarr.open_array(store=str(tmp_path / "out" / "s.zarr"), path="data", mode="r")[...]
    assert first.shape == (4, 4, 3)
    code, out, err = make(tmp_path, *io)  # a store older than its output is up to date
    assert code == 0 and computed(out) == [], out

    # Rewriting a chunk leaves the store's directory mtime alone; it is still seen.
    zarr.open_array(store=str(tmp_path / "in" / "s.zarr"), mode="r+")[:3, :3] = 0
    code, out, err = make(tmp_path, *io)
    assert code == 0 and computed(out) == [f"{tmp_path}/out/s.zarr"], out
    second = zarr.open_array(store=str(tmp_path / "out" / "s.zarr"), path="data", mode="r")[...]
    assert not np.array_equal(first, second)

    code, out, err = make(tmp_path, *io, "SUFFIX=_f", "EXT=npy")  # renamed, converted
    assert code == 0, err
    assert computed(out) == [f"{tmp_path}/out/s_f.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "s_f.npy"), second)

    code, out, err = make(tmp_path, *io, "EXT=.xyz")
    assert code != 0 and "EXT=.xyz is not one of" in err


def test_a_failing_file_names_itself_and_the_others_finish(scans):
    # Run in the caller's own folder (make -f): relative paths are fine there.
    tmp, a, b, kernel = scans
    os.unlink(tmp / "in" / "b.nii.gz")
    (tmp / "in" / "bad.npy").write_bytes(b"not a volume")
    code, out, err = make(tmp, "-k", "IN=in", "OUT=out", "ARGS=--weights w.npz --workers 1",
                          in_clone=True)
    assert code != 0
    assert "Error: in/bad.npy: not a valid .npy file" in err
    assert "out/bad.npy] Error 1" in err
    assert computed(out) == ["out/a.npy", "out/bad.npy"]
    assert sorted(os.listdir(tmp / "out")) == [".conv3d-batch.stamp", "a.npy"]
    assert_close(np.load(tmp / "out" / "a.npy"), ref_conv3d(a[None, ..., None], kernel)[0, ..., 0])
