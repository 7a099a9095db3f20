"""Does ``--method auto`` pick a fast path? A grid of layers, every suitable method timed.

    python benchmarks/choice.py [--repeats N] [--workers N] [--only name,...] [--json FILE]

Each case (Conv3D and Conv3DTranspose, kernel 1-15, channels 1-64, stride 1-2)
is run through ``layer(x, method=m, workers=W)`` for every method that suits it
(direct, fft, winograd where it applies), in interleaved rounds after a warm-up
(the median of ``--repeats`` rounds). A method whose warm-up takes more than
four times the best warm-up of the case cannot be within 10% of the fastest:
it is timed once and left out of the rounds. ``auto``'s pick (the cost model,
:mod:`conv3d_cli.engine.choose`) is a hit when its time is within 10% of the
fastest method's; the table also shows what ``--method measure`` picks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.engine import plan_job
from conv3d_cli.engine.winograd import winograd_suits

CORES = len(os.sched_getaffinity(0))
TOLERANCE = 0.10  # a pick within 10% of the fastest method is a hit
SLOW = 4.0        # a warm-up this many times the best one is not timed again


@dataclass(frozen=True)
class Case:
    name: str
    layer: str        # "Conv3D" or "Conv3DTranspose"
    kernel: int
    stride: int
    channels: int
    filters: int
    size: int         # input D = H = W
    padding: str = "valid"

    def build(self, rng):
        cls = Conv3D if self.layer == "Conv3D" else Conv3DTranspose
        layer = cls(self.filters, self.kernel, strides=self.stride, padding=self.padding)
        x = rng.standard_normal((1, self.size, self.size, self.size, self.channels),
                                dtype=np.float32)
        layer.build(x.shape)
        return layer, x


def _c(name, k, s, c, f, n, padding="valid"):
    return Case(name, "Conv3D", k, s, c, f, n, padding)


def _t(name, k, s, c, f, n, padding="valid"):
    return Case(name, "Conv3DTranspose", k, s, c, f, n, padding)


# Volumes sized so that the fastest method takes roughly 0.02-0.3 s here.
CASES = [
    _c("C01", 1, 1, 1, 1, 256),
    _c("C02", 3, 1, 1, 1, 160),
    _c("C03", 5, 1, 1, 1, 128),
    _c("C04", 7, 1, 1, 1, 256),   # the case: 7^3 on 256^3, one channel
    _c("C05", 9, 1, 1, 1, 128),
    _c("C06", 11, 1, 1, 1, 96),
    _c("C07", 15, 1, 1, 1, 96),
    _c("C08", 7, 2, 1, 1, 128, "same"),
    _c("C09", 15, 2, 1, 1, 128, "same"),
    _c("C10", 3, 1, 4, 4, 96, "same"),
    _c("C11", 5, 1, 4, 8, 64),
    _c("C12", 7, 1, 2, 2, 96),
    _c("C13", 11, 1, 4, 4, 64),
    _c("C14", 3, 1, 8, 8, 64, "same"),
    _c("C15", 3, 1, 16, 16, 64),
    _c("C16", 3, 1, 32, 64, 48),
    _c("C17", 3, 1, 64, 64, 32, "same"),
    _c("C18", 5, 1, 16, 16, 48),
    _c("C19", 7, 1, 8, 8, 48),
    _c("C20", 9, 1, 16, 16, 40),
    _c("C21", 1, 1, 32, 32, 64),
    _c("C22", 1, 2, 32, 8, 64),
    _c("C23", 3, 2, 16, 32, 64, "same"),
    _c("C24", 5, 2, 32, 32, 48, "same"),
    _c("C25", 3, 1, 1, 16, 96, "same"),
    _c("C26", 3, 1, 16, 1, 96, "same"),
    _t("T01", 3, 2, 1, 1, 96),
    _t("T02", 3, 1, 16, 16, 48, "same"),
    _t("T03", 3, 2, 64, 32, 32),
    _t("T04", 5, 2, 8, 8, 40, "same"),
    _t("T05", 7, 1, 1, 1, 96),
    _t("T06", 15, 1, 1, 1, 64),
    _t("T07", 4, 2, 16, 16, 32, "same"),
    _t("T08", 1, 2, 8, 8, 48),
    _t("T09", 9, 2, 2, 2, 48),
    _t("T10", 2, 2, 32, 32, 32),
    _t("T11", 3, 1, 32, 64, 32),
    _t("T12", 11, 2, 1, 1, 48, "same"),
]


def suitable(job):
    return ["direct", "fft"] + (["winograd"] if winograd_suits(job) else [])


def pick(job, method, workers):
    try:
        return plan_job(job, method, workers=workers, processes=False).method
    except ValueError:  # a model without --method measure
        return None


def time_case(case, repeats, workers, rng):
    """Median seconds of every suitable method, and auto's and measure's picks."""
    layer, x = case.build(rng)
    job = layer.job(x.shape)
    runs = {m: (lambda m=m: layer(x, method=m, workers=workers)) for m in suitable(job)}
    first = {}
    for m, fn in runs.items():
        start = time.perf_counter()
        fn()
        first[m] = time.perf_counter() - start
    best = min(first.values())
    timed = {m: [] for m in runs if first[m] <= SLOW * best}
    for _ in range(repeats):
        for m in timed:
            time.sleep(0.05)  # let spinning BLAS/OpenMP threads park
            start = time.perf_counter()
            runs[m]()
            timed[m].append(time.perf_counter() - start)
    seconds = {m: statistics.median(timed[m]) if m in timed else first[m] for m in runs}
    return {"case": asdict(case), "seconds": seconds, "auto": pick(job, "auto", workers),
            "measure": pick(job, "measure", workers)}


def verdict(row, choice):
    """(hit, ratio of the choice's time to the fastest's) for ``row``'s ``choice``."""
    seconds = row["seconds"]
    if choice not in seconds:
        return None, None
    ratio = seconds[choice] / min(seconds.values())
    return ratio <= 1 + TOLERANCE, ratio


