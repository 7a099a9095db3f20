"""The compute engine: plan tiles under a memory limit, compute them, write them.

``run(job, source, sink, ...)`` is the whole pipeline on canonical views
(:class:`conv3d_cli.layout.CanonicalView`); ``run_array`` does it for an
in-memory NumPy array in Keras layout.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..errors import ArgumentError
from ..layout import CanonicalView, Layout
from .choose import candidates, check_method, estimate_plans, pick
from .plan import Plan, default_workers, make_plan, parse_memory


def __getattr__(name):
    if name == "Stats":
        from .execute import Stats
        return Stats
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["run", "run_array", "plan_job", "Stats", "Plan", "parse_memory",
           "default_workers"]


def plan_job(job, method="auto", memory_limit=None, workers=None, chunk_shape=None,
             split_order=(0, 1, 2), processes=True, tiles=None) -> Plan:
    """The tiles of ``job`` and the method that computes them.

    ``method`` ``"auto"`` plans every candidate method and takes the plan the
    cost model estimates fastest (:func:`conv3d_cli.engine.choose.pick`: near
    ties go to the direct path); ``"measure"`` times each candidate plan's
    largest tile instead (:mod:`conv3d_cli.engine.measure`). A candidate whose
    tiles cannot fit the memory limit is left out. The plan's ``choice``
    records the estimates (and timings) behind the pick. ``tiles`` (``(b0, b1,
    box)`` triples, e.g. the tiling a resumed output was written in) forces the
    tiling (see :func:`~conv3d_cli.engine.plan.make_plan`).
    """
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ArgumentError(f"Invalid `workers`: {workers!r}. Expected an integer >= 1.")
    method = check_method(job, method)

    def plan_for(m):
        return make_plan(job, m, memory_limit=memory_limit, workers=workers,
                         chunk_shape=chunk_shape, split_order=split_order, processes=processes,
                         tiles=tiles)

    if method not in ("auto", "measure"):
        return plan_for(method)
    plans, refused = {}, None
    for m in candidates(job):
        try:
            plans[m] = plan_for(m)
        except ArgumentError as exc:  # this method's tiles do not fit the memory limit
            refused = refused or exc
    if not plans:
        raise refused
    choice = {}
    if method == "measure":
        from .measure import measure_plans
        choice["method_timings"], seconds = measure_plans(job, plans)
    else:
        seconds = estimate_plans(job, plans)
    choice["method_estimates"] = seconds
    return replace(plans[pick(seconds)], choice=choice)


def run(job, source, sink, plan, want_sums=False, progress=None, executor="processes",
        skip=(), on_done=None, scheduler=None):
    from .execute import execute  # the executors load the kernels: not for planning
    return execute(job, plan, source, sink, want_sums=want_sums, progress=progress,
                   executor=executor, skip=skip, on_done=on_done, scheduler=scheduler)


def run_array(job, x, method="auto", workers=1, memory_limit=None, chunk_shape=None,
              progress=False, want_sums=False):
    """Apply ``job`` to the Keras-layout array ``x``; returns (output, stats)."""
    if x.size == 0 or math.prod(job.out_canonical_shape) == 0:
        return _run_empty(job, want_sums)
    plan = plan_job(job, method, memory_limit, workers, chunk_shape, processes=False)
    layout = Layout(x.shape, job.data_format)
    source = CanonicalView(x, layout)
    out_layout = Layout(layout.output_shape(job.out_canonical_shape), job.data_format)
    y = np.empty(out_layout.shape, job.dtype)
    bar = None
    if progress:
        from ..progress import progress_bar
        bar = progress_bar(int(np.prod(job.out_canonical_shape[:4])), enabled=True)
    try:
        stats = run(job, source, CanonicalView(y, out_layout), plan, want_sums=want_sums,
                    progress=bar, executor="threads")
    finally:
        if bar is not None:
            bar.close()
    return y, stats


def _run_empty(job, want_sums=False):
    """The output of a job whose input or output has no elements.

    An output voxel is the bias plus a sum of kernel taps times input voxels.
    With no input voxels (a zero batch, a zero-length axis, no channels) the
    sum is empty, so every output voxel is the bias (zero without one) through
    the activation: a 'valid' Conv3DTranspose over a zero-length axis still has
    ``max(ke, s) - s`` output voxels there (without output_padding), as in Keras.
    """
    pre = np.zeros((job.batch,) + job.out_spatial + (job.filters,), job.dtype)
    if job.bias is not None:
        pre[...] = job.bias
    y = job.activation(pre, axis=job.act_axis)
    y = y.reshape(tuple(job.batch_shape) + y.shape[1:])
    if job.data_format == "channels_first":
        y = np.moveaxis(y, -1, -4)
    sums = None
    if want_sums:
        y64 = y.astype(np.float64)
        sums = (float(np.abs(y64).sum()), float(np.square(y64).sum()))
    from .execute import Stats
    return np.ascontiguousarray(y), Stats(method="none", tiles=0, activity_sums=sums)
