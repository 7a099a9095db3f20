"""CL: the engine on a Dask cluster, measured (``python benchmarks/bench.py --only CL``).

CLa  What the client sends, dry run: ``conv3d run`` (``apply_to_file``) over a
     4096^3 float32 Zarr input and into a Zarr output, both metadata only (no
     chunk is ever written), on a stand-in cluster that pickles what each
     Dask task would send (function, arguments with scattered objects as
     their keys, key) and computes nothing. Tilings of 4,096 and 65,536 tiles
     side by side, each in a fresh process: bytes per task (goal under 10
     KiB) and the client's RSS at the start of the Dask run and its peak
     during it (goal: flat, under 16 MiB added at either size; the plan
     itself, held before the run, is shown by the whole run's peak).
CLb  Many small tiles: a 64^3 Zarr store with ``--chunk-shape 4,4,4`` (4,096
     tiles), ``--scheduler local --workers 2`` against the local engine
     (``--workers 2``), whole ``conv3d run`` commands timed in alternating
     rounds: goal at most 4x the local engine's time and the client's peak
     RSS (the ``conv3d`` process itself, which holds the LocalCluster's
     scheduler) under 512 MiB. Then one run on a copy with a corrupt chunk:
     goal exactly one line on stderr.
CLc  A real cluster: ``dask scheduler`` and two ``dask worker --nthreads 1``
     processes on loopback (started once, like a cluster that is already up),
     W6 (256^3 float32 Zarr, 64^3 chunks, k3, 1 -> 1) against the local
     engine with 2 workers, alternating rounds after one warm-up run each:
     voxels per compute second (``--report``), goal at least 80% of the local
     engine's.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

MIB = 1 << 20
PAYLOAD_SHAPE = (4096, 4096, 4096)
PAYLOAD_TILINGS = {4096: (256, 256, 256), 65536: (64, 128, 128)}
PAYLOAD_THREADS = 16       # cluster threads the dry run pretends to have
TASK_BYTES_GOAL = 10 << 10
FLAT_GOAL_MIB = 16
SMALL_RATIO_GOAL, SMALL_RSS_GOAL = 4.0, 512 * MIB
REAL_GOAL = 0.8
W6_SHAPE, W6_CHUNKS = (256, 256, 256), (64, 64, 64)


def _conv3d():
    return os.path.join(os.path.dirname(sys.executable), "conv3d")


def _dask():
    return os.path.join(os.path.dirname(sys.executable), "dask")


def _zarr_input(path, shape, chunks, seed=0, data=True):
    """A float32 Zarr v3 array at ``path``: random values, or metadata only."""
    import zarr
    z = zarr.create_array(store=path, shape=shape, chunks=chunks, dtype="f4", zarr_format=3)
    if data:
        rng = np.random.default_rng(seed)
        for z0 in range(0, shape[0], chunks[0]):
            z[z0:z0 + chunks[0]] = rng.standard_normal((min(chunks[0], shape[0] - z0),)
                                                       + tuple(shape[1:]), dtype=np.float32)
    return path


# ---------------------------------------------------------------- CLa: dry run
class _Key:
    """A scattered object as a task refers to it: by its key."""

    def __init__(self, key):
        self.key = key


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _sent_bytes(obj):
    """Bytes ``obj`` travels as: pickled, its arrays' buffers out of band (protocol
    5, as Dask sends them: not copied into the pickle)."""
    buffers = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return len(head) + sum(b.raw().nbytes for b in buffers)


class DryRunCluster:
    """Stands in for ``distributed`` and a client: records the pickled size of
    what is scattered and of each task's submission, computes nothing."""

    def __init__(self, threads):
        self.threads = threads
        self.client = self   # the `distributed` module's `client` namespace
        self.scattered = []
        self.tasks = self.tiles = self.task_bytes = self.task_bytes_max = 0
        self.waiting = self.most_waiting = 0

    FutureCancelledError = RuntimeError

    def scheduler_info(self):
        return {"workers": {f"w{i}": {"nthreads": 1} for i in range(self.threads)}}

    def scatter(self, objects, broadcast=False, hash=True):
        self.scattered = [_sent_bytes(o) for o in objects]
        return [_Key(f"scattered-{i}") for i in range(len(objects))]

    def submit(self, fn, *args, key, retries, pure):
        sent = (fn, [a.key if isinstance(a, _Key) else a for a in args], key, retries)
        size = _sent_bytes(sent)
        self.tasks += 1
        self.task_bytes += size
        self.task_bytes_max = max(self.task_bytes_max, size)
        batch = args[-1]
        self.tiles += len(batch)
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        return _Done([(i, None) for i in batch])

    def as_completed(self):
        return _Queue(self)

    def cancel(self, futures):
        pass