def run_grid(repeats=3, workers=CORES, only=None, log=sys.stderr):
    rng = np.random.default_rng(0)
    # Compile and load every kernel once, so no case pays for it.
    for case in (_c("w", 3, 1, 8, 8, 12), _c("w", 3, 1, 1, 1, 12), _t("w", 3, 2, 8, 8, 8),
                 _t("w", 3, 2, 1, 1, 8)):
        time_case(case, 1, workers, rng)
    rows = []
    for case in CASES:
        if only and case.name not in only:
            continue
        rows.append(time_case(case, repeats, workers, rng))
        if log is not None:
            print(f"  {case.name} done", file=log)
    return rows


def describe(case):
    c = case if isinstance(case, Case) else Case(**case)
    return f"{c.layer} {c.size}^3x{c.channels} -> {c.filters}, k{c.kernel} s{c.stride} {c.padding}"


def report(rows, workers=CORES, choices=("auto", "measure")):
    """The grid as a Markdown table, its hit rates, and the misses."""
    choices = [c for c in choices if any(r.get(c) for r in rows)]
    lines = ["| case | layer | direct (s) | fft (s) | winograd (s) | fastest | "
             + " | ".join(f"{c} | {c}/fastest" for c in choices) + " |",
             "|---|---|---|---|---|---|" + "---|---|" * len(choices)]
    hits = {c: 0 for c in choices}
    misses = {c: [] for c in choices}
    for r in rows:
        s = r["seconds"]
        fastest = min(s, key=s.get)
        cells = [f"{s[m]:.3f}" if m in s else "-" for m in ("direct", "fft", "winograd")]
        line = f"| {r['case']['name']} | {describe(r['case'])} | " + " | ".join(cells)
        line += f" | {fastest} |"
        for c in choices:
            hit, ratio = verdict(r, r.get(c))
            hits[c] += bool(hit)
            if not hit:
                misses[c].append(f"{r['case']['name']} ({r.get(c)}: {ratio:.2f}x)"
                                 if ratio else f"{r['case']['name']}")
            line += f" {r.get(c) or '-'}{'' if hit else ' (miss)'} | " \
                    f"{'%.2f' % ratio if ratio else '-'} |"
        lines.append(line)
    lines.append("")
    for c in choices:
        lines.append(f"{c}: within {TOLERANCE:.0%} of the fastest in {hits[c]}/{len(rows)} cases "
                     f"({100 * hits[c] / max(len(rows), 1):.0f}%), {workers} workers"
                     + (f"; misses: {', '.join(misses[c])}" if misses[c] else ""))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=CORES)
    ap.add_argument("--only", default="", help="comma-separated case names, e.g. C04,T03")
    ap.add_argument("--json", default=None, help="also write the timings to this file")
    args = ap.parse_args()
    only = {c.strip().upper() for c in args.only.split(",") if c.strip()}
    rows = run_grid(args.repeats, args.workers, only)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"workers": args.workers, "rows": rows}, fh, indent=1)
    print(report(rows, args.workers))


if __name__ == "__main__":
    main()
