"""The tile task: the one computation every executor runs.

A tile (:class:`~conv3d_cli.engine.plan.Tile`: a batch range and an output
box) is computed from its own input region, read with its halo (zeros
outside the volume): the convolution by the plan's method (direct, FFT or
Winograd), exact on NaN and Inf as Keras computes them
(:mod:`~conv3d_cli.engine.nonfinite`), the sums rounded to a float16 or
bfloat16 compute dtype as Keras rounds them, then the bias and the
activation. The block is written into the sink, or returned for the caller
to write when several processes may not write the sink at once.

Nothing here keeps state between tiles but the ``cache`` of kernel
transforms the caller passes (one per worker or per run).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..shapes import CONV
from .choose import exact_fixup_pays
from .direct import correlate_gemm, scatter_transpose
from .fft import SpectrumCache, correlate_fft
from .nonfinite import (
    affected_boxes,
    all_finite,
    nonfinite_voxels,
    spread_nan,
    zero_products,
    zeroed,
)
from .stencil import correlate_stencil, stencil_suits
from .winograd import correlate_winograd


@dataclass(frozen=True)
class TileTask:
    """Everything the tile task needs but the tile: what each worker gets once.

    ``sink`` None: the task returns each block, and whoever holds the sink
    writes it (:func:`write_block`). ``threads``: BLAS/FFT threads per tile.
    """

    job: object
    method: str
    source: object
    sink: object = None
    threads: int = 1
    want_sums: bool = False

    def __call__(self, tile, cache):
        """``(block, sums)`` of ``tile``; block None once it is in the sink."""
        return run_tile(self.job, self.method, tile, self.source, self.sink, cache,
                        self.threads, self.want_sums)


def run_tile(job, method, tile, source, sink, cache, threads=1, want_sums=False):
    """Compute ``tile`` and write it into ``sink`` (in place where the sink allows),
    or return it when ``sink`` is None: ``(block or None, activity sums or None)``."""
    view = _direct_view(job, sink, tile)
    y, sums = compute_tile(job, tile, source, method, cache, fft_workers=threads,
                           want_sums=want_sums, out=view)
    if sink is None:
        return y, sums
    if view is None:
        write_block(job, sink, tile, y)
    return None, sums


def write_block(job, sink, tile, block):
    """Store the post-activation block of ``tile`` in ``sink``."""
    sink.write(tile.b0, tile.b1, job.out_ranges(tile.out), block)


def _direct_view(job, sink, tile):
    """A writable view of the sink for ``tile`` when it can be computed in place."""
    view = getattr(sink, "region_view", None)
    if view is None or job.halved_axis is not None:
        return None
    return view(tile.b0, tile.b1, tile.out)


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
    inside = tuple(slice(ca - a, cz - a) for (a, _), (ca, cz) in zip(ranges, clipped))
    x[(slice(None),) + inside] = _as_input(inner, job)
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


# ------------------------------------------------------------------ warm-up
class ZerosSource:
    """A canonical source of zeros in the job's work dtype: ``read`` gives a
    written (not lazily mapped) block of the asked region, as a file read would."""

    def __init__(self, job):
        self.channels, self.dtype = job.in_channels, job.work_dtype

    def read(self, b0, b1, ranges):
        shape = (b1 - b0,) + tuple(z - a for a, z in ranges) + (self.channels,)
        return np.full(shape, 0, self.dtype)


def warm_up(job, method):
    """Compute one output voxel of ``job`` by ``method`` from zeros, so that the
    compiled kernels its tiles call are compiled (or loaded from numba's
    cache) in this process before workers start: forked workers inherit
    them, the others load what this wrote to the cache instead of compiling.

    The voxel's arrays have the dtypes, ranks and memory layouts of a real
    tile's (numba compiles one version per such signature)."""
    tile = _one_voxel_tile(job) if _calls_compiled_kernels(job, method) else None
    if tile is not None:
        compute_tile(job, tile, ZerosSource(job), method, SpectrumCache())


def _calls_compiled_kernels(job, method):
    """Whether finite tiles of ``job`` by ``method`` call numba kernels: Winograd's
    transforms, the stencil, the scatter form's col2im."""
    if method == "winograd":
        return True
    scatter = job.kind != CONV and any(g.s > 1 for g in job.geoms)
    return method == "direct" and (stencil_suits(job) or scatter)


def _one_voxel_tile(job):
    """A one-voxel tile some input reaches (None if no output has input)."""
    from .plan import Tile
    box = []
    for g in job.geoms:
        o = next((o for o in range(g.out) if g.terms(o, o + 1)[2]), None)
        if o is None:
            return None
        box.append((o, o + 1))
    return Tile(0, 1, tuple(box)) if job.batch else None
