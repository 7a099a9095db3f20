"""Run a plan's tiles: in this process, or in a pool of worker processes.

A tile task reads its own input region (zeros outside the volume), computes
the convolution by the plan's method, adds the bias, applies the activation
and writes its block straight into the output. Sinks that cannot take writes
from several processes (HDF5) say so with ``parallel_writes = False``; their
blocks come back to this process to be written. Workers are forked, so the
job, the source and the sink are inherited rather than pickled; each worker
opens its own file handles (the sources reopen lazily after a fork).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from concurrent.futures import (FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor,
                                as_completed, wait)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace

import numpy as np
from threadpoolctl import threadpool_limits

from .. import signals
from ..errors import EngineError
from ..shapes import CONV
from .choose import exact_fixup_pays
from .direct import correlate_gemm, scatter_transpose
from .fft import SpectrumCache, correlate_fft
from .nonfinite import (affected_boxes, all_finite, nonfinite_voxels, spread_nan,
                        zero_products, zeroed)
from .stencil import correlate_stencil, stencil_suits
from .winograd import correlate_winograd


@dataclass
class Stats:
    method: str = ""
    tiles: int = 0
    seconds: float = 0.0
    activity_sums: tuple | None = None
    workers: int = 1
    extra: dict = field(default_factory=dict)


def _as_input(block, job):
    """Input values as Keras sees them, in the dtype the sums run in: cast to the
    compute dtype first (a float32 volume under float16 is rounded to float16)."""
    block = np.asarray(block)
    if job.rounds_result:
        block = block.astype(job.dtype)
    return block.astype(job.work_dtype, copy=False)


def read_padded(source, job, b0, b1, ranges):
    """Canonical input block over ``ranges`` (may extend past the volume; zeros there)."""
    shape = job.in_spatial
    clipped = [(max(a, 0), min(z, n)) for (a, z), n in zip(ranges, shape)]
    full = tuple(z - a for a, z in ranges)
    if any(z <= a for a, z in clipped):
        return np.zeros((b1 - b0,) + full + (job.in_channels,), job.work_dtype)
    inner = source.read(b0, b1, clipped)
    if tuple(clipped) == tuple(ranges):
        return _as_input(inner, job)
    x = np.zeros((b1 - b0,) + full + (job.in_channels,), job.work_dtype)
    x[(slice(None),) + tuple(slice(ca - a, cz - a) for (a, _), (ca, cz) in zip(ranges, clipped))] = \
        _as_input(inner, job)
    return x


def round_to_compute(job, sums):
    """Keras's roundings under a float16 / bfloat16 compute dtype.

    The convolution's float32 sums are rounded once to the compute dtype, the
    bias (in the compute dtype) is added in that dtype (one more rounding), and
    the activation then runs on compute-dtype arrays: NumPy, like XLA on CPU,
    rounds after each operation of the activation's formula. This is the
    sequence of ``BaseConv.call`` (conv, add, activation) with its operands
    autocast, as far as Keras 3 on CPU lets it be observed.
    """
    y = sums.astype(job.dtype)
    if job.bias is not None:
        np.add(y, job.bias, out=y)
    return y


def compute_tile(job, tile, source, method, cache, fft_workers=1, want_sums=False, out=None):
    """Output block of ``tile`` after bias and activation, and its activity sums.

    ``out``, when given, is where the block goes (a view into an in-memory
    output): a tile summed in the output's dtype is accumulated there directly,
    with no extra copy.
    """
    axes = [g.terms(o0, o1) for g, (o0, o1) in zip(job.geoms, tile.out)]
    nb = tile.b1 - tile.b0
    work = job.work_dtype
    in_place = out is not None and out.dtype == work
    acc = out if in_place else np.empty((nb,) + tile.shape + (job.filters,), work)
    # A rounded result gets its bias after the rounding (round_to_compute).
    summed_bias = job.bias if not job.rounds_result else None
    bias = np.zeros(job.filters, work) if summed_bias is None else summed_bias.astype(work)
    x = None
    if all(t for _, _, t in axes):
        x = read_padded(source, job, tile.b0, tile.b1, [(i0, i1) for i0, i1, _ in axes])
    # Keras's arithmetic on NaN and Inf is silent: inf * 0 is NaN without a warning.
    with np.errstate(invalid="ignore", over="ignore"):
        _convolve(job, tile, axes, x, method, acc, bias, cache, fft_workers)
        if job.rounds_result:
            acc = round_to_compute(job, acc)
    y = acc if job.activation.is_linear else job.activation(acc, axis=job.act_axis)
    if out is not None and y is not out:
        out[...] = y
    sums = None
    if want_sums:
        y64 = y.astype(np.float64)
        sums = (float(np.abs(y64).sum()), float(np.square(y64).sum()))
    return y, sums


def _convolve(job, tile, axes, x, method, acc, bias, cache, fft_workers):
    """Set ``acc`` to bias + the tile's convolution of ``x`` by ``method``, as
    Keras computes it also where inputs or weights are NaN or Inf (see
    :mod:`conv3d_cli.engine.nonfinite`)."""
    finite_weights = all_finite(job.taps)
    if x is None:  # no input voxel reaches this tile (transposed phases without taps)
        acc[...] = bias
    elif method in ("fft", "winograd") and finite_weights:
        _by_transform_exact(job, tile, axes, x, method, acc, bias, cache, fft_workers)
    else:
        _direct(job, tile, axes, x, acc, bias)
    if not finite_weights and job.kind != CONV:
        zero_products(job, tile, acc)


def _covers(terms, shape):
    """One term per axis covering the tile writes every output once: the stencil
    and FFT paths then set bias + sum themselves, saving two passes over the
    block. Everything else accumulates onto the bias."""
    return all(len(t) == 1 and t[0].out_step == 1 and t[0].count == n
               for t, n in zip(terms, shape))


def _direct(job, tile, axes, x, acc, bias):
    """bias + the direct convolution: stencil, scatter-transposed or im2col GEMM."""
    terms = [t for _, _, t in axes]
    stencil = stencil_suits(job)
    fused = stencil and _covers(terms, tile.shape)
    if not fused:
        acc[...] = bias
    if stencil:
        correlate_stencil(x, terms, job.taps, acc, bias=bias if fused else None)
    elif job.kind != CONV and any(g.s > 1 for g in job.geoms):
        scatter_transpose(x, [i0 for i0, _, _ in axes], job.geoms, tile,
                          job.kernel.astype(job.work_dtype), acc)
    else:
        correlate_gemm(x, terms, job.taps, acc)


def _by_transform(job, tile, axes, x, method, acc, bias, cache, fft_workers):
    """bias + the convolution by FFT or Winograd (finite input and weights)."""
    terms = [t for _, _, t in axes]
    if method == "fft":
        fused = _covers(terms, tile.shape)
        if not fused:
            acc[...] = bias
        correlate_fft(x, terms, job.taps, acc, cache, workers=fft_workers,
                      bias=bias if fused else None)
    else:
        correlate_winograd(x, terms, job.taps, acc, cache, bias=bias)


def _by_transform_exact(job, tile, axes, x, method, acc, bias, cache, fft_workers):
    """FFT or Winograd, exact where the input holds NaN or Inf: computed with those
    values set to 0, then NaN spread over the outputs a NaN reaches and the
    output blocks an Inf reaches recomputed by the direct path (or the whole
    tile by the direct path, when that is cheaper)."""
    found = nonfinite_voxels(x)
    if found is None:
        _by_transform(job, tile, axes, x, method, acc, bias, cache, fft_workers)
        return
    bad, inf = found
    origin = [i0 for i0, _, _ in axes]
    boxes = affected_boxes(job, tile, origin, inf) if inf.any() else []
    fraction = sum(np.prod([b - a for a, b in box]) for box in boxes) / np.prod(tile.shape)
    if not exact_fixup_pays(job, method, fraction):
        _direct(job, tile, axes, x, acc, bias)
        return
    _by_transform(job, tile, axes, zeroed(x, bad), method, acc, bias, cache, fft_workers)
    for box in boxes:
        _direct_box(job, tile, origin, x, box, acc, bias)
    spread_nan(job, axes, x, acc)


def _direct_box(job, tile, origin, x, box, acc, bias):
    """Recompute the outputs ``box`` (tile-local ``(start, stop)`` per axis) of the
    tile by the direct path, from the tile's input ``x`` (voxel 0 = input ``origin``)."""
    sub = replace(tile, out=tuple((o0 + a, o0 + b) for (o0, _), (a, b) in zip(tile.out, box)))
    axes = [g.terms(o0, o1) for g, (o0, o1) in zip(job.geoms, sub.out)]
    block = np.empty((tile.b1 - tile.b0,) + sub.shape + (job.filters,), acc.dtype)
    if all(t for _, _, t in axes):
        region = tuple(slice(i0 - o, i1 - o) for (i0, i1, _), o in zip(axes, origin))
        assert all(0 <= r.start and r.stop <= n for r, n in zip(region, x.shape[1:4]))
        _direct(job, sub, axes, x[(slice(None),) + region], block, bias)
    else:
        block[...] = bias
    acc[(slice(None),) + tuple(slice(a, b) for a, b in box)] = block