class _Queue:
    def __init__(self, cluster):
        self.cluster, self.items = cluster, []

    def add(self, fut):
        self.items.append(fut)

    def __iter__(self):
        while self.items:
            self.cluster.waiting -= 1
            yield self.items.pop(0)


def _status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss():
    return _status("VmRSS")


def _reset_peak():
    """Reset this process's peak RSS to its RSS now (Linux: clear_refs 5); the RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _rss()


def _peak():
    return _status("VmHWM")


def dry_run(tmp, tiles):
    """CLa in this process (run it in a fresh one): one dry run with ``tiles`` tiles."""
    from conv3d_cli import Conv3D
    from conv3d_cli.api import apply_to_file
    from conv3d_cli.engine import distributed
    cluster = DryRunCluster(PAYLOAD_THREADS)
    distributed.require_distributed = lambda: cluster
    distributed._client = lambda *args: contextlib.nullcontext(cluster)
    dask_run, during = distributed._run, {}

    def measured_run(*args):
        during["earlier_peak"] = _peak()
        during["start"] = _reset_peak()
        try:
            return dask_run(*args)
        finally:
            during["peak"] = _peak()

    distributed._run = measured_run
    src = _zarr_input(os.path.join(tmp, f"in{tiles}.zarr"), PAYLOAD_SHAPE, (64, 64, 64),
                      data=False)
    layer = Conv3D(1, 3)
    layer.build((1, *PAYLOAD_SHAPE, 1))
    before = _rss()
    start = time.perf_counter()
    report = apply_to_file(layer, src, os.path.join(tmp, f"out{tiles}.zarr"), progress=False,
                           chunk_shape=PAYLOAD_TILINGS[tiles], scheduler="local",
                           workers=PAYLOAD_THREADS, memory_limit="1T")
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux keeps the latter across exec, so it would show
    # the peak of the process that started this one.
    peak = max(during["earlier_peak"], _peak())
    assert report["tiles"] == tiles == cluster.tiles, (report["tiles"], cluster.tiles)
    return {"tiles": tiles, "tasks": cluster.tasks, "task_bytes_max": cluster.task_bytes_max,
            "task_bytes_mean": cluster.task_bytes / cluster.tasks,
            "scattered": cluster.scattered, "most_waiting": cluster.most_waiting,
            "rss_before": before, "rss_peak": peak, "seconds": seconds,
            "run_start": during["start"], "run_peak": during["peak"]}


def measure_payload(tmp):
    """CLa for each tiling, each in a fresh process: {tiles: result}."""
    out = {}
    for tiles in PAYLOAD_TILINGS:
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import cluster; "
                "print(json.dumps(cluster.dry_run(sys.argv[2], int(sys.argv[3]))))")
        proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), tmp,
                               str(tiles)], capture_output=True, text=True, timeout=900)
        if proc.returncode:
            raise RuntimeError(f"CLa dry run ({tiles} tiles) failed:\n{proc.stderr[-3000:]}")
        out[tiles] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  CLa {tiles} tiles done", file=sys.stderr)
    return out


# ------------------------------------------------------ CLb and CLc: real runs
class PeakRSS(threading.Thread):
    """Peak RSS of one process (its own high-water mark, sampled every 20 ms)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self):
        while self.running:
            try:
                with open(f"/proc/{self.pid}/status") as fh:
                    for line in fh:
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.02)


