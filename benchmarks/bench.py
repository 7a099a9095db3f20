"""The engine against PyTorch and SciPy, side by side in one process (`make bench`).

    python benchmarks/bench.py [--only W1,...,W8,NF,CH,ST,CL] [--repeats N] [--skip-w5] [--markdown]
                               [--against GIT_REF]

Every workload is timed as the median of repeats after one warm-up run (which
compiles the numba kernels and fills caches), for this tool and for each peer
that is installed (a missing peer is skipped with a note), in interleaved
rounds with a pause between contenders (see ``time_side_by_side``). Ratios are this
tool's time / the peer's: below 1 is faster. GFLOP/s counts useful
multiply-adds x 2 and is set against this machine's NumPy sgemm, measured here.
W5 runs the `conv3d` CLI on a 2 GiB .npy with and without --memory-limit and
reports the peak memory of the whole process tree (sampled PSS, shared pages
counted once) and /usr/bin/time's maximum RSS (of the largest process).
NF is the cost on finite data of giving Keras's result on NaN and Inf: FFT
and Winograd tiles check their input for them (the direct paths need no
check); W2 and W3 are timed with the check and with it skipped, side by side.
CH is the method-choice grid (``benchmarks/choice.py``): every suitable method
timed on 38 layers, and how often ``--method auto`` picks one within 10% of
the fastest.
W6-W8 are file to file against the same layer in memory (benchmarks/files.py): Zarr -> Zarr
throughput, .nii.gz against .nii, and .npy / .nii / HDF5 runs' own time.
ST is the commands' start-up, as ratios to `python -c "import numpy, click"`
(benchmarks/startup.py).
CL is the engine on Dask (benchmarks/cluster.py): what the client sends per
task and its memory for 65,536 tiles (a dry run), 4,096 small tiles on a
LocalCluster against the local engine, W6 on a real scheduler and two workers.
It takes several minutes, so only `--only CL` runs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import choice
import files
import numpy as np

from conv3d_cli import Conv3D, Conv3DTranspose

try:
    import torch
except ImportError:
    torch = None
try:
    from scipy import signal
except ImportError:  # pragma: no cover
    signal = None

CORES = len(os.sched_getaffinity(0))
GOALS = {  # (peer, max ratio)
    "W1": [("torch", 0.5)],
    "W2": [("scipy.fftconvolve", 0.6), ("torch", 0.1)],
    "W3": [("torch", 0.8)],
    "W4": [("torch", 0.5)],
}


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_side_by_side(contenders, repeats):
    """Median seconds per contender, timed in interleaved rounds.

    Each round runs every contender once, with a pause between them so that
    thread pools that spin after work (OpenMP, OpenBLAS) are parked again and
    no contender runs while another's threads still hold the cores.
    """
    for fn in contenders.values():
        fn()  # warm-up: compile, allocate, fill caches
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            time.sleep(0.25)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def sgemm_gflops():
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    t = timeit(lambda: a @ a, 5)
    return 2 * 2048 ** 3 / t / 1e9


def workloads(rng):
    """name -> (description, layer, x in Keras layout)."""
    out = {}
    x = rng.standard_normal((1, 256, 256, 256, 1)).astype(np.float32)
    out["W1"] = ("Conv3D 1x256^3x1 -> 1, k3, valid", Conv3D(1, 3), x)
    x = rng.standard_normal((1, 192, 192, 192, 1)).astype(np.float32)
    out["W2"] = ("Conv3D 1x192^3x1 -> 1, k15, valid", Conv3D(1, 15), x)
    x = rng.standard_normal((4, 64, 64, 64, 32)).astype(np.float32)
    out["W3"] = ("Conv3D 4x64^3x32 -> 64, k3, valid", Conv3D(64, 3), x)
    x = rng.standard_normal((4, 32, 32, 32, 64)).astype(np.float32)
    out["W4"] = ("Conv3DTranspose 4x32^3x64 -> 32, k3, s2, valid",
                 Conv3DTranspose(32, 3, strides=2), x)
    for _, layer, x in out.values():
        layer.build(x.shape)
        layer.set_weights([w * 0 + rng.standard_normal(w.shape).astype(np.float32) * 0.1
                           for w in layer.get_weights()])
    return out


def torch_fn(layer, x):
    if torch is None:
        return None
    torch.set_num_threads(CORES)
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    bias = torch.from_numpy(layer.bias)
    if isinstance(layer, Conv3DTranspose):
        # Keras (kd, kh, kw, F, C) -> torch (C, F, kd, kh, kw)
        k = torch.from_numpy(np.ascontiguousarray(layer.kernel.transpose(4, 3, 0, 1, 2)))
        return lambda: torch.nn.functional.conv_transpose3d(xt, k, bias, stride=layer.strides)
    k = torch.from_numpy(np.ascontiguousarray(layer.kernel.transpose(4, 3, 0, 1, 2)))
    return lambda: torch.nn.functional.conv3d(xt, k, bias, stride=layer.strides)


def check(name, layer, x, peers):
    """Largest difference between our output and a peer's, relative to the output scale."""
    y = layer(x)
    ref = None
    if "torch" in peers and torch is not None:
        ref = np.moveaxis(peers["torch"]().numpy(), 1, -1)
    elif signal is not None and name == "W2":
        ref = signal.fftconvolve(x[0, ..., 0], layer.kernel[::-1, ::-1, ::-1, 0, 0], mode="valid")
        ref = ref[None, ..., None] + layer.bias
    if ref is None:
        return None
    return float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))


