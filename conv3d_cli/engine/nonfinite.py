"""NaN and +-Inf as Keras computes them, on every path.

Keras sums the products ``x * w`` over taps and channels, so a non-finite input
voxel reaches exactly the outputs whose window holds it: NaN where the sum
meets a NaN, ``inf * 0`` (a zero weight) or ``inf - inf``, +-Inf where it
meets Infs of one sign only; no other output changes.

- The direct paths (stencil, im2col GEMM, scatter) sum those same products in
  IEEE arithmetic: BLAS multiplies zero operands like any other, and the
  compiled kernels are built without the fast-math flags that assume finite
  values (see ``stencil.FASTMATH``). They are exact as they are.
- FFT and Winograd are not: a transform mixes every input of its block into
  every output of it (one NaN turns an FFT tile NaN), and Winograd's
  transforms compute ``inf - inf``. These paths check the tile's input
  (``all_finite``: one pass over it, cheap next to a transform). When it holds
  a NaN or Inf, the tile is computed with those values set to 0, which is
  exact for every output whose window holds none of them. Then:

  - a NaN input makes every product NaN, whatever the weight (``nan * 0`` is
    NaN too), so every output whose window holds it is NaN, for every filter
    of its channel's group: ``spread_nan`` sets them, a dilation of the NaN
    mask by the window, with nothing to compute (a masked statistical map,
    NaN outside the brain, costs one FFT and a few passes over a mask);
  - an Inf input gives +-Inf or NaN depending on the weights' signs and
    zeros, so the output blocks it reaches are recomputed by the direct path
    (``affected_boxes``), or the whole tile when they are a large part of it
    (``choose.exact_fixup_pays``).

A non-finite *weight* is multiplied by everything in its window, including
the zeros of 'same' padding (``0 * inf`` is NaN): the direct paths read those
zeros from the padded tile and multiply them too, so tiles with non-finite
weights take the direct path (a transform would spread the weight's NaN to
every output). Keras's transposed convolution also multiplies the zeros it
inserts between input voxels and pads around them, which the direct paths
never touch: ``zero_products`` adds the NaN they make.
"""

from __future__ import annotations

import numpy as np

# Edge, in output voxels, of the blocks recomputed exactly around Inf input:
# small enough that one Inf costs little (the blocks around a 7^3 window hold
# at most 32^3 outputs), large enough that the per-block overhead of the direct
# path stays small.
BLOCK = 16
# Bytes checked at a time, so the check's boolean temporary stays in cache.
CHECK_BYTES = 1 << 20


