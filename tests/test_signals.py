"""Real signals to real ``conv3d run`` processes with two workers.

Each run is slow on purpose (a 41^3 kernel over 64^3 tiles: about a minute
of work per tile), so a run that waits for its running tiles instead of
stopping them fails the time bound by far. The tests never wait for a tile:
they signal as soon as the run has made its temporary output and forked its
workers, then check the exit status, that nothing the run made is left
(temporary output, decompressed input), that the existing OUTPUT is
byte-identical, and that no worker survives.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import h5py
import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads worker processes from /proc")

STOP_WITHIN = 15.0  # seconds; a stopped run takes well under one, a tile about a minute
SLOW = ["--filters", "16", "--kernel-size", "41", "--seed", "0", "--workers", "2",
        "--method", "direct", "--chunk-shape", "64,64,64", "--no-progress", "--overwrite"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A 4-D .nii.gz input (so the run also decompresses a temporary copy)."""
    folder = tmp_path_factory.mktemp("scan")
    a = np.random.default_rng(0).standard_normal((104, 104, 168)).astype(np.float32)
    path = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(a, np.eye(4)), path)
    return path


def _children(pid):
    """PIDs whose parent is ``pid`` (scanning /proc: no psutil needed)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ours(*folders):
    """Everything the tool names as its own in ``folders`` (temporary files and folders)."""
    return sorted(p for f in folders for p in glob.glob(os.path.join(f, "*conv3d*"))
                  + glob.glob(os.path.join(f, ".*conv3d*")))


def _env(tmpdir):
    env = dict(os.environ, TMPDIR=str(tmpdir))
    env.pop("CONV3D_TMPDIR", None)
    return env


def _launch(scan, out, tmpdir, new_session=False):
    cmd = [sys.executable, "-m", "conv3d_cli.cli.main", "run", str(scan), str(out), *SLOW]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=_env(tmpdir), start_new_session=new_session)


def _ready(proc, out):
    """The worker PIDs once the run has forked both and made its temporary output."""
    if proc.poll() is not None:
        pytest.fail(f"the run ended before it could be signalled: {proc.stderr.read()}")
    workers = _children(proc.pid)
    path = str(out).split(".h5:")[0] + (".h5" if ".h5:" in str(out) else "")
    temp = glob.glob(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.conv3d-*"))
    temp += glob.glob(os.path.join(path + ".partial", ".conv3d", "plan.json"))
    return workers if len(workers) == 2 and temp else None


def _wait_ready(procs):
    """Wait (60 s at most) until every run is ready; returns their worker PIDs."""
    workers = [None] * len(procs)
    deadline = time.monotonic() + 60
    while not all(workers) and time.monotonic() < deadline:
        for i, (proc, out) in enumerate(procs):
            workers[i] = workers[i] or _ready(proc, out)
        time.sleep(0.05)
    if not all(workers):
        for proc, _ in procs:
            proc.kill()
        pytest.fail("a run did not start its workers within 60 s")
    return workers


def _finish(proc, workers):
    """stderr of ``proc`` once it ended; fails if it or a worker outlives the time bound."""
    try:
        _, err = proc.communicate(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the run did not stop within {STOP_WITHIN} s of the signal")
    deadline = time.monotonic() + 5
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"worker processes still running: {left}"
    return err


def _existing(out):
    """An earlier OUTPUT (an HDF5 file with another dataset, or a file/store); its bytes."""
    if out.suffix == ".zarr":
        out.mkdir()
        (out / "zarr.json").write_text("an earlier store")
        return lambda: (out / "zarr.json").read_text()
    if out.suffix == ".h5":
        with h5py.File(out, "w") as f:
            f["keep"] = np.arange(10.0)
    else:
        out.write_bytes(b"an earlier result")
    return out.read_bytes


@pytest.mark.parametrize("signum,group,name", [
    (signal.SIGTERM, False, "result.nii"), (signal.SIGINT, False, "result.h5"),
    (signal.SIGHUP, False, "result.zarr"), (signal.SIGINT, True, "result.h5")],
    ids=["TERM", "INT-hdf5", "HUP-zarr", "INT-group-hdf5"])
def test_signal_stops_run_cleans_up_and_keeps_existing_output(scan, tmp_path, signum, group,
                                                               name):
    out, tmpdir = tmp_path / "out" / name, tmp_path / "tmpdir"
    out.parent.mkdir()
    tmpdir.mkdir()
    contents = _existing(out)
    before = contents()
    spec = f"{out}:/new" if out.suffix == ".h5" else out
    proc = _launch(scan, spec, tmpdir, new_session=group)
    [workers] = _wait_ready([(proc, spec)])
    (os.killpg if group else os.kill)(proc.pid, signum)
    err = _finish(proc, workers)
    kept = "no output was written"
    if out.suffix == ".zarr":
        kept = (f"its partial output {out}.partial is kept: run again with --resume to "
                "continue, or delete it")
        shutil.rmtree(f"{out}.partial")
    assert proc.returncode == 128 + signum, err
    assert err.strip() == f"Error: interrupted by {signal.Signals(signum).name}; {kept}"
    assert contents() == before
    assert _ours(out.parent, tmpdir, scan.parent) == []


def test_sigkill_leaves_temp_files_a_later_run_removes(scan, tmp_path, rng):
    out = tmp_path / "result.nii"
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    proc = _launch(scan, out, tmpdir)
    [workers] = _wait_ready([(proc, out)])
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=STOP_WITHIN)
    deadline = time.monotonic() + 5  # the workers die with their parent
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)]
    stale = _ours(tmp_path, tmpdir)
    assert stale, "a killed run leaves its temporary files"
    # A file of another tool, and one that only looks like ours, are never removed.
    (tmp_path / ".result.nii.conv3d-notapid.tmp").write_bytes(b"x")
    (tmp_path / "notes.conv3d.txt").write_bytes(b"x")
    np.save(tmp_path / "small.npy", rng.standard_normal((6, 6, 6)).astype(np.float32))
    r = subprocess.run([sys.executable, "-m", "conv3d_cli.cli.main", "run",
                        str(tmp_path / "small.npy"), str(tmp_path / "small_out.npy"),
                        "--filters", "1", "--kernel-size", "3", "-q"],
                       capture_output=True, text=True, env=_env(tmpdir), timeout=60)
    assert r.returncode == 0, r.stderr
    assert _ours(tmp_path, tmpdir) == [str(tmp_path / ".result.nii.conv3d-notapid.tmp"),
                                       str(tmp_path / "notes.conv3d.txt")]


# In-process checks of the two ways Python can lose a signal's exception.
def _invoke_with(monkeypatch, tmp_path, body):
    from click.testing import CliRunner

    from conv3d_cli.cli import run as run_module
    from conv3d_cli.cli.main import cli
    monkeypatch.setattr(run_module, "apply_to_file", lambda *a, **k: body())
    np.save(tmp_path / "in.npy", np.zeros((4, 4, 4), np.float32))
    return CliRunner().invoke(cli, ["run", str(tmp_path / "in.npy"), str(tmp_path / "o.npy"),
                                    "--filters", "1", "--kernel-size", "1"])


def test_signal_turned_into_another_error_still_exits_as_the_signal(monkeypatch, tmp_path):
    from conv3d_cli.errors import EngineError
    from conv3d_cli.signals import Terminated

    def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:  # e.g. the workers died of the same signal first
            raise EngineError("a worker process died") from None
    r = _invoke_with(monkeypatch, tmp_path, body)
    assert r.exit_code == 143 and "interrupted by SIGTERM" in r.output, r.output
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_signal_swallowed_by_python_is_delivered_again(monkeypatch, tmp_path):
    class Finalizer:
        def __del__(self):  # Python swallows exceptions raised here
            time.sleep(2)

    def body():
        obj = Finalizer()
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGHUP)).start()
        del obj
        time.sleep(10)  # without a second delivery the run would finish: exit 0
        return {"output": "o.npy", "file_output_shape": [4, 4, 4], "method": "direct",
                "tiles": 1, "workers": 1, "seconds": 0.0}
    r = _invoke_with(monkeypatch, tmp_path, body)
    assert r.exit_code == 129 and "interrupted by SIGHUP" in r.output, r.output
