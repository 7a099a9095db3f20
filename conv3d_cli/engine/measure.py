"""``--method measure``: time the candidate methods on one tile, run the fastest.

Like SciPy's ``choose_conv_method(..., measure=True)``, but on one tile
rather than the whole job: every method that suits the job gets its own plan
(:func:`conv3d_cli.engine.plan_job`), and the largest tile of each plan is
computed once, with the plan's BLAS/FFT threads and an empty kernel cache (as
a worker's first tile), after a warm-up on a corner of it (half its edges,
an eighth of its work: it loads the compiled kernels). The input is zeros
over the tile's input region, so nothing is read from the file and the
timing is the computation's alone (the speed of these kernels does not depend
on the values). The tile's seconds are scaled to the whole plan by the cost
model's ratio of the plan to that tile (tile count, edge tiles, workers side
by side: :func:`conv3d_cli.engine.choose.plan_seconds`), and the plan with
the fewest seconds runs.

Measuring costs about 1.1 tiles per candidate: for a volume an FFT plan
computes as one tile, about one whole FFT convolution (SciPy's
``measure=True`` runs every method on the whole input). It runs where the
plan is made (for ``--scheduler``, on this machine, not on the cluster). The
plan summary records ``method_timings`` (seconds of each candidate's largest
tile) and ``method_estimates`` (the whole run, scaled).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from threadpoolctl import threadpool_limits

from . import choose
from .fft import SpectrumCache
from .task import ZerosSource, compute_tile


def largest_tile(plan):
    return max(plan.tiles, key=lambda t: (t.b1 - t.b0) * math.prod(t.shape))


def time_tile(job, plan, tile, clock=time.perf_counter) -> float:
    """Seconds of computing ``tile`` by ``plan.method`` on ``plan.threads`` threads."""
    source = ZerosSource(job)
    # The warm-up: a corner of half the tile's edges (an eighth of its work),
    # which loads the kernels and lets the allocator grow to tile-sized blocks.
    corner = replace(tile, b1=tile.b0 + 1,
                     out=tuple((a, a + -(-(b - a) // 2)) for a, b in tile.out))
    with threadpool_limits(limits=plan.threads):
        compute_tile(job, corner, source, plan.method, SpectrumCache(), fft_workers=plan.threads)
        start = clock()
        compute_tile(job, tile, source, plan.method, SpectrumCache(), fft_workers=plan.threads)
        return clock() - start


def measure_plans(job, plans, clock=time.perf_counter):
    """``({method: seconds of its largest tile}, {method: seconds of its plan})``
    for the candidate ``plans`` (``{method: plan}``)."""
    timings, estimates = {}, {}
    for method, plan in plans.items():
        if not plan.tiles:
            timings[method] = estimates[method] = 0.0
            continue
        tile = largest_tile(plan)
        seconds = time_tile(job, plan, tile, clock)
        modelled = choose.tile_seconds(job, method, tile, plan.threads, cold=True)
        scale = choose.plan_seconds(job, plan) / modelled if modelled > 0 else 1.0
        timings[method] = seconds
        estimates[method] = seconds * scale
    return timings, estimates