def bench_compute(only, repeats):
    rng = np.random.default_rng(0)
    rows = []
    for name, (desc, layer, x) in workloads(rng).items():
        if only and name not in only:
            continue
        peers = {}
        tf = torch_fn(layer, x)
        if tf is not None:
            peers["torch"] = tf
        if name == "W2" and signal is not None:
            k = layer.kernel[::-1, ::-1, ::-1, 0, 0].copy()
            v = x[0, ..., 0]
            peers["scipy.fftconvolve"] = lambda: signal.fftconvolve(v, k, mode="valid") + layer.bias
            peers["scipy.oaconvolve"] = lambda: signal.oaconvolve(v, k, mode="valid") + layer.bias
        flops = layer.job(x.shape).flops()
        err = check(name, layer, x, peers)
        contenders = {("ours", w): (lambda w=w: layer(x, workers=w)) for w in sorted({1, CORES})}
        contenders.update(peers)
        times = time_side_by_side(contenders, repeats)
        layer(x)
        ours = {w: times[("ours", w)] for w in sorted({1, CORES})}
        peer_times = {p: times[p] for p in peers}
        rows.append({"name": name, "desc": desc, "flops": flops, "ours": ours,
                     "peers": peer_times, "method": layer.last_stats.method, "err": err})
        print(f"  {name} done", file=sys.stderr)
    return rows


def bench_finite_check(repeats):
    """NF: W2 (FFT) and W3 (Winograd) with the tiles' NaN/Inf check and without it,
    and the seconds spent in the check itself during one run."""
    task = importlib.import_module("conv3d_cli.engine.task")
    checked = task.nonfinite_voxels
    spent = [0.0]

    def timed_check(x):
        start = time.perf_counter()
        try:
            return checked(x)
        finally:
            spent[0] += time.perf_counter() - start

    def run(layer, x, check):
        task.nonfinite_voxels = check
        try:
            layer(x, workers=CORES)
        finally:
            task.nonfinite_voxels = checked

    rows = []
    for name, (desc, layer, x) in workloads(np.random.default_rng(0)).items():
        if name not in ("W2", "W3"):
            continue
        times = time_side_by_side({True: lambda: run(layer, x, checked),
                                   False: lambda: run(layer, x, lambda _: None)}, repeats)
        spent[0] = 0.0
        run(layer, x, timed_check)
        rows.append((name, desc, layer.last_stats.method, times[True], times[False], spent[0]))
        print(f"  NF {name} done", file=sys.stderr)
    return rows


