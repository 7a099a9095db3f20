"""Region I/O on raw files: every byte moved whatever each system call moves.

``os.pwrite`` and ``os.preadv`` may move fewer bytes than asked (Linux moves
at most 0x7ffff000 bytes, just under 2 GiB, per call): the raw layer must loop
until the whole region is moved and call a file that really ends early
truncated. The short-call tests simulate that cheaply; the slow test writes
and reads a real volume over 2 GiB.
"""

import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from conv3d_cli.errors import VolumeError
from conv3d_cli.io import open_volume, read_volume, write_volume
from conv3d_cli.io.rawfile import RawArrayFile

# Not a multiple of any item size, so calls also end inside an element.
SHORT = 1000

_real_pwrite = os.pwrite
_real_preadv = os.preadv


def _short_pwrite(fd, data, offset):
    return _real_pwrite(fd, memoryview(data).cast("B")[:SHORT], offset)


def _short_preadv(fd, buffers, offset):
    first = memoryview(buffers[0]).cast("B")
    return _real_preadv(fd, [first[:SHORT]], offset)


@pytest.fixture
def short_io(monkeypatch):
    monkeypatch.setattr(os, "pwrite", _short_pwrite)
    monkeypatch.setattr(os, "preadv", _short_preadv)


@pytest.mark.parametrize("name", ["v.npy", "v.nii", "v.nii.gz"])
def test_short_system_calls_move_every_byte(tmp_path, rng, short_io, name):
    a = rng.standard_normal((17, 13, 11, 2)).astype(np.float32)  # 19448 bytes per run
    write_volume(tmp_path / name, a)
    # Read back with readers that do not go through os.preadv.
    written = (np.load(tmp_path / name) if name.endswith(".npy")
               else nib.load(tmp_path / name).get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(written, a)
    data, _ = read_volume(str(tmp_path / name))
    np.testing.assert_array_equal(data, a)


def test_short_calls_on_regions(tmp_path, rng, short_io):
    path = tmp_path / "r.bin"
    shape = (40, 30, 20)
    path.write_bytes(b"\0" * (16 + 8 * np.prod(shape)))
    for fortran in (False, True):
        f = RawArrayFile(path, 16, shape, np.float64, fortran_order=fortran, writable=True)
        ref = np.zeros(shape)
        f[:, :, :] = ref
        block = rng.standard_normal((25, 30, 20))  # whole trailing planes: long runs
        f[5:30] = block
        ref[5:30] = block
        block = rng.standard_normal((10, 7, 20))
        f[20:30, 3:10, :] = block
        ref[20:30, 3:10, :] = block
        np.testing.assert_array_equal(f[:, :, :], ref)
        np.testing.assert_array_equal(f[3:33, 2:29, 1:19], ref[3:33, 2:29, 1:19])
        f.close()


def test_file_cut_short_after_open_is_truncated(tmp_path, rng):
    a = rng.standard_normal((10, 10, 10)).astype(np.float32)
    write_volume(tmp_path / "t.npy", a)
    vol = open_volume(str(tmp_path / "t.npy"))
    try:
        np.testing.assert_array_equal(vol.array[:2], a[:2])
        size = os.path.getsize(tmp_path / "t.npy")
        os.truncate(tmp_path / "t.npy", size - 500)
        with pytest.raises(VolumeError, match=r"t\.npy: file is truncated"):
            vol.array[:, :, :]
        np.testing.assert_array_equal(vol.array[:5], a[:5])  # what is there still reads
    finally:
        vol.close()


def test_a_write_that_moves_nothing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    with pytest.raises(VolumeError, match="could not write"):
        write_volume(tmp_path / "z.npy", np.ones((4, 4, 4), np.float32))
    assert os.listdir(tmp_path) == []


def test_a_failing_write_names_the_file(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(VolumeError, match="No space left on device"):
        write_volume(tmp_path / "z.nii", np.ones((4, 4, 4), np.float32))
    assert os.listdir(tmp_path) == []


# 513 planes of 1024 x 1024 uint32: 2052 MiB, past the 2 GiB one call can move.
BIG_SHAPE = (513, 1024, 1024)
NEED = 6 << 30


def _mem_available():
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _big_file_dir(tmp_path):
    """A RAM-backed /dev/shm when it has room (the per-call cap is the kernel's,
    the same on every filesystem, and tmpfs writes 2 GiB several times faster
    than a disk), else the test's own directory."""
    shm = "/dev/shm"
    if (os.path.isdir(shm) and os.access(shm, os.W_OK) and _mem_available() >= 2 * NEED
            and shutil.disk_usage(shm).free >= NEED):
        return shm
    return str(tmp_path)


@pytest.mark.slow
def test_real_volume_over_2_gib(tmp_path):
    folder = _big_file_dir(tmp_path)
    if shutil.disk_usage(folder).free < NEED:
        pytest.skip("needs 6 GiB of free disk")
    path = os.path.join(folder, f"conv3d-test-big-{os.getpid()}.npy")
    plane = BIG_SHAPE[1] * BIG_SHAPE[2]
    try:
        # Every element holds its own flat index: a lost, zero or shifted
        # stretch anywhere shows up.
        a = np.arange(np.prod(BIG_SHAPE), dtype=np.uint32).reshape(BIG_SHAPE)
        write_volume(path, a)  # one region, one run of 2052 MiB
        del a
        vol = open_volume(path)
        try:
            back = vol.array[:, :, :]  # one read of 2052 MiB
        finally:
            vol.close()
        for i in range(BIG_SHAPE[0]):
            expected = np.arange(i * plane, (i + 1) * plane, dtype=np.uint32)
            assert np.array_equal(back[i].reshape(-1), expected), f"plane {i} differs"
    finally:
        if os.path.exists(path):
            os.unlink(path)
