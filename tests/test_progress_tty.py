"""Progress bars: on a terminal only (no ``\\r`` updates in a log), over every long phase.

The runs happen in a fresh interpreter whose stderr is a pipe or a pseudo-terminal;
``DELAY`` is set to 0 there so that a small run draws its bars.
"""

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios

import nibabel as nib
import numpy as np
import pytest

PROBE = """
import sys
import conv3d_cli.progress
conv3d_cli.progress.DELAY = 0
sys.argv[0] = "conv3d"
from conv3d_cli.cli.main import main
main()
"""


@pytest.fixture
def scan(tmp_path):
    data = np.random.default_rng(0).random((20, 18, 16), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "in.nii.gz")
    return tmp_path


def _args(folder, *extra):
    return [sys.executable, "-c", PROBE, "run", str(folder / "in.nii.gz"),
            str(folder / "out.nii.gz"), "--filters", "2", "--kernel-size", "3", "--seed", "0",
            "--workers", "1", *extra]


def _on_pipe(folder, *extra):
    proc = subprocess.run(_args(folder, *extra), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.decode()


def _on_terminal(folder, *extra):
    """stderr of the run when it is a terminal (stdout stays a pipe)."""
    leader, follower = pty.openpty()
    # 24 rows of 100 columns (a new pseudo-terminal has none: tqdm would draw nothing).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(_args(folder, *extra), stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            break
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the run ended and closed its side
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode(errors="replace")


def test_no_bars_when_stderr_is_not_a_terminal(scan):
    err = _on_pipe(scan)
    assert "\r" not in err and "decompressing" not in err and "%" not in err
    assert err.startswith("wrote ") and nib.load(scan / "out.nii.gz").shape == (18, 16, 14, 2)


def test_progress_forces_the_bars_into_a_log(scan):
    err = _on_pipe(scan, "--progress")
    assert "\r" in err
    for desc in ("decompressing", "conv3d", "compressing"):
        assert desc in err


def test_a_terminal_shows_every_long_phase(scan):
    err = _on_terminal(scan)
    for desc in ("decompressing", "conv3d", "compressing"):
        assert desc in err, err
    assert "B/s" in err.split("conv3d")[0]  # the decompression counts bytes
    assert "wrote " in err


def test_no_progress_keeps_a_terminal_clean(scan):
    err = _on_terminal(scan, "--no-progress")
    assert "decompressing" not in err and err.startswith("wrote ")
