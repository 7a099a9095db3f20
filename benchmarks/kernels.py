"""This checkout's kernels against another commit's, side by side in one process.

    python benchmarks/kernels.py --against REF [--only W1,W2,W3,W4] [--repeats N]
    python benchmarks/bench.py --against REF ...   (the same table after bench's)

REF (any git ref, e.g. ``main``) has its ``conv3d_cli`` extracted by ``git
archive`` into a temporary folder and imported under another name, so both
engines run in one process on the same arrays and weights, in interleaved
rounds with PyTorch (when installed): the machine's load falls on every
contender alike and only the ratios matter. Each engine runs with one worker
and with all usable cores. The table gives medians; ``spread`` is the range
(max / min) of the per-round ratio of this checkout's time to REF's.
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
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_ref(ref, tmp):
    """``conv3d_cli`` of git ``ref`` as a module named ``conv3d_ref`` (the package
    imports itself only relatively, so a renamed copy is self-contained)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref, "conv3d_cli"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    os.rename(os.path.join(tmp, "conv3d_cli"), os.path.join(tmp, "conv3d_ref"))
    sys.path.insert(0, tmp)
    return importlib.import_module("conv3d_ref")


def twin(module, layer, x):
    """The same layer (config and weights) built by another copy of the package."""
    cls = getattr(module, type(layer).__name__)
    other = cls.from_config(layer.get_config())
    other.build(x.shape)
    other.set_weights(layer.get_weights())
    return other


def rounds(contenders, repeats):
    """Per-contender lists of seconds, interleaved as in ``bench.time_side_by_side``."""
    for fn in contenders.values():
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            time.sleep(0.25)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def compare(ref_module, only, repeats):
    rows = []
    cores = sorted({1, bench.CORES})
    for name, (desc, layer, x) in bench.workloads(np.random.default_rng(0)).items():
        if only and name not in only:
            continue
        old = twin(ref_module, layer, x)
        err_new = _max_diff(layer(x, workers=1), old(x, workers=1))
        contenders = {}
        for w in cores:
            contenders[("new", w)] = lambda w=w: layer(x, workers=w)
            contenders[("old", w)] = lambda w=w: old(x, workers=w)
        peer = bench.torch_fn(layer, x)
        if peer is not None:
            contenders["torch"] = peer
        times = rounds(contenders, repeats)
        rows.append((name, desc, layer.last_stats.method, times, err_new))
        print(f"  {name} done", file=sys.stderr)
    return rows


def _max_diff(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def report(rows, ref):
    med = statistics.median
    n = bench.CORES
    lines = [f"this checkout (new) against {ref} (old), {n} usable cores; medians in seconds", "",
             f"| workload | method | old 1w | new 1w | old {n}w | new {n}w | new/old {n}w (spread) "
             f"| scaling old | scaling new | torch | old/torch | new/torch | new vs old |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, desc, method, t, diff in rows:
        o1, n1, on, nn = (med(t[(k, w)]) for w in (1, n) for k in ("old", "new"))
        per_round = [a / b for a, b in zip(t[("new", n)], t[("old", n)])]
        spread = f"{min(per_round):.2f}-{max(per_round):.2f}"
        tt = med(t["torch"]) if "torch" in t else None
        vs = (lambda v: f"{v / tt:.2f}") if tt else (lambda v: "-")
        lines.append(f"| {name} {desc} | {method} | {o1:.3f} | {n1:.3f} | {on:.3f} | {nn:.3f} | "
                     f"{nn / on:.2f} ({spread}) | {o1 / on:.2f}x | {n1 / nn:.2f}x | "
                     f"{f'{tt:.3f}' if tt else '-'} | {vs(on)} | {vs(nn)} | {diff:.1e} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="git ref to compare with, e.g. main")
    ap.add_argument("--only", default="W1,W2,W3,W4")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    tmp = tempfile.mkdtemp(prefix="conv3d-kernels-")
    try:
        rows = compare(import_ref(args.against, tmp), only, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(rows, args.against))


if __name__ == "__main__":
    main()