def run_conv3d(args, check=True):
    """``conv3d ARGS``: (wall seconds, the process's peak RSS, stdout, stderr, returncode)."""
    start = time.perf_counter()
    proc = subprocess.Popen([_conv3d(), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sampler = PeakRSS(proc.pid)
    sampler.start()
    out, err = proc.communicate(timeout=1800)
    wall = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    if check and proc.returncode:
        raise RuntimeError(f"conv3d {' '.join(args)} failed:\n{err[-3000:]}")
    return wall, sampler.peak, out, err, proc.returncode


def _same_output(a, b):
    import zarr
    x = zarr.open_array(store=a, path="data", mode="r")[...]
    y = zarr.open_array(store=b, path="data", mode="r")[...]
    return float(np.max(np.abs(x - y))) if x.shape == y.shape else float("inf")


def measure_small_tiles(tmp, rounds):
    """CLb: wall times and client peaks of both engines, the output difference,
    and the stderr of a failing run."""
    src = _zarr_input(os.path.join(tmp, "small.zarr"), (64, 64, 64), (32, 32, 32), seed=1)
    common = ["run", src, None, "--filters", "1", "--kernel-size", "3", "--seed", "0",
              "--chunk-shape", "4,4,4", "--workers", "2", "--overwrite", "-q", "--no-progress"]
    outs = {"local": os.path.join(tmp, "small_local.zarr"),
            "dask": os.path.join(tmp, "small_dask.zarr")}
    extra = {"local": [], "dask": ["--scheduler", "local"]}
    times = {k: [] for k in outs}
    peaks = {k: [] for k in outs}
    for _ in range(rounds):
        for name, out in outs.items():
            time.sleep(0.5)
            args = list(common)
            args[2] = out
            wall, peak, *_ = run_conv3d(args + extra[name])
            times[name].append(wall)
            peaks[name].append(peak)
        print(f"  CLb round done ({times['local'][-1]:.1f} s, {times['dask'][-1]:.1f} s)",
              file=sys.stderr)
    diff = _same_output(outs["local"], outs["dask"])
    return {"times": times, "peaks": peaks, "diff": diff, "failure": _failing_run(tmp, src)}


def _failing_run(tmp, src):
    """stderr of ``--scheduler local`` over a copy of ``src`` with a corrupt chunk."""
    bad = os.path.join(tmp, "corrupt.zarr")
    shutil.copytree(src, bad)
    chunk = os.path.join(bad, "c", "0", "0", "0")
    with open(chunk, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(0)
        fh.write(b"\xff" * size)
    _, _, _, err, code = run_conv3d(["run", bad, os.path.join(tmp, "never.zarr"), "--filters",
                                     "1", "--kernel-size", "3", "--seed", "0", "--scheduler",
                                     "local", "--workers", "2", "-q", "--no-progress"],
                                    check=False)
    return {"returncode": code, "stderr": err}


@contextlib.contextmanager
def real_cluster(tmp, workers=2):
    """A ``dask scheduler`` and ``workers`` ``dask worker --nthreads 1`` processes on
    loopback; yields the scheduler's address, stops them all after."""
    import distributed
    sched_file = os.path.join(tmp, "scheduler.json")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([_dask(), "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", sched_file], **quiet)]
    try:
        deadline = time.monotonic() + 120
        while not (os.path.exists(sched_file) and os.path.getsize(sched_file)):
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError("the dask scheduler did not start")
            time.sleep(0.1)
        with open(sched_file) as fh:
            address = json.load(fh)["address"]
        for _ in range(workers):
            procs.append(subprocess.Popen([_dask(), "worker", address, "--nthreads", "1",
                                           "--no-dashboard", "--host", "127.0.0.1"], **quiet))
        with distributed.Client(address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def measure_real_cluster(tmp, rounds):
    """CLc: compute seconds and wall times of W6, local 2 workers and a real cluster."""
    src = _zarr_input(os.path.join(tmp, "w6.zarr"), W6_SHAPE, W6_CHUNKS, seed=6)
    outs = {"local": os.path.join(tmp, "w6_local.zarr"),
            "dask": os.path.join(tmp, "w6_dask.zarr")}
    compute = {k: [] for k in outs}
    walls = {k: [] for k in outs}
    with real_cluster(tmp) as address:
        extra = {"local": ["--workers", "2"], "dask": ["--scheduler", address]}

        def once(name):
            wall, _, out, _, _ = run_conv3d(["run", src, outs[name], "--filters", "1",
                                             "--kernel-size", "3", "--seed", "0", "--overwrite",
                                             "-q", "--no-progress", "--report", "-"]
                                            + extra[name])
            report = json.loads(out)
            return wall, report["compute_seconds"], report

        reports = {name: once(name)[2] for name in outs}  # warm-up: workers load the kernels
        for _ in range(rounds):
            for name in outs:
                time.sleep(0.5)
                wall, seconds, _ = once(name)
                walls[name].append(wall)
                compute[name].append(seconds)
        print("  CLc done", file=sys.stderr)
    voxels = int(np.prod(reports["local"]["output_shape"]))
    return {"compute": compute, "walls": walls, "voxels": voxels,
            "tiles": reports["local"]["tiles"], "workers": reports["dask"]["workers"],
            "diff": _same_output(outs["local"], outs["dask"])}


# ------------------------------------------------------------------- report
def _met(ok):
    return "met" if ok else "NOT met"


def report_payload(res):
    lines = [f"| CLa dry run: 4096^3 Zarr -> Zarr, k3, {PAYLOAD_THREADS} cluster threads | "
             "tile | tasks | bytes per task (max / mean) | scattered once: task, tiles (KiB) | "
             "most tasks waiting | client RSS: run's start -> its peak (MiB) | "
             "whole run's peak (MiB) | run (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tiles, r in sorted(res.items(), key=lambda item: int(item[0])):
        shape = "x".join(map(str, PAYLOAD_TILINGS[int(tiles)]))
        scat = ", ".join(f"{b / 1024:.0f}" for b in r["scattered"])
        lines.append(f"| {int(tiles):,} tiles | {shape} | {r['tasks']:,} | "
                     f"{r['task_bytes_max']} / {r['task_bytes_mean']:.0f} | {scat} | "
                     f"{r['most_waiting']} | {r['run_start'] / MIB:.0f} -> "
                     f"{r['run_peak'] / MIB:.0f} | {r['rss_peak'] / MIB:.0f} | "
                     f"{r['seconds']:.1f} |")
    worst = max(r["task_bytes_max"] for r in res.values())
    added = max(r["run_peak"] - r["run_start"] for r in res.values())
    lines.append(f"| goal: < 10 KiB per task; flat client memory (the Dask run adds < "
                 f"{FLAT_GOAL_MIB} MiB at every size) | | | {worst} B: "
                 f"{_met(worst < TASK_BYTES_GOAL)} | | | {added / MIB:.0f} MiB: "
                 f"{_met(added < FLAT_GOAL_MIB * MIB)} | | |")
    return lines


def report_small(res):
    t = {k: statistics.median(v) for k, v in res["times"].items()}
    peak = max(res["peaks"]["dask"])
    ratio = t["dask"] / t["local"]
    err = res["failure"]["stderr"].strip().splitlines()
    one_line = res["failure"]["returncode"] == 1 and len(err) == 1 and err[0].startswith("Error")
    rounds = len(res["times"]["local"])
    lines = [f"| CLb 64^3 Zarr, --chunk-shape 4,4,4 (4,096 tiles), k3, medians of {rounds} "
             "rounds | wall (s) | client peak RSS (MiB) |", "|---|---|---|",
             f"| local engine, --workers 2 | {t['local']:.1f} | "
             f"{max(res['peaks']['local']) / MIB:.0f} |",
             f"| --scheduler local --workers 2 | {t['dask']:.1f} | {peak / MIB:.0f} |",
             f"| goal: <= {SMALL_RATIO_GOAL:g}x, < 512 MiB | {ratio:.2f}x: "
             f"{_met(ratio <= SMALL_RATIO_GOAL)} | {_met(peak < SMALL_RSS_GOAL)} |",
             f"| outputs: max abs difference | {res['diff']:.1e} | |",
             f"| a corrupt input chunk: stderr lines (goal: 1) | {len(err)}: {_met(one_line)} | "
             f"{err[0][:100] if err else ''} |"]
    return lines


def report_real(res):
    c = {k: statistics.median(v) for k, v in res["compute"].items()}
    w = {k: statistics.median(v) for k, v in res["walls"].items()}
    mvox = {k: res["voxels"] / s / 1e6 for k, s in c.items()}
    ratio = mvox["dask"] / mvox["local"]
    rounds = len(res["compute"]["local"])
    return [f"| CLc W6 256^3 Zarr (64^3 chunks) -> Zarr, k3, {res['tiles']} tiles, medians of "
            f"{rounds} rounds | compute (s) | Mvoxel/s | per worker | wall (s) |",
            "|---|---|---|---|---|",
            f"| local engine, --workers 2 | {c['local']:.2f} | {mvox['local']:.1f} | "
            f"{mvox['local'] / 2:.1f} | {w['local']:.2f} |",
            f"| dask scheduler + {res['workers']} dask workers (--nthreads 1, loopback) | "
            f"{c['dask']:.2f} | {mvox['dask']:.1f} | {mvox['dask'] / 2:.1f} | {w['dask']:.2f} |",
            f"| goal: >= {REAL_GOAL:.0%} of the local engine | {ratio:.0%}: "
            f"{_met(ratio >= REAL_GOAL)} | | | |",
            f"| outputs: max abs difference | {res['diff']:.1e} | | | |"]


def run(tmp, rounds=3):
    """Every CL measurement in ``tmp``; the report's lines."""
    try:
        import dask  # noqa: F401
        import distributed  # noqa: F401
        import zarr  # noqa: F401
    except ImportError:
        return ["CL: skipped (needs the distributed extra: dask, distributed, zarr)"]
    lines = ["CL: conv3d on a Dask cluster (benchmarks/cluster.py)", ""]
    lines += report_payload(measure_payload(tmp))
    lines.append("")
    lines += report_small(measure_small_tiles(tmp, max(1, rounds)))
    lines.append("")
    lines += report_real(measure_real_cluster(tmp, rounds))
    return lines


if __name__ == "__main__":
    import tempfile
    folder = tempfile.mkdtemp(prefix="conv3d-cl-", dir=os.environ.get("BENCH_TMP"))
    try:
        print("\n".join(run(folder, int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
