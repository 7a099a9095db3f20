"""File to file against in memory (issue 13, W6-W8), side by side in one run.

    python benchmarks/files.py [--only W6,W7,W8] [--repeats N] [--markdown]

W6  Zarr -> Zarr, 256^3 float32 in 64^3 chunks (zarr's default compression), Conv3D k3 1 -> 1,
    with 1 and 2 workers: throughput at least 30% of ``layer(x, workers=w)`` in memory.
W7  .nii.gz -> .nii.gz, 256^3 float32 -> 8 filters, k3: at most 2x the same run on .nii files
    (wall time of the CLI, both with all cores; the input .nii.gz is nibabel's).
W8  .npy / .nii / HDF5 -> the same format, W1's layer (256^3, k3, 1 -> 1, one worker): the run's
    own time in ``--report`` (start-up excluded) at most 1.5x ``layer(x, workers=1)``.

Every contender runs once untimed (page cache, numba cache), then in interleaved rounds
(``bench.time_side_by_side``); times are medians. A CLI run's "report" time is its
``--report`` ``seconds`` (from opening INPUT to the output being complete, before it is put
in place: imports of the format's library and the load of the cached numba kernels included,
the interpreter's start-up not); "warm" is ``apply_to_file`` in this process after a warm-up
run (no imports, kernels loaded): what a long-lived process or a batch pays per volume.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from conv3d_cli import Conv3D
from conv3d_cli.api import apply_to_file

N = 256
GOALS = {"W6": ("throughput vs in memory", ">=", 0.30),
         "W7": (".nii.gz / .nii wall", "<=", 2.0),
         "W8": ("report time / in memory", "<=", 1.5)}


def _conv3d():
    return os.path.join(os.path.dirname(sys.executable), "conv3d")


def cli_run(src, dst, *args):
    """(wall seconds, the run's --report seconds) of ``conv3d run src dst args``."""
    report = dst.split(".h5:")[0] + ".report.json"
    cmd = [_conv3d(), "run", src, dst, "--seed", "0", "--overwrite", "--no-progress", "-q",
           "--report", report, *map(str, args)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    with open(report) as fh:
        return wall, json.load(fh)["seconds"]


def _layer(filters=1):
    layer = Conv3D(filters, 3)
    layer.build((1, N, N, N, 1))
    rng = np.random.default_rng(1)
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.1
                       for w in layer.get_weights()])
    return layer


def _volume():
    return np.random.default_rng(0).standard_normal((N, N, N)).astype(np.float32)


def rounds(contenders, repeats):
    """Median of each contender's values over interleaved rounds, after one warm-up.

    A contender returns a number (seconds) or a dict of them; the median is per key."""
    for fn in contenders.values():
        fn()
    seen = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            time.sleep(0.25)
            seen[name].append(fn())
    return {name: _median(values) for name, values in seen.items()}


def _median(values):
    if isinstance(values[0], dict):
        return {k: float(np.median([v[k] for v in values])) for k in values[0]}
    return float(np.median(values))


def _timed(fn):
    def run():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def _cli(src, dst, *args):
    def run():
        wall, report = cli_run(src, dst, *args)
        return {"wall": wall, "report": report}
    return run


def bench_w6(tmp, repeats):
    """Zarr -> Zarr against layer(x) in memory, 1 and 2 workers."""
    import zarr
    x = _volume()
    src, dst = os.path.join(tmp, "w6.zarr"), os.path.join(tmp, "w6_out.zarr")
    zarr.create_array(store=src, shape=x.shape, chunks=(64, 64, 64), dtype="float32")[:] = x
    layer, xk = _layer(), x[None, ..., None]
    contenders = {}
    for w in (1, 2):
        contenders[("memory", w)] = _timed(lambda w=w: layer(xk, workers=w))
        contenders[("warm", w)] = _timed(lambda w=w: apply_to_file(
            layer, src, dst, overwrite=True, workers=w, progress=False))
        contenders[("cli", w)] = _cli(src, dst, "--filters", 1, "--kernel-size", 3,
                                      "--workers", w)
    t = rounds(contenders, repeats)
    rows = []
    for w in (1, 2):
        mem, warm, cli = t[("memory", w)], t[("warm", w)], t[("cli", w)]
        rows.append({"name": "W6", "case": f"Zarr -> Zarr, {w} worker{'s' * (w > 1)}",
                     "memory": mem, "report": cli["report"], "wall": cli["wall"], "warm": warm,
                     "ratio": mem / cli["report"], "warm_ratio": mem / warm,
                     "mvox": N ** 3 / cli["report"] / 1e6})
    return rows


