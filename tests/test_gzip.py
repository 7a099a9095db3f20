"""Parallel gzip (conv3d_cli/io/gzipio.py): .nii.gz outputs in independent members, inputs
inflated member by member; every gzip reader reads them, byte for byte."""

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conv3d_cli.cli.main import cli
from conv3d_cli.io import gzipio, open_volume

BACKENDS = ["zlib"] + (["isal"] if gzipio._fast_zlib is not None else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Each test runs with ISA-L (if installed) and with the pure-zlib fallback."""
    if request.param == "zlib":
        monkeypatch.setattr(gzipio, "_fast_zlib", None)
    return request.param


@pytest.fixture
def data(rng):
    """Incompressible floats, then zeros: 2.6 MB."""
    return rng.standard_normal(400_000).astype(np.float32).tobytes() + bytes(1_000_000)


def _members(path):
    """The number of gzip members of ``path`` (inflated one by one, with zlib)."""
    raw, count = path.read_bytes(), 0
    while raw:
        inflate = zlib.decompressobj(31)
        inflate.decompress(raw)
        assert inflate.eof
        raw, count = inflate.unused_data, count + 1
    return count


def _compress(tmp_path, data, **kwargs):
    (tmp_path / "a.bin").write_bytes(data)
    gzipio.compress_file(tmp_path / "a.bin", tmp_path / "a.gz", **kwargs)
    return tmp_path / "a.gz"


@pytest.mark.parametrize("threads", [1, 3])
def test_members_are_one_gzip_file_for_every_reader(tmp_path, data, backend, threads):
    gz = _compress(tmp_path, data, threads=threads, block=300_000)
    assert _members(gz) == 9
    assert gzip.decompress(gz.read_bytes()) == data
    assert zlib.decompress(gz.read_bytes(), 31) == data[:300_000]  # zlib: the first member
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-t", str(gz)]).returncode == 0


def test_empty_file_is_one_empty_member(tmp_path, backend):
    gz = _compress(tmp_path, b"", threads=2)
    assert gzip.decompress(gz.read_bytes()) == b""


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("limit", [10, 300_000, 1_234_567, 5_000_000])
def test_decompression_writes_exactly_the_first_limit_bytes(tmp_path, data, backend, threads,
                                                            limit):
    gz = _compress(tmp_path, data, threads=2, block=300_000)
    with open(gz, "rb") as fh:  # our members are found without inflating them
        index = gzipio._index(fh, os.path.getsize(gz), limit)
    assert [length for _, _, length in index] == [300_000] * min(-(-limit // 300_000), 8) + \
        ([len(data) - 8 * 300_000] if limit > 8 * 300_000 else [])
    gzipio.decompress_file(gz, tmp_path / "b.bin", limit, threads=threads)
    assert (tmp_path / "b.bin").read_bytes() == data[:limit]


def test_other_gzip_files_are_read_as_one_stream(tmp_path, data, backend):
    (tmp_path / "a.gz").write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    with open(tmp_path / "a.gz", "rb") as fh:
        assert gzipio._index(fh, os.path.getsize(tmp_path / "a.gz"), len(data)) is None
    gzipio.decompress_file(tmp_path / "a.gz", tmp_path / "b.bin", len(data), threads=2)
    assert (tmp_path / "b.bin").read_bytes() == data


def test_members_claiming_more_than_a_block_are_read_as_a_stream(tmp_path, backend):
    # A member's trailer may say anything: one inflated in memory holds at most MAX_MEMBER.
    gz = _compress(tmp_path, bytes(gzipio.MAX_MEMBER + 1), threads=1,
                   block=gzipio.MAX_MEMBER + 1)
    with open(gz, "rb") as fh:
        assert gzipio._index(fh, os.path.getsize(gz), 1 << 40) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_corrupt_or_truncated_members_are_refused(tmp_path, data, backend, threads):
    raw = bytearray(_compress(tmp_path, data, threads=2, block=300_000).read_bytes())
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    for bad in (flipped, raw[:len(raw) // 2]):
        (tmp_path / "bad.gz").write_bytes(bytes(bad))
        with pytest.raises((OSError, EOFError, ValueError, zlib.error)):
            gzipio.decompress_file(tmp_path / "bad.gz", tmp_path / "b.bin", len(data),
                                   threads=threads)
        os.unlink(tmp_path / "b.bin")


def test_nii_gz_input_with_a_corrupt_member_is_refused_in_one_line(tmp_path, rng, backend):
    a = rng.standard_normal((40, 40, 40)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "in.nii")
    gzipio.compress_file(tmp_path / "in.nii", tmp_path / "in.nii.gz", threads=2, block=50_000)
    raw = bytearray((tmp_path / "in.nii.gz").read_bytes())
    raw[-100_000] ^= 0xFF
    (tmp_path / "bad.nii.gz").write_bytes(bytes(raw))
    with open_volume(str(tmp_path / "in.nii.gz"), tmp_dir=str(tmp_path)) as vol:
        assert np.array_equal(vol[:, :, :], a)
    with pytest.raises(Exception, match="corrupt or truncated gzip data"):
        open_volume(str(tmp_path / "bad.nii.gz"), tmp_dir=str(tmp_path))
    assert not [n for n in os.listdir(tmp_path) if ".conv3d-" in n]


def _run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def test_nii_gz_output_is_the_nii_output_compressed(tmp_path, rng, monkeypatch, backend):
    a = rng.standard_normal((30, 31, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "in.nii.gz")
    monkeypatch.setattr(gzipio, "BLOCK", 100_000)  # several members
    common = ["--filters", 3, "--kernel-size", 3, "--seed", 0, "-q", "--workers", 2]
    for out in ("out.nii", "out.nii.gz"):
        r = _run(tmp_path / "in.nii.gz", tmp_path / out, *common)
        assert r.exit_code == 0, r.output
    gz = tmp_path / "out.nii.gz"
    assert _members(gz) > 1
    assert gzip.decompress(gz.read_bytes()) == (tmp_path / "out.nii").read_bytes()
    assert np.array_equal(nib.load(gz).get_fdata(), nib.load(tmp_path / "out.nii").get_fdata())
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-t", str(gz)]).returncode == 0
    assert not [n for n in os.listdir(tmp_path) if ".conv3d-" in n]


def test_failure_while_compressing_leaves_nothing(tmp_path, rng, monkeypatch):
    a = rng.standard_normal((30, 31, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "in.nii")
    monkeypatch.setattr(gzipio, "BLOCK", 50_000)
    calls = []

    def failing(data, *args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return compress(data, *args)

    compress = gzipio.compress_member
    monkeypatch.setattr(gzipio, "compress_member", failing)
    r = _run(tmp_path / "in.nii", tmp_path / "out.nii.gz", "--filters", 2, "--kernel-size", 3,
             "--seed", 0, "-q", "--workers", 2)
    assert r.exit_code != 0 and "No space left on device" in r.output
    assert sorted(os.listdir(tmp_path)) == ["in.nii"]


@pytest.mark.parametrize("workers", [1, 2])
def test_output_is_compressed_on_the_runs_workers(tmp_path, rng, monkeypatch, workers):
    a = rng.standard_normal((6, 7, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "in.nii")
    seen = []
    compress = gzipio.compress_file

    def spy(src, dst, threads=None, **kwargs):
        seen.append(threads)
        return compress(src, dst, threads, **kwargs)

    monkeypatch.setattr(gzipio, "compress_file", spy)
    r = _run(tmp_path / "in.nii", tmp_path / "out.nii.gz", "--filters", 1, "--kernel-size", 3,
             "--seed", 0, "-q", "--workers", workers)
    assert r.exit_code == 0, r.output
    assert seen == [workers]


SLOW_GZIP = """
import sys, time
from conv3d_cli.io import gzipio
compress = gzipio.compress_member
def slow(*args):
    time.sleep(0.5)
    return compress(*args)
gzipio.compress_member = slow
gzipio.BLOCK = 20_000
from conv3d_cli.cli.main import main
sys.argv[0] = "conv3d"
main()
"""


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_while_compressing_leaves_nothing(tmp_path, rng, sig):
    a = rng.standard_normal((30, 31, 32)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "in.nii")
    (tmp_path / "out.nii.gz").write_bytes(b"earlier output")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_GZIP, "run", str(tmp_path / "in.nii"),
                             str(tmp_path / "out.nii.gz"), "--filters", "4", "--kernel-size",
                             "3", "--seed", "0", "--workers", "2", "--overwrite", "-q"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(n.startswith(".out.nii.gz.conv3d-") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the run did not stop within 30 s of the signal")
    assert proc.returncode != 0
    assert sorted(os.listdir(tmp_path)) == ["in.nii", "out.nii.gz"]
    assert (tmp_path / "out.nii.gz").read_bytes() == b"earlier output"