class TreeRSS(threading.Thread):
    """Peak memory of a process and its descendants, sampled every 20 ms: the sum
    of their PSS (proportional set size: pages shared between the parent and its
    forked workers counted once, split between them), i.e. the memory the job
    really holds."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def _tree_rss(self):
        children = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        total, todo = 0, [self.pid]
        while todo:
            p = todo.pop()
            todo += children.get(p, [])
            try:
                with open(f"/proc/{p}/smaps_rollup") as fh:
                    for line in fh:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def run(self):
        while self.running:
            self.peak = max(self.peak, self._tree_rss())
            time.sleep(0.02)


def run_cli(args):
    conv3d = os.path.join(os.path.dirname(sys.executable), "conv3d")
    timer = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []
    cmd = [*timer, conv3d, *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    sampler = TreeRSS(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"conv3d {' '.join(args)} failed:\n{err}")
    max_rss = None
    for line in err.splitlines():
        if "Maximum resident set size" in line:
            max_rss = int(line.split()[-1]) * 1024
    return wall, sampler.peak, max_rss


def bench_w5(tmp):
    """W5: 1x512x1024x1024x1 float32 .npy (2 GiB), k5, with and without a 512M limit."""
    path = os.path.join(tmp, "w5.npy")
    shape = (1, 512, 1024, 1024, 1)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    rng = np.random.default_rng(5)
    for z in range(0, 512, 32):
        mm[0, z:z + 32] = rng.standard_normal((32, 1024, 1024, 1), dtype=np.float32)
    mm.flush()
    del mm
    common = ["run", path, os.path.join(tmp, "w5_out.npy"), "--filters", "1", "--kernel-size",
              "5", "--seed", "0", "--overwrite", "--no-progress", "-q"]
    limited = run_cli(common + ["--memory-limit", "512M"])
    unlimited = run_cli(common)
    return limited, unlimited


def fmt_s(t):
    return f"{t:.3f}"


def report(rows, sgemm, w5, markdown, nf=(), grid=()):
    lines = []
    lines.append(f"cores: {CORES}; NumPy sgemm: {sgemm:.0f} GFLOP/s; "
                 f"torch: {torch.__version__ if torch else 'not installed (skipped)'}")
    lines.append("")
    lines.append(f"| workload | method | conv3d 1 worker (s) | conv3d {CORES} workers (s) | "
                 "scaling | GFLOP/s (% sgemm) | peer | peer (s) | ratio | goal | max rel. diff |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t1, tn = r["ours"][1], r["ours"][max(r["ours"])]
        gf = r["flops"] / tn / 1e9
        goals = dict(GOALS.get(r["name"], []))
        peers = r["peers"] or {"(none installed)": None}
        for i, (peer, pt) in enumerate(peers.items()):
            ratio = tn / pt if pt else None
            goal = goals.get(peer)
            verdict = "" if goal is None or ratio is None else (
                f"<= {goal}: {'met' if ratio <= goal else 'NOT met'}")
            head = (f"| {r['name']} {r['desc']} | {r['method']} | {fmt_s(t1)} | {fmt_s(tn)} | "
                    f"{t1 / tn:.2f}x | {gf:.1f} ({100 * gf / sgemm:.0f}%) |"
                    ) if i == 0 else "| | | | | | |"
            err = f"{r['err']:.1e}" if (i == 0 and r["err"] is not None) else ""
            lines.append(f"{head} {peer} | {fmt_s(pt) if pt else '-'} | "
                         f"{'%.2f' % ratio if ratio else '-'} | {verdict} | {err} |")
    if w5:
        (lw, lpeak, lmax), (uw, upeak, umax) = w5
        mib = 1 << 20
        lines.append("")
        lines.append("| W5: conv3d run, 1x512x1024x1024x1 .npy (2 GiB), k5 | wall (s) | "
                     "peak PSS, process tree (MiB) | "
                     "max RSS, largest process (MiB, /usr/bin/time -v) |")
        lines.append("|---|---|---|---|")
        for label, wall, peak, max_rss in (("--memory-limit 512M", lw, lpeak, lmax),
                                           ("no limit", uw, upeak, umax)):
            rss = max_rss / mib if max_rss else float("nan")
            lines.append(f"| {label} | {wall:.1f} | {peak / mib:.0f} | {rss:.0f} |")
        lines.append(f"| goal: peak <= 768 MiB, wall <= 1.5x | {lw / uw:.2f}x | "
                     f"{'met' if lpeak <= 768 * mib else 'NOT met'} | |")
    if nf:
        lines.append("")
        lines.append(f"| NF: finite data, with and without the NaN/Inf check ({CORES} workers) | "
                     "method | with (s) | without (s) | ratio | in the check (s) |")
        lines.append("|---|---|---|---|---|---|")
        for name, desc, method, with_check, without, spent in nf:
            lines.append(f"| {name} {desc} | {method} | {fmt_s(with_check)} | {fmt_s(without)} | "
                         f"{with_check / without:.3f} | {spent:.4f} |")
    if grid:
        lines.append("")
        lines.append(f"CH: method choice, every suitable method timed ({CORES} workers, medians)")
        lines.append("")
        lines.append(choice.report(grid, CORES))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W3,W5")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-w5", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--against", help="git ref: also time its engine side by side (kernels.py)")
    args = ap.parse_args()
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    if torch is None:
        print("note: torch is not installed; its columns are skipped", file=sys.stderr)
    sgemm = sgemm_gflops()
    compute = only - {"W5", "W6", "W7", "W8", "NF", "CH", "ST", "CL"} if only else None
    rows = bench_compute(compute, args.repeats) if compute is None or compute else []
    nf = bench_finite_check(args.repeats) if not only or "NF" in only else []
    grid = choice.run_grid(max(3, args.repeats // 2), CORES) if not only or "CH" in only else []
    w5 = None
    if not args.skip_w5 and (not only or "W5" in only):
        tmp = tempfile.mkdtemp(prefix="conv3d-bench-", dir=os.environ.get("BENCH_TMP", "."))
        try:
            w5 = bench_w5(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    file_rows = files.run(only & set(files.BENCHES) if only else set(),
                          max(3, args.repeats // 2)) \
        if not only or only & set(files.BENCHES) else []
    report(rows, sgemm, w5, args.markdown, nf, grid)
    if file_rows:
        print()
        print(f"W6-W8: file to file against layer(x) in memory ({CORES} cores; medians)")
        print()
        print(files.report(file_rows))
    if not only or "ST" in only:
        import startup
        print()
        print(startup.report(startup.measure_all(startup.RUNS), startup.RUNS, args.markdown))
    if "CL" in only:
        import cluster
        tmp = tempfile.mkdtemp(prefix="conv3d-bench-", dir=os.environ.get("BENCH_TMP", "."))
        try:
            print()
            print("\n".join(cluster.run(tmp, max(2, args.repeats // 2))))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.against:
        import kernels
        kernels.main(["--against", args.against, "--repeats", str(args.repeats)]
                     + (["--only", ",".join(sorted(compute))] if compute else []))


if __name__ == "__main__":
    main()
