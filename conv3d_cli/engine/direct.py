"""Direct (spatial-domain) computation of one tile.

The tile is described by per-axis :class:`~conv3d_cli.shapes.AxisTerm` lists;
each combination of one term per axis is a strided correlation
``out[q] += sum_taps x[in_start + off + step*q] @ W[tap]``.

Two formulations, chosen by channel count:

- *GEMM* (im2col in cache-sized blocks): the taps' shifted views are copied
  side by side into a ``(rows, taps * C_in/G)`` block and multiplied by the
  stacked ``(taps * C_in/G, F/G)`` weights through BLAS, one group at a time.
  Strided layers gather only the strided positions; transposed layers use one
  term per output phase, so no inserted zero is ever multiplied.
- *stencil* (few channels): a compiled loop (``numba``) that accumulates all
  taps for a row of output while it is in cache, instead of one pass over
  memory per tap. See :mod:`conv3d_cli.engine.stencil`.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np

# Bytes of im2col block to build at a time: large enough for BLAS to run near
# peak, small enough to stay in L2/L3.
COLS_BLOCK_BYTES = 8 << 20
# Bytes of the scatter form's product block (half of L2).
SCATTER_BLOCK_BYTES = 1 << 20


def tile_scratch_bytes(job, nb, shape) -> int:
    """Peak scratch bytes of one tile of output ``shape`` (``nb`` batch elements)
    on the direct path: the im2col GEMM's column block and its product (two
    blocks of at most ``COLS_BLOCK_BYTES``, smaller for small tiles); where
    larger, the stencil's channels-first copy of the input block (several
    channels) or the scatter form's product slab (``SCATTER_BLOCK_BYTES``, or
    one input row's products) with all taps' weights, twice."""
    from .stencil import stencil_suits
    isz = job.work_dtype.itemsize
    taps = math.prod(g.k for g in job.geoms)
    scratch = min(COLS_BLOCK_BYTES * 2,
                  2 * math.prod(shape) * nb * job.in_channels * taps * isz)
    if stencil_suits(job):
        if job.in_channels > 1:
            x = nb * math.prod(job.input_extent(shape)) * job.in_channels * isz
            scratch = max(scratch, x)
    elif job.kind != "conv" and any(g.s > 1 for g in job.geoms):
        row = job.input_extent(shape)[2] * taps * job.filters * isz
        weights = job.in_channels * taps * job.filters * isz
        scratch = max(scratch, max(SCATTER_BLOCK_BYTES, row) + 2 * weights)
    return scratch


def _axis_slice(term, off, q0, q1):
    a = term.in_start + off + q0 * term.in_step
    return slice(a, a + (q1 - q0 - 1) * term.in_step + 1, term.in_step)


def _out_slice(term, q0, q1):
    a = term.out_start + q0 * term.out_step
    return slice(a, a + (q1 - q0 - 1) * term.out_step + 1, term.out_step)


def _w_window(x, term):
    """A view ``(B, Di, Hi, count, taps, C)`` of every W window of ``term``, and the
    kernel indices of its taps in window order.

    The taps of one axis sit at offsets in arithmetic progression (``j * d``
    for Conv3D, consecutive for a transposed phase), so all windows are one
    strided view and each output voxel's ``taps x C`` values are copied as one
    run instead of one run per tap.
    """
    taps = sorted(term.taps, key=lambda t: t[1])
    offs = [o for _, o in taps]
    step = offs[1] - offs[0] if len(offs) > 1 else 1
    assert all(b - a == step for a, b in zip(offs, offs[1:]))
    sb, s0, s1, s2, sc = x.strides
    nb, d0, d1, _, c = x.shape
    view = np.lib.stride_tricks.as_strided(
        x[:, :, :, term.in_start + offs[0]:], shape=(nb, d0, d1, term.count, len(taps), c),
        strides=(sb, s0, s1, s2 * term.in_step, s2 * step, sc), writeable=False)
    return view, [j for j, _ in taps]


def correlate_gemm(x, terms, taps_w, out):
    """Accumulate the tile into ``out`` (B, Do, Ho, Wo, F) from ``x`` (B, Di, Hi, Wi, C)."""
    nb = x.shape[0]
    g, cg, fg = taps_w.shape[3:]
    for t0, t1, t2 in product(*terms):
        win, j2s = _w_window(x, t2)
        k2 = len(j2s)
        taps01 = list(product(t0.taps, t1.taps))
        # (G, T01 * k2 * Cg, Fg), K ordered as the columns below: tap01, W tap, channel.
        w = taps_w[np.ix_([j0 for (j0, _), _ in taps01], [j1 for _, (j1, _) in taps01], j2s)]
        w = w[np.arange(len(taps01)), np.arange(len(taps01))]  # (T01, k2, G, Cg, Fg)
        w = np.ascontiguousarray(w.transpose(2, 0, 1, 3, 4).reshape(g, -1, fg))
        k = w.shape[1]
        row_bytes = nb * t1.count * t2.count * k * g * x.itemsize
        planes = max(1, min(t0.count, COLS_BLOCK_BYTES // max(row_bytes, 1)))
        cols = np.empty((nb, planes, t1.count, t2.count, g, len(taps01), k2, cg), x.dtype)
        for q0 in range(0, t0.count, planes):
            q1 = min(t0.count, q0 + planes)
            m = q1 - q0
            c = cols if m == planes else np.empty((nb, m) + cols.shape[2:], x.dtype)
            for i, ((_, o0), (_, o1)) in enumerate(taps01):
                src = win[:, _axis_slice(t0, o0, q0, q1), _axis_slice(t1, o1, 0, t1.count)]
                src = src.reshape(src.shape[:5] + (g, cg))  # (B, m, n1, n2, k2, G, Cg)
                c[:, :, :, :, :, i] = src.transpose(0, 1, 2, 3, 5, 4, 6)
            rows = c.reshape(-1, g, k)
            if g == 1:
                res = rows[:, 0] @ w[0]
            else:
                res = np.matmul(rows.transpose(1, 0, 2), w).transpose(1, 0, 2)
            dst = (slice(None), _out_slice(t0, q0, q1), _out_slice(t1, 0, t1.count),
                   _out_slice(t2, 0, t2.count))
            out[dst] += res.reshape(nb, m, t1.count, t2.count, g * fg)
    return out


def scatter_transpose(x, x_start, geoms, tile, kernel, out):
    """Transposed convolution of one tile in scatter form, through one GEMM per slab.

    ``full[i*s + j*d] += x[i] @ kernel[j].T`` (docs/semantics.md): the input
    itself is the GEMM's left operand (no im2col), multiplied once by all
    taps' weights ``(C, k^3 * F)``; a compiled col2im then adds each tap's
    slab of the product into the tile at its strided positions. ``x_start`` is
    the input index (per axis) of ``x[:, 0, 0, 0]``; ``tile.out`` the tile's
    output box.
    """
    from .stencil import col2im
    nb, di, hi, wi, c = x.shape
    k = [g.k for g in geoms]
    f = kernel.shape[3]
    w_all = np.ascontiguousarray(kernel.transpose(4, 0, 1, 2, 3).reshape(c, -1))  # (C, k^3 F)
    # One batch element and a few (D, H) input rows at a time: the product
    # block stays in L2 from the GEMM that writes it to the col2im that reads it.
    per_row = wi * w_all.shape[1] * x.itemsize
    rows = max(1, min(hi, SCATTER_BLOCK_BYTES // max(per_row, 1)))
    planes = max(1, min(di, SCATTER_BLOCK_BYTES // max(per_row * hi, 1)))
    if planes > 1:
        rows = hi

    def spans(ax, a, n):
        """Per tap: input rows [lo, hi) of x (local, from row a, n of them) that land
        in the tile, and the tile-local output row of the first."""
        g, (o0, o1) = geoms[ax], tile.out[ax]
        lo_hi_st = np.zeros((3, g.k), np.intp)
        for j in range(g.k):
            base = (x_start[ax] + a) * g.s + j * g.d - g.offset - o0  # output of row a
            lo = max(0, -(base // g.s))
            hi = min(n, -(-(o1 - o0 - base) // g.s))
            lo_hi_st[:, j] = (lo, max(hi, lo), base + lo * g.s)
        return lo_hi_st

    steps = np.array([g.s for g in geoms], np.intp)
    s2 = spans(2, 0, wi)
    for b in range(nb):
        for a in range(0, di, planes):
            z = min(di, a + planes)
            s0 = spans(0, a, z - a)
            for r in range(0, hi, rows):
                e = min(hi, r + rows)
                y = (x[b, a:z, r:e].reshape(-1, c) @ w_all).reshape(
                    1, z - a, e - r, wi, k[0] * k[1] * k[2], f)
                col2im(y, out[b:b + 1], s0, spans(1, r, e - r), s2, steps)
    return out