def out_ranges(job, tile):
    """Where a tile's post-activation block goes in the canonical output."""
    ranges = list(tile.out)
    if job.activation.halves_last_axis and job.act_axis == 3:
        ranges[2] = (ranges[2][0] // 2, ranges[2][1] // 2)
    return ranges


# Tasks submitted to the process pool per worker at a time (one running, one
# queued so a worker never waits for the parent).
IN_FLIGHT = 2

# State of a forked worker (inherited from the parent at fork time).
_CTX: dict = {}


def _init_worker(threads, parent_pid):
    signals.worker_defaults(parent_pid)
    _CTX["limits"] = threadpool_limits(limits=threads)
    _CTX["cache"] = SpectrumCache()
    _CTX["threads"] = threads


def _direct_view(job, sink, tile):
    """A writable view of the sink for ``tile`` when it can be computed in place."""
    view = getattr(sink, "region_view", None)
    if view is None or job.activation.halves_last_axis:
        return None
    return view(tile.b0, tile.b1, tile.out)


def run_tile(job, plan, index, source, sink, cache, threads=1, want_sums=False):
    """Compute tile ``index`` and write it into ``sink`` (in place where the sink
    allows); returns its activity sums. The one task every executor runs."""
    tile = plan.tiles[index]
    view = _direct_view(job, sink, tile)
    y, sums = compute_tile(job, tile, source, plan.method, cache, fft_workers=threads,
                           want_sums=want_sums, out=view)
    if view is None:
        sink.write(tile.b0, tile.b1, out_ranges(job, tile), y)
    return sums


def _run_in_worker(index):
    job, plan, source, sink, want_sums = (_CTX[k] for k in ("job", "plan", "source", "sink", "want_sums"))
    if not getattr(sink, "parallel_writes", True):  # the parent writes this block
        y, sums = compute_tile(job, plan.tiles[index], source, plan.method, _CTX["cache"],
                               fft_workers=_CTX["threads"], want_sums=want_sums)
        return index, y, sums
    return index, None, run_tile(job, plan, index, source, sink, _CTX["cache"],
                                 _CTX["threads"], want_sums)


def execute(job, plan, source, sink, want_sums=False, progress=None, executor="processes",
            skip=(), on_done=None, scheduler=None) -> Stats:
    """Compute the tiles of ``plan`` (but those in ``skip``) into ``sink``.

    ``executor`` is ``"processes"`` (forked workers that read and write files
    themselves) or ``"threads"`` (for in-memory arrays: the kernels release the
    GIL, and no process start-up or copies are needed); ``scheduler`` (a Dask
    address or ``"local"``) sends the tiles to a Dask cluster instead. Each
    task gets ``plan.threads`` BLAS/FFT threads, so the total never exceeds
    the workers asked for. ``on_done(index)`` is called once a tile is
    written; ``progress`` is a tqdm-like bar or None.
    """
    start = time.perf_counter()
    total = [0.0, 0.0]
    skip = set(skip)
    indices = [i for i in range(len(plan.tiles)) if i not in skip]
    workers = min(plan.workers, max(len(indices), 1))
    threads = plan.threads
    finished = [0]

    def done(index, sums):
        if sums is not None:
            total[0] += sums[0]
            total[1] += sums[1]
        if on_done is not None:
            on_done(index)
        finished[0] += 1
        if progress is not None:
            progress.set_postfix_str(f"tiles {finished[0]}/{len(indices)}", refresh=False)
            progress.update(_voxels(plan.tiles[index]))

    def one(index, cache):
        return run_tile(job, plan, index, source, sink, cache, threads, want_sums)

    if scheduler is not None:
        from .distributed import run_on_dask
        workers = run_on_dask(scheduler, job, plan, source, sink, indices, want_sums, done,
                              plan.workers)
    elif workers <= 1:
        with threadpool_limits(limits=threads):
            cache = SpectrumCache()
            for index in indices:
                done(index, one(index, cache))
    elif executor == "threads":
        cache = SpectrumCache()
        with threadpool_limits(limits=threads), ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(one, index, cache): index for index in indices}
            try:
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    else:
        _CTX.update(job=job, plan=plan, source=source, sink=sink, want_sums=want_sums)
        ctx = multiprocessing.get_context("fork")
        try:
            pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                       initargs=(threads, os.getpid()))
            # At most IN_FLIGHT tasks per worker are submitted at a time, and a
            # finished one is dropped once written: blocks a single-writer sink
            # gets back wait in this process, and must not pile up there.
            todo = iter(indices)
            pending = set()
            try:
                while True:
                    with signals.blocked():  # a submit may fork a worker
                        for index in itertools.islice(todo, IN_FLIGHT * workers - len(pending)):
                            pending.add(pool.submit(_run_in_worker, index))
                    if not pending:
                        break
                    ready, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in ready:
                        index, y, sums = fut.result()
                        tile = plan.tiles[index]
                        if y is not None:
                            sink.write(tile.b0, tile.b1, out_ranges(job, tile), y)
                        del y
                        done(index, sums)
                    del ready, fut
            except BaseException:
                with signals.shielded():
                    stop_pool(pool)
                raise
            pool.shutdown(wait=True)
        except BrokenProcessPool:
            raise EngineError(
                "a worker process died (killed, or out of memory). "
                "Try fewer --workers or a lower --memory-limit.") from None
        finally:
            _CTX.clear()
    return Stats(method=plan.method, tiles=len(plan.tiles),
                 seconds=time.perf_counter() - start,
                 activity_sums=tuple(total) if want_sums else None, workers=workers)


def stop_pool(pool, grace=2.0):
    """Stop ``pool`` now: drop the queued tiles, terminate the workers, reap them.

    ``shutdown(wait=True)`` would wait for the running tiles (minutes for
    large ones) and so would the interpreter at exit; an interrupted or failed
    run must not. Workers get SIGTERM, then SIGKILL after ``grace`` seconds.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    _wait_exited(processes, grace)
    for p in processes:
        if p.exitcode is None:
            p.kill()
    _wait_exited(processes, grace)
    for p in processes:  # reap (the pool's manager thread may have done it)
        p.join(0)


def _wait_exited(processes, timeout):
    from multiprocessing.connection import wait
    deadline = time.monotonic() + timeout
    pending = {p.sentinel: p for p in processes}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for sentinel in wait(list(pending), left):
            pending.pop(sentinel).join(0)


def _voxels(tile):
    return (tile.b1 - tile.b0) * int(np.prod(tile.shape))