def bench_w7(tmp, repeats):
    """.nii.gz -> .nii.gz against .nii -> .nii, 8 filters, all cores (CLI wall time)."""
    import nibabel as nib
    x = _volume()
    for ext in ("nii", "nii.gz"):
        nib.save(nib.Nifti1Image(x, np.eye(4)), os.path.join(tmp, f"w7.{ext}"))
    contenders = {ext: _cli(os.path.join(tmp, f"w7.{ext}"), os.path.join(tmp, f"w7_out.{ext}"),
                            "--filters", 8, "--kernel-size", 3) for ext in ("nii", "nii.gz")}
    t = rounds(contenders, repeats)
    plain, gz = t["nii"], t["nii.gz"]
    size = os.path.getsize(os.path.join(tmp, "w7_out.nii.gz"))
    return [{"name": "W7", "case": f".nii.gz -> .nii.gz, 8 filters (output {size >> 20} MiB)",
             "nii": plain, "gz": gz, "ratio": gz["wall"] / plain["wall"]}]


def bench_w8(tmp, repeats):
    """.npy, .nii and HDF5 runs (report time) against layer(x, workers=1)."""
    import h5py
    import nibabel as nib
    x = _volume()
    np.save(os.path.join(tmp, "w8.npy"), x)
    nib.save(nib.Nifti1Image(x, np.eye(4)), os.path.join(tmp, "w8.nii"))
    with h5py.File(os.path.join(tmp, "w8.h5"), "w") as fh:
        fh["x"] = x
    layer, xk = _layer(), x[None, ..., None]
    files = {"npy": ("w8.npy", "w8_out.npy"), "nii": ("w8.nii", "w8_out.nii"),
             "h5": ("w8.h5:/x", "w8_out.h5:/y")}
    contenders = {"memory": _timed(lambda: layer(xk, workers=1))}
    for fmt, (src, dst) in files.items():
        contenders[fmt] = _cli(os.path.join(tmp, src), os.path.join(tmp, dst), "--filters", 1,
                               "--kernel-size", 3, "--workers", 1)
        contenders[("warm", fmt)] = _timed(lambda s=src, d=dst: apply_to_file(
            layer, os.path.join(tmp, s), os.path.join(tmp, d), overwrite=True, workers=1,
            progress=False))
    t = rounds(contenders, repeats)
    mem = t["memory"]
    return [{"name": "W8", "case": f"{fmt} -> {fmt}, 1 worker", "memory": mem,
             "report": t[fmt]["report"], "wall": t[fmt]["wall"], "warm": t[("warm", fmt)],
             "ratio": t[fmt]["report"] / mem, "warm_ratio": t[("warm", fmt)] / mem}
            for fmt in files]


def _verdict(name, ratio):
    _, op, goal = GOALS[name]
    ok = ratio >= goal if op == ">=" else ratio <= goal
    return f"{op} {goal}: {'met' if ok else 'NOT met'}"


def report(rows):
    """The rows as markdown tables, one per workload."""
    lines = []
    w6 = [r for r in rows if r["name"] == "W6"]
    if w6:
        lines += ["| W6 (256^3, k3, 1 -> 1) | in memory (s) | report (s) | wall (s) | warm (s) | "
                  "Mvoxel/s | throughput vs memory | warm vs memory | goal |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['memory']:.3f} | {r['report']:.3f} | {r['wall']:.2f} | "
                  f"{r['warm']:.3f} | {r['mvox']:.0f} | {r['ratio']:.2f} | "
                  f"{r['warm_ratio']:.2f} | {_verdict('W6', r['ratio'])} |" for r in w6]
        lines.append("")
    for r in (r for r in rows if r["name"] == "W7"):
        lines += ["| W7 (256^3 -> 8 filters, k3, all cores) | .nii wall (s) | .nii.gz wall (s) | "
                  ".nii report (s) | .nii.gz report (s) | ratio (wall) | goal |",
                  "|---|---|---|---|---|---|---|",
                  f"| {r['case']} | {r['nii']['wall']:.2f} | {r['gz']['wall']:.2f} | "
                  f"{r['nii']['report']:.2f} | {r['gz']['report']:.2f} | {r['ratio']:.2f} | "
                  f"{_verdict('W7', r['ratio'])} |", ""]
    w8 = [r for r in rows if r["name"] == "W8"]
    if w8:
        lines += ["| W8 (W1's layer, 1 worker) | in memory (s) | report (s) | wall (s) | "
                  "warm (s) | report / memory | warm / memory | goal |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['memory']:.3f} | {r['report']:.3f} | {r['wall']:.2f} | "
                  f"{r['warm']:.3f} | {r['ratio']:.2f} | {r['warm_ratio']:.2f} | "
                  f"{_verdict('W8', r['ratio'])} |" for r in w8]
    return "\n".join(lines).rstrip()


BENCHES = {"W6": bench_w6, "W7": bench_w7, "W8": bench_w8}


def run(only, repeats, folder=None):
    """The rows of the workloads in ``only`` (all if empty), measured in a scratch folder."""
    tmp = tempfile.mkdtemp(prefix="conv3d-bench-files-",
                           dir=folder or os.environ.get("BENCH_TMP", "."))
    rows = []
    try:
        for name, bench in BENCHES.items():
            if not only or name in only:
                rows += bench(tmp, repeats)
                print(f"  {name} done", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated: W6,W7,W8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    only = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    print(report(run(only, args.repeats)))


if __name__ == "__main__":
    main()