def all_finite(a) -> bool:
    """Whether ``a`` holds no NaN or Inf (slab by slab along its axis 1 when it
    has one, stopping at the first slab that does)."""
    a = np.asarray(a)
    if a.ndim < 2:
        return bool(np.isfinite(a).all())
    step = max(1, CHECK_BYTES // max(a[:, :1].nbytes, 1))
    return all(np.isfinite(a[:, i:i + step]).all() for i in range(0, a.shape[1], step))


def nonfinite_voxels(x):
    """Spatial masks ``(D, H, W)`` of the voxels of ``x`` (B, D, H, W, C) holding a
    NaN or Inf, and an Inf, in some batch element or channel; None when ``x``
    is finite."""
    if all_finite(x):
        return None
    bad, inf = np.empty(x.shape[1:4], bool), np.empty(x.shape[1:4], bool)
    step = max(1, CHECK_BYTES // max(x[:, :1].nbytes, 1))
    for i in range(0, x.shape[1], step):
        slab = x[:, i:i + step]
        bad[i:i + step] = ~np.isfinite(slab).all(axis=(0, 4))
        inf[i:i + step] = np.isinf(slab).any(axis=(0, 4))
    return bad, inf


def zeroed(x, bad):
    """A copy of ``x`` with its NaN and Inf values (all in the voxels ``bad``) set to 0."""
    clean = x.copy()
    values = clean[:, bad]
    values[~np.isfinite(values)] = 0
    clean[:, bad] = values
    return clean


def spread_nan(job, axes, x, acc):
    """Set NaN in ``acc`` (B, D, H, W, F) at every output whose window holds a NaN
    of ``x``, for every filter of the NaN channel's group.

    The window of output ``o`` is a product of per-axis tap sets (each axis's
    :class:`~conv3d_cli.shapes.AxisTerm` holding ``o``: input
    ``in_start + offset_j + in_step * q`` for each tap j), so the outputs a
    mask reaches follow one axis at a time (``_reach``), starting from the
    NaN's bounding box: a few NaN cost a few voxels of work.
    """
    groups, cg, fg = job.taps.shape[3:]
    for g in range(groups):
        nan = np.isnan(x[..., g * cg:(g + 1) * cg]).any(axis=-1)  # (B, D, H, W)
        spans = [np.flatnonzero(nan.any(axis=tuple(i for i in range(4) if i != a)))
                 for a in (1, 2, 3)]
        if not spans[0].size:
            continue
        nan = nan[(slice(None),) + tuple(slice(s[0], s[-1] + 1) for s in spans)]
        region = []
        for axis, (_, _, terms), start in zip((1, 2, 3), axes, (s[0] for s in spans)):
            lo, nan = _reach(nan, axis, terms, acc.shape[axis], start)
            if nan is None:  # no tap lands on these voxels
                break
            region.append(slice(lo, lo + nan.shape[axis]))
        else:
            acc[(slice(None),) + tuple(region) + (slice(g * fg, (g + 1) * fg),)][nan] = np.nan


def _reach(mask, axis, terms, n, start):
    """Along ``axis``: which of the ``n`` outputs have a tap on a True voxel of
    ``mask`` (whose index 0 is input ``start``). Returns the first such output
    and the mask from there to the last one, or ``(0, None)`` if none is."""
    size = mask.shape[axis]
    shape = list(mask.shape)
    shape[axis] = n
    out = np.zeros(shape, bool)
    index = [slice(None)] * mask.ndim
    for t in terms:
        for _, off in t.taps:
            a, step = t.in_start + off - start, t.in_step  # mask index of q = 0
            q0, q1 = max(0, -(a // step)), min(t.count, -((a - size) // step))
            if q1 <= q0:
                continue
            index[axis] = slice(t.out_start + q0 * t.out_step,
                                t.out_start + (q1 - 1) * t.out_step + 1, t.out_step)
            dst = out[tuple(index)]
            index[axis] = slice(a + q0 * step, a + (q1 - 1) * step + 1, step)
            np.logical_or(dst, mask[tuple(index)], out=dst)
    hit = np.flatnonzero(out.any(axis=tuple(i for i in range(out.ndim) if i != axis)))
    if not hit.size:
        return 0, None
    index[axis] = slice(hit[0], hit[-1] + 1)
    return hit[0], out[tuple(index)]


def affected_boxes(job, tile, origin, bad, block=None):
    """Boxes of the tile's output (tile-local ``(start, stop)`` per axis) that hold
    every output whose window reaches a voxel of ``bad``.

    ``bad`` is the mask of non-finite voxels of the tile's input block, whose
    voxel 0 is input voxel ``origin``. The tile's output is cut into blocks of
    ``block`` voxels per axis. A block's input region is a product of per-axis
    ranges (``AxisGeometry.terms``), so "the region holds a bad voxel" reduces
    one axis at a time: any() over the D range of each block's slab (whole
    planes at a time, the fast way through memory), then H, then W. Marked
    blocks next to each other along W become one box.
    """
    block = block or BLOCK
    spans = []  # per axis: (tile-local output range, local input range or None)
    for axis, (g, (o0, o1), i0) in enumerate(zip(job.geoms, tile.out, origin)):
        spans.append([])
        for a in range(o0, o1, block):
            b = min(a + block, o1)
            lo, hi, terms = g.terms(a, b)
            rng = None
            if terms:  # no terms: no input reaches these outputs (bias only)
                rng = (lo - i0, hi - i0)
                assert 0 <= rng[0] and rng[1] <= bad.shape[axis], (rng, bad.shape)
            spans[-1].append(((a - o0, b - o0), rng))
    hit = bad
    for axis in (0, 1, 2):
        cols = []
        for _, rng in spans[axis]:
            shape = list(hit.shape)
            shape[axis] = 1
            if rng is None:
                cols.append(np.zeros(shape, bool))
                continue
            index = [slice(None)] * 3
            index[axis] = slice(*rng)
            cols.append(hit[tuple(index)].any(axis=axis, keepdims=True))
        hit = np.concatenate(cols, axis=axis)
    boxes = []
    for i, j in np.argwhere(hit.any(axis=2)):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], hit[i, j].view(np.int8), [0]))))
        for k0, k1 in zip(edges[::2], edges[1::2]):  # runs [k0, k1) of marked blocks
            boxes.append((spans[0][i][0], spans[1][j][0],
                          (spans[2][k0][0][0], spans[2][k1 - 1][0][1])))
    return boxes


def zero_products(job, tile, acc):
    """Set NaN where Keras's transposed convolution multiplies a non-finite
    weight by one of the zeros it inserts between input voxels or pads around
    them (``acc`` is the tile's output block, ``(B, D, H, W, F)``).

    Keras computes output ``o`` as ``sum_j z[o + crop - j*d] @ w[j]`` over every
    tap ``j`` of the zero-stuffed input ``z`` (``z[i*s] = x[i]``, zero between
    and around). Tap ``j`` meets a zero unless ``p = o + crop - j*d`` is a
    multiple of ``s`` with ``0 <= p / s < n``, on every axis; ``0 * inf`` and
    ``0 * nan`` are NaN. The direct paths multiply real voxels only.
    """
    bad = ~np.isfinite(job.kernel).all(axis=4)  # kernel (kd, kh, kw, F, C) -> (kd, kh, kw, F)
    real = []  # per axis: (outputs of the tile, taps) -> tap meets a real voxel
    for g, (o0, o1) in zip(job.geoms, tile.out):
        p = np.arange(o0, o1)[:, None] + g.offset - np.arange(g.k)[None, :] * g.d
        real.append((p % g.s == 0) & (p >= 0) & (p < g.n * g.s))
    r0, r1, r2 = real
    for f in np.flatnonzero(bad.any(axis=(0, 1, 2))):
        clean = np.ones(tile.shape, bool)  # outputs whose bad taps all meet real voxels
        for j0, j1 in np.argwhere(bad[:, :, :, f].any(axis=2)):
            on_w = r2[:, bad[j0, j1, :, f]].all(axis=1)
            clean &= r0[:, j0, None, None] & r1[None, :, j1, None] & on_w[None, None, :]
        acc[..., f][:, ~clean] = np.nan
