"""Fit the cost model of ``conv3d_cli/engine/choose.py`` on this machine.

    python tools/fit_cost_model.py [--quick] [--rounds N] [--output FILE] [--data FILE]
    python tools/fit_cost_model.py --refit tools/cost_model_data.json   # no timing

For each path (stencil, im2col GEMM, scatter-transposed, Winograd, FFT) the
script times the engine's own tile task (``execute.compute_tile``: read,
pad, compute, bias) on layers and tile shapes chosen to separate the path's
unit-operation counts (short and long W rows, few and many channels,
strides, transposed phases, groups, tiles from tiny to beyond the caches) on
one thread, by the thread's CPU time (which other processes inflate least);
the kernel transforms (FFT spectra, Winograd's ``G g G^T``) on their own; a
third of the tiles that call BLAS or the FFT on one thread and on all cores,
and three mid-sized tiles per path alone and one per core side by side, by
the wall clock (the speed-ups only from rounds in which no other process
took a core). Everything is timed once to warm up and then in rounds,
keeping each timing's best. Then:

- the seconds per operation of each path, by non-negative least squares on
  the relative error (``sum ((predicted - measured) / measured)^2``) over the
  counts of ``choose.tile_counts`` and ``choose.setup_counts``: the model and
  the fit share one definition of what is counted;
- the parallel fraction ``p`` of BLAS and of the FFT (Amdahl:
  ``t_n = t_1 * (1 - (1 - 1/n) * p * share)``, the library's share of the
  tile by the fitted constants), and that of tiles side by side
  (``t_together / t_alone = n / amdahl(p, n)``, the median over the paths).

It writes the constants to ``conv3d_cli/engine/cost_model.json`` (read by
``choose.py``) and every measurement with its counts to
``tools/cost_model_data.json``, and prints the constants and each path's fit
error. About two minutes on two cores. Run it on a quiet machine: other
processes make the speed-ups look smaller than they are (the script warns
when the load average is above half the cores). ``--quick`` (tiny tiles,
one round: for tests) takes a second or two and fits nothing useful.
``--refit DATA`` times nothing: it fits the measurements of a previous run,
recounted by the current ``choose.py`` (after a change to the model only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import pprint
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from itertools import product
from pathlib import Path

import numpy as np
from scipy.optimize import lsq_linear, nnls
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conv3d_cli import Conv3D, Conv3DTranspose  # noqa: E402
from conv3d_cli.engine import choose  # noqa: E402
from conv3d_cli.engine.fft import SpectrumCache  # noqa: E402
from conv3d_cli.engine.plan import Tile  # noqa: E402
from conv3d_cli.engine.task import compute_tile  # noqa: E402
from conv3d_cli.engine.winograd import kernel_transform  # noqa: E402
from conv3d_cli.layout import CanonicalView, Layout  # noqa: E402

DATA_FILE = ROOT / "tools" / "cost_model_data.json"
CORES = len(os.sched_getaffinity(0))
# The speed-up of tiles on all cores is measured on every THREAD_EVERY-th
# configuration of a path that calls BLAS or the FFT; tiles side by side on
# the configurations marked ``crowd`` (tiles of 10-150 ms: shorter ones
# measure the thread hand-off instead).
THREAD_EVERY = 3
# A wall-clock timing counts as quiet when this process's threads waited for a
# core for at most this fraction of it; those without a quiet round get more
# rounds for up to QUIET_WAIT seconds.
QUIET_WAITED = 0.02
QUIET_WAIT = 40.0


def _conv(path, k, c, f, n, s=1, g=1, padding="valid", crowd=False):
    """A Conv3D configuration; ``crowd``: also time one tile per core side by side."""
    return {"path": path, "layer": "Conv3D", "k": k, "s": s, "c": c, "f": f, "g": g,
            "n": n if isinstance(n, tuple) else (n, n, n), "padding": padding, "crowd": crowd}


def _tconv(path, k, c, f, n, s=1, padding="valid", crowd=False):
    return {"path": path, "layer": "Conv3DTranspose", "k": k, "s": s, "c": c, "f": f, "g": 1,
            "n": n if isinstance(n, tuple) else (n, n, n), "padding": padding, "crowd": crowd}


# Layers and input sizes per path; the whole output is one tile. Each list
# varies what the path's counts depend on, so that the fit can tell them apart,
# from tiny tiles (the per-tile and per-call overheads) to tiles whose working
# set is far beyond the caches, as the planner's are.
CONFIGS = {
    "stencil": [
        _conv("stencil", 1, 1, 1, 8), _conv("stencil", 1, 1, 1, 128),
        _conv("stencil", 3, 1, 1, 6), _conv("stencil", 3, 1, 1, 66),
        _conv("stencil", 3, 1, 1, (34, 34, 258)), _conv("stencil", 3, 1, 1, (130, 130, 10)),
        _conv("stencil", 5, 1, 1, 132), _conv("stencil", 5, 1, 1, (20, 20, 200)),
        _conv("stencil", 7, 1, 1, (69, 262, 262), crowd=True),
        _conv("stencil", 7, 1, 1, (70, 70, 14)),
        _conv("stencil", 3, 4, 4, 34), _conv("stencil", 3, 4, 4, 98),
        _conv("stencil", 3, 1, 16, 98), _conv("stencil", 3, 16, 1, 40),
        _conv("stencil", 3, 16, 1, 98, crowd=True), _conv("stencil", 5, 2, 8, 30),
        _conv("stencil", 3, 1, 1, 129, s=2), _conv("stencil", 7, 1, 1, 128, s=2, padding="same"),
        _conv("stencil", 5, 4, 4, 64, s=2, padding="same", crowd=True),
        _tconv("stencil", 3, 1, 1, 64, s=2), _tconv("stencil", 5, 2, 2, 32, s=2),
        _tconv("stencil", 9, 2, 2, 48, s=2), _tconv("stencil", 3, 4, 4, 32),
        _tconv("stencil", 7, 1, 1, 96), _tconv("stencil", 3, 1, 1, 8, s=2),
        _tconv("stencil", 3, 1, 1, 16, s=2, padding="same"), _tconv("stencil", 5, 1, 1, 12, s=2),
    ],
    "gemm": [
        _conv("gemm", 3, 8, 8, 34), _conv("gemm", 3, 16, 16, 66, crowd=True),
        _conv("gemm", 3, 16, 16, 6),
        _conv("gemm", 3, 32, 32, 26, crowd=True), _conv("gemm", 3, 64, 64, 18),
        _conv("gemm", 3, 32, 64, 48),
        _conv("gemm", 3, 4, 64, 34), _conv("gemm", 3, 64, 4, 26), _conv("gemm", 3, 32, 8, 34),
        _conv("gemm", 3, 64, 64, 34, padding="same"),
        _conv("gemm", 1, 64, 64, 64), _conv("gemm", 1, 8, 8, 64),
        _conv("gemm", 5, 16, 16, 48, crowd=True), _conv("gemm", 5, 4, 8, 64),
        _conv("gemm", 7, 8, 8, 24),
        _conv("gemm", 3, 16, 32, 64, s=2, padding="same"),
        _conv("gemm", 5, 32, 32, 48, s=2, padding="same"),
        _conv("gemm", 3, 32, 32, 26, g=2), _conv("gemm", 3, 64, 64, 20, g=4),
        _tconv("gemm", 3, 16, 16, 48), _tconv("gemm", 3, 32, 64, 32),
    ],
    "scatter": [
        _tconv("scatter", 3, 64, 32, 32, s=2, crowd=True),
        _tconv("scatter", 3, 16, 16, 32, s=2, crowd=True),
        _tconv("scatter", 2, 32, 32, 32, s=2),
        _tconv("scatter", 4, 16, 16, 32, s=2, padding="same"),
        _tconv("scatter", 5, 8, 8, 40, s=2, padding="same", crowd=True),
        _tconv("scatter", 1, 8, 8, 48, s=2),
        _tconv("scatter", 3, 8, 64, 24, s=2), _tconv("scatter", 3, 16, 16, 4, s=2),
        _tconv("scatter", 3, 64, 8, 24, s=2),
    ],
    "winograd": [
        _conv("winograd", 3, 8, 8, 34), _conv("winograd", 3, 16, 16, 66, crowd=True),
        _conv("winograd", 3, 16, 16, 50), _conv("winograd", 3, 32, 64, 48, crowd=True),
        _conv("winograd", 3, 64, 64, 34, padding="same", crowd=True),
        _conv("winograd", 3, 16, 16, 8),
        _conv("winograd", 3, 32, 32, 26, g=2), _conv("winograd", 3, 64, 8, 26),
        _conv("winograd", 3, 8, 64, 26), _tconv("winograd", 3, 16, 16, 48, padding="same"),
    ],
    "fft": [
        _conv("fft", 3, 1, 1, 34), _conv("fft", 7, 1, 1, 70), _conv("fft", 15, 1, 1, 96),
        _conv("fft", 9, 1, 1, 128, crowd=True), _conv("fft", 5, 1, 1, 20),
        _conv("fft", 7, 1, 1, 256, crowd=True),
        _conv("fft", 9, 1, 1, 200), _conv("fft", 5, 4, 4, 96),
        _conv("fft", 7, 1, 1, 128, s=2, padding="same"),
        _tconv("fft", 7, 1, 1, 96), _tconv("fft", 11, 1, 1, 48, s=2, padding="same"),
        _tconv("fft", 3, 1, 1, 32, s=2), _tconv("fft", 3, 1, 1, 8, s=2),
        _tconv("fft", 3, 1, 1, 16, s=2, padding="same"), _conv("fft", 3, 1, 1, 10),
        _tconv("fft", 5, 2, 2, 12, s=2),
        _conv("fft", 5, 4, 8, 64), _conv("fft", 7, 4, 8, 36), _conv("fft", 9, 8, 8, 32),
        _conv("fft", 5, 16, 16, 48, crowd=True), _conv("fft", 7, 2, 2, 96),
        _conv("fft", 7, 1, 16, 40),
        _conv("fft", 3, 16, 1, 96, padding="same"), _conv("fft", 3, 32, 32, 24),
        _conv("fft", 5, 8, 8, 32, g=2), _conv("fft", 1, 16, 16, 24),
        _tconv("fft", 5, 8, 8, 40, s=2, padding="same"),
    ],
}
QUICK = {  # tiny tiles, a few per path: checks that the script runs, fits nothing useful
    "stencil": [_conv("stencil", 3, 1, 1, 10, crowd=True), _conv("stencil", 1, 1, 1, 8),
                _tconv("stencil", 3, 1, 1, 6, s=2)],
    "gemm": [_conv("gemm", 3, 8, 8, 8), _conv("gemm", 1, 8, 8, 8)],
    "scatter": [_tconv("scatter", 3, 8, 8, 4, s=2), _tconv("scatter", 2, 8, 8, 4, s=2)],
    "winograd": [_conv("winograd", 3, 8, 8, 8), _conv("winograd", 3, 8, 8, 12)],
    "fft": [_conv("fft", 5, 1, 1, 12), _conv("fft", 3, 2, 2, 10)],
}
METHOD = {"stencil": "direct", "gemm": "direct", "scatter": "direct", "winograd": "winograd",
          "fft": "fft"}


# ------------------------------------------------------------------ measuring
def _config_layer_job(config):
    kwargs = {"groups": config["g"]} if config["layer"] == "Conv3D" else {}
    cls = Conv3D if config["layer"] == "Conv3D" else Conv3DTranspose
    layer = cls(config["f"], config["k"], strides=config["s"], padding=config["padding"],
                **kwargs)
    shape = (1,) + tuple(config["n"]) + (config["c"],)
    layer.build(shape)
    return layer.job(shape)


def runs_its_path(config):
    """Whether the engine computes the configuration by its path (a job too small
    to pay for loading numba runs the im2col GEMM, not the stencil)."""
    return choose.path_of(_config_layer_job(config), METHOD[config["path"]]) == config["path"]


def config_job(config):
    """(job, tile) of a configuration: the whole output as one tile."""
    job = _config_layer_job(config)
    path = choose.path_of(job, METHOD[config["path"]])
    if path != config["path"]:
        raise SystemExit(f"configuration {config} runs the {path} path, not {config['path']}")
    return job, Tile(0, 1, tuple((0, n) for n in job.out_spatial))


def build(config, rng):
    """(job, tile, source): the configuration with random input."""
    job, tile = config_job(config)
    x = rng.standard_normal((1,) + tuple(config["n"]) + (config["c"],), dtype=np.float32)
    return job, tile, CanonicalView(x, Layout(x.shape, "channels_last"))


def _waited():
    """Seconds this process's threads have spent runnable but waiting for a core
    (Linux ``/proc/self/task/*/schedstat``); 0 where that is not available."""
    total = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


class Timing:
    """One thing to time: ``run()`` once per round, the best round kept.

    A tile on one thread is timed by the thread's CPU time, which other
    processes on the machine inflate least (they take the core away, which
    the wall clock would count). Speed-ups (several threads, tiles side by
    side, and the one-thread times they are compared with) need the wall
    clock and every core: their best is kept from the rounds in which this
    process's threads waited for a core at most ``QUIET_WAITED`` of the time
    (``quiet``: no other process took a core from them).
    """

    def __init__(self, row, run, threads=1, clock=None):
        self.row, self.run, self.threads = row, run, threads
        self.clock = clock or (time.thread_time if threads == 1 else time.perf_counter)
        self.best = self.quiet = math.inf

    @property
    def wall(self):
        return self.clock is time.perf_counter

    def once(self):
        with threadpool_limits(limits=self.threads):
            before = _waited()
            start = self.clock()
            self.run()
            seconds = self.clock() - start
            waited = _waited() - before
        self.best = min(self.best, seconds)
        if waited <= QUIET_WAITED * seconds:
            self.quiet = min(self.quiet, seconds)

    def seconds(self):
        """The best time, and whether it was measured with the machine to itself."""
        if not self.wall:
            return self.best, True
        return (self.quiet, True) if self.quiet < math.inf else (self.best, False)


def tile_task(job, tile, source, method, threads):
    cache = SpectrumCache()  # filled by the warm-up round, as after a run's first tile
    return lambda: compute_tile(job, tile, source, method, cache, fft_workers=threads)


def crowd_task(job, tile, source, method):
    """``CORES`` copies of the tile at once, one thread each (as the workers of a
    plan run their tiles), on a pool whose threads live on (so that their waits
    for a core are counted)."""
    caches = [SpectrumCache() for _ in range(CORES)]
    pool = ThreadPoolExecutor(CORES)

    def together():
        for f in [pool.submit(compute_tile, job, tile, source, method, c) for c in caches]:
            f.result()
    return together


def setup_task(job, tile, path):
    """The kernel transforms of the tile (FFT spectra of every term combination,
    or Winograd's), from an empty cache."""
    axes = choose.tile_axes(job, tile.out)
    combos = list(product(*[terms for _, _, terms in axes]))

    def spectra():
        cache = SpectrumCache()
        for combo in combos:
            cache.get(job.taps, combo, choose.fft_shape(combo)[1], job.work_dtype)

    def winograd():
        kernel_transform(job.taps, combos[0])
    return spectra if path == "fft" else winograd


def timings(configs):
    """Everything to time: each configuration's tile at one thread (and at all
    cores when it calls BLAS or the FFT), FFT kernel spectra, and a few tiles per
    path side by side."""
    rng = np.random.default_rng(0)
    out = []
    for path, cases in configs.items():
        cases = [c for c in cases if runs_its_path(c)]
        for i, config in enumerate(cases):
            job, tile, source = build(config, rng)
            method = METHOD[path]
            counts = dict(choose.tile_counts(job, path, tile))
            threaded = any((path, name) in choose.THREADED for name in counts)
            out.append(Timing({"kind": "tile", "path": path, "config": config, "threads": 1,
                               "counts": counts}, tile_task(job, tile, source, method, 1)))
            # speed-up on all cores: every FFT tile large enough to run on threads
            every = 1 if path == "fft" else THREAD_EVERY
            if threaded and CORES > 1 and i % every == 0 and choose.uses_threads(path, counts):
                out.append(Timing({"kind": "wall", "path": path, "config": config, "threads": 1},
                                  tile_task(job, tile, source, method, 1), clock=time.perf_counter))
                out.append(Timing({"kind": "wall", "path": path, "config": config,
                                   "threads": CORES, "counts": counts},
                                  tile_task(job, tile, source, method, CORES), CORES))
            if path in choose.SETUP:
                counts = dict(choose.setup_counts(job, path, choose.tile_axes(job, tile.out)))
                out.append(Timing({"kind": "tile", "path": choose.SETUP[path], "config": config,
                                   "threads": 1, "counts": counts}, setup_task(job, tile, path)))
            if CORES > 1 and config["crowd"]:
                out.append(Timing({"kind": "alone", "path": path, "config": config},
                                  tile_task(job, tile, source, method, 1),
                                  clock=time.perf_counter))
                out.append(Timing({"kind": "crowd", "path": path, "config": config},
                                  crowd_task(job, tile, source, method), clock=time.perf_counter))
    return out


def measure(configs, rounds, log, quiet_wait=QUIET_WAIT):
    """Time everything once to warm up, then in ``rounds`` rounds (each one time
    of each), keeping each one's best: a burst of other load on the machine
    then spoils one round of many timings rather than all rounds of one. The
    wall-clock timings not yet measured on a quiet machine get more rounds,
    for up to ``quiet_wait`` seconds."""
    todo = timings(configs)
    for t in todo:
        t.once()
    for r in range(rounds):
        for t in todo:
            t.once()
        print(f"  round {r + 1}/{rounds} done", file=log)
    deadline = time.perf_counter() + quiet_wait
    waiting = [t for t in todo if t.wall and t.quiet == math.inf]
    while waiting and time.perf_counter() < deadline:
        for t in waiting:
            t.once()
        waiting = [t for t in waiting if t.quiet == math.inf]
    if waiting:
        print(f"  {len(waiting)} speed-up timings never had the machine to themselves",
              file=log)
    rows = [dict(t.row, seconds=t.seconds()[0]) for t in todo if t.row["kind"] == "tile"]
    walls = [t for t in todo if t.row["kind"] == "wall"]
    for one, many in zip(walls[::2], walls[1::2]):
        rows.append(dict(many.row, seconds=many.seconds()[0], seconds_1=one.seconds()[0],
                         quiet=many.seconds()[1] and one.seconds()[1]))
    crowd = []
    for alone, together in zip(*[[t for t in todo if t.row["kind"] == k]
                                 for k in ("alone", "crowd")]):
        crowd.append({"path": alone.row["path"], "config": alone.row["config"],
                      "alone": alone.seconds()[0], "together": together.seconds()[0],
                      "ratio": together.seconds()[0] / alone.seconds()[0],
                      "quiet": alone.seconds()[1] and together.seconds()[1]})
    return rows, crowd


def _quiet_first(items):
    """The items measured on a quiet machine, if any; else all of them."""
    quiet = [i for i in items if i.get("quiet")]
    return quiet or list(items)


# -------------------------------------------------------------------- fitting
def fit_constants(rows):
    """Seconds per operation of each path: non-negative least squares on the
    relative error of the one-thread timings."""
    constants, errors = {}, {}
    for path in dict.fromkeys(r["path"] for r in rows):
        mine = [r for r in rows if r["path"] == path and r["threads"] == 1]
        names = sorted({n for r in mine for n in r["counts"]})
        a = np.array([[r["counts"].get(n, 0.0) / r["seconds"] for n in names] for r in mine])
        scale = np.maximum(a.max(axis=0), 1e-300)  # columns of equal size for the solver
        coef, _ = nnls(a / scale, np.ones(len(mine)))
        constants[path] = {n: float(c) for n, c in zip(names, coef / scale)}
        rel = a @ (coef / scale) - 1
        errors[path] = {"median": float(np.median(np.abs(rel))),
                        "max": float(np.max(np.abs(rel)))}
    return constants, errors


def fit_threads(rows, constants):
    """Parallel fractions ``p`` of BLAS and of the FFT, from tiles timed on one
    thread and on ``n`` (wall clock both): with ``f_lib`` the library's share of
    the tile by the fitted constants, ``t_1 - t_n = (1 - 1/n) t_1 sum f_lib p_lib``,
    by least squares in seconds (the long tiles, where threads matter, weigh
    most; tiny FFTs are slower on two threads, which this law cannot say)."""
    libraries = sorted(set(choose.THREADED.values()))
    a, b = [], []
    for r in _quiet_first([r for r in rows if r["threads"] > 1]):
        n = r["threads"]
        c = constants[r["path"]]
        share = {lib: 0.0 for lib in libraries}
        total = sum(c.get(name, 0.0) * count for name, count in r["counts"].items())
        for name, count in r["counts"].items():
            lib = choose.THREADED.get((r["path"], name))
            if lib:
                share[lib] += c.get(name, 0.0) * count / total
        a.append([(1 - 1 / n) * share[lib] * r["seconds_1"] for lib in libraries])
        b.append(r["seconds_1"] - r["seconds"])
    if not a:
        return {lib: 0.0 for lib in libraries}
    res = lsq_linear(np.array(a), np.array(b), bounds=(0.0, 1.0))
    return {lib: float(p) for lib, p in zip(libraries, res.x)}


def fit_workers(crowd):
    """The fraction ``p`` with ``t_together / t_alone = n / amdahl(p, n)`` (``n =
    CORES``), from the median ratio over every path's tiles side by side (one
    fraction for all paths: the differences between them are smaller than
    what other load on the machine does to each)."""
    if not crowd or CORES == 1:
        return 1.0
    ratio = statistics.median(c["ratio"] for c in _quiet_first(crowd))
    return float(min(1.0, max(0.0, (CORES - ratio) / (CORES - 1))))


def machine():
    import numba
    import scipy
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"date": date.today().isoformat(), "cpu": cpu, "cores": CORES,
            "python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "numba": numba.__version__,
            "command": "python tools/fit_cost_model.py"}


def report(model, errors, out=sys.stdout):
    print(f"# cost model fitted {model['fitted']['date']} on {model['fitted']['cpu']}, "
          f"{model['fitted']['cores']} cores (seconds per operation)", file=out)
    print("CONSTANTS = " + pprint.pformat(model["constants"], width=100), file=out)
    print("THREADS = " + pprint.pformat(model["threads"]), file=out)
    print(f"WORKERS = {model['workers']}", file=out)
    for path, e in errors.items():
        print(f"# {path}: relative error median {e['median']:.1%}, max {e['max']:.1%}", file=out)


def recount(rows):
    """The rows with their counts recomputed by the current ``choose`` (from each
    row's configuration), to refit stored timings after a change to the model."""
    out = []
    for r in rows:
        job, tile = config_job(r["config"])
        path = r["path"]
        if path in choose.SETUP.values():
            kind = next(k for k, v in choose.SETUP.items() if v == path)
            counts = choose.setup_counts(job, kind, choose.tile_axes(job, tile.out))
        else:
            counts = choose.tile_counts(job, path, tile)
        out.append(dict(r, counts=dict(counts)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny tiles, one round (for tests)")
    ap.add_argument("--rounds", type=int, default=None, help="timings of each tile (the best kept)")
    ap.add_argument("--output", default=str(choose.MODEL_FILE), help="the constants (JSON)")
    ap.add_argument("--data", default=str(DATA_FILE), help="the measurements (JSON)")
    ap.add_argument("--refit", metavar="DATA", default=None,
                    help="time nothing: fit the measurements of a previous run (its --data "
                         "file), counted by the current model")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    start = time.perf_counter()
    if args.refit:
        with open(args.refit) as fh:
            old = json.load(fh)
        rows, crowd, info = recount(old["rows"]), old["crowd"], old["fitted"]
    else:
        load = os.getloadavg()[0]
        rows, crowd = measure(QUICK if args.quick else CONFIGS, rounds, sys.stderr,
                              0 if args.quick else QUIET_WAIT)
        info = machine()
        quiet = [r.get("quiet", False) for r in rows if r["threads"] > 1]
        quiet += [c["quiet"] for c in crowd]
        info.update(quick=args.quick, load_before=load, load_after=os.getloadavg()[0],
                    quiet_speedups=f"{sum(quiet)} of {len(quiet)}")
    constants, errors = fit_constants(rows)
    info["fit_error"] = errors
    model = {"fitted": info,
             "constants": {p: {n: float(f"{v:.4g}") for n, v in c.items()}
                           for p, c in constants.items()},
             "threads": {k: round(v, 3) for k, v in fit_threads(rows, constants).items()},
             "workers": round(fit_workers(crowd), 3)}
    with open(args.output, "w") as fh:
        json.dump(model, fh, indent=1, sort_keys=True)
        fh.write("\n")
    with open(args.data, "w") as fh:
        json.dump({"fitted": info, "rows": rows, "crowd": crowd}, fh, indent=1)
        fh.write("\n")
    report(model, errors)
    if max(info.get("load_before", 0), info.get("load_after", 0)) > CORES / 2:
        print(f"# warning: the machine was busy (load average {info['load_before']:.1f} "
              f"before, {info['load_after']:.1f} after, {CORES} cores; speed-ups measured "
              f"with every core free: {info.get('quiet_speedups')}): timings are noisy; "
              "re-fit when it is quieter", file=sys.stderr)
    print(f"# {len(rows)} timings in {time.perf_counter() - start:.0f} s; wrote {args.output} "
          f"and {args.data}", file=sys.stderr)
    return model


if __name__ == "__main__":
    main()
