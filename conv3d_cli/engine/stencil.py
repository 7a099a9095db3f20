"""Compiled stencil for few channels (numba).

With one or a few channels per group, im2col + GEMM is memory-bound: each
tap is a pass over the block. This loop instead keeps one output row (all of
W for a fixed D, H and filter) in a small accumulator while it sums every tap
over it, so the input rows it reads stay in L1/L2 and the inner loop over W
vectorizes. It is compiled once (``cache=True`` keeps the machine code beside
the module) and releases the GIL, so tiles can run in threads.
"""

from __future__ import annotations

from itertools import product

import numpy as np

# numba.njit, importing numba on a kernel's first call (None without numba)
from .jit import numba, worth_compiling

# Channels-per-group x filters-per-group up to which the stencil beats GEMM
# (measured by `make bench`: GEMM needs a wide K x N to reach BLAS speed).
MAX_CG_FG = 16

# LLVM fast-math flags of the compiled kernels: contract a * b + c into an FMA,
# ignore the sign of zero, approximate reciprocals and functions. Not ``nnan`` or
# ``ninf``: with them LLVM may assume that no NaN or Inf exists (and fold
# ``x * 0`` to 0), while Keras's sums carry them to every output they reach.
# Not ``reassoc`` either: together with ``nsz`` it lets LLVM cancel ``x - x``
# and ``(a + x) - x``, turning Inf - Inf into a number. The loops vectorize
# without it (they have no reductions); `make bench` shows no loss of speed.
FASTMATH = {"nsz", "arcp", "contract", "afn"}


def stencil_suits(job) -> bool:
    cg, fg = job.in_channels // job.groups, job.filters // job.groups
    return numba is not None and cg * fg <= MAX_CG_FG and worth_compiling(job)


if numba is not None:
    @numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
    def _kernel(  # noqa: C901 (one loop nest, compiled by numba)
            xt, w, out, in_start, in_step, offs0, offs1, offs2, out_start, out_step,
            counts, groups, init, assign):
        # xt is channels-first (B, C, D, H, W) so every input row is contiguous.
        nb = xt.shape[0]
        cg = xt.shape[1] // groups
        fg = out.shape[4] // groups
        k0, k1, k2 = offs0.shape[0], offs1.shape[0], offs2.shape[0]
        n0, n1, n2 = counts[0], counts[1], counts[2]
        s2 = in_step[2]
        acc = np.empty((fg, n2), dtype=out.dtype)
        for b in range(nb):
            for q0 in range(n0):
                o0 = out_start[0] + q0 * out_step[0]
                for q1 in range(n1):
                    o1 = out_start[1] + q1 * out_step[1]
                    for g in range(groups):
                        for f in range(fg):
                            acc[f, :] = init[g * fg + f]
                        for t0 in range(k0):
                            i0 = in_start[0] + offs0[t0] + q0 * in_step[0]
                            for t1 in range(k1):
                                i1 = in_start[1] + offs1[t1] + q1 * in_step[1]
                                for c in range(cg):
                                    row = xt[b, g * cg + c, i0, i1]
                                    for t2 in range(k2):
                                        base = in_start[2] + offs2[t2]
                                        for f in range(fg):
                                            wv = w[t0, t1, t2, g, c, f]
                                            a = acc[f]
                                            if s2 == 1:
                                                seg = row[base:base + n2]
                                                for q2 in range(n2):
                                                    a[q2] += seg[q2] * wv
                                            else:
                                                for q2 in range(n2):
                                                    a[q2] += row[base + q2 * s2] * wv
                        for f in range(fg):
                            if assign:
                                for q2 in range(n2):
                                    w2 = out_start[2] + q2 * out_step[2]
                                    out[b, o0, o1, w2, g * fg + f] = acc[f, q2]
                            else:
                                for q2 in range(n2):
                                    w2 = out_start[2] + q2 * out_step[2]
                                    out[b, o0, o1, w2, g * fg + f] += acc[f, q2]


if numba is not None:
    @numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
    def col2im(y, out, sp0, sp1, sp2, steps):
        """out[b, o] += y[b, i, tap] where o = first + (i - lo) * stride per axis and tap.

        ``spN`` are (3, k) arrays of (lo, hi, first output) per tap of axis N;
        used by the scatter form of transposed convolution. Input-major: the
        products of one input row ``y[b, i0, i1]`` (W x taps x F) are added
        while they are in cache, into the few output rows they reach, so ``y``
        is read once, in order.
        """
        nb, n0, n1, nf = y.shape[0], y.shape[1], y.shape[2], y.shape[5]
        k0, k1, k2 = sp0.shape[1], sp1.shape[1], sp2.shape[1]
        for b in range(nb):
            for i0 in range(n0):
                for i1 in range(n1):
                    for j0 in range(k0):
                        if i0 < sp0[0, j0] or i0 >= sp0[1, j0]:
                            continue
                        o0 = sp0[2, j0] + (i0 - sp0[0, j0]) * steps[0]
                        for j1 in range(k1):
                            if i1 < sp1[0, j1] or i1 >= sp1[1, j1]:
                                continue
                            o1 = sp1[2, j1] + (i1 - sp1[0, j1]) * steps[1]
                            for j2 in range(k2):
                                t = (j0 * k1 + j1) * k2 + j2
                                for i2 in range(sp2[0, j2], sp2[1, j2]):
                                    o2 = sp2[2, j2] + (i2 - sp2[0, j2]) * steps[2]
                                    for f in range(nf):
                                        out[b, o0, o1, o2, f] += y[b, i0, i1, i2, t, f]


def correlate_stencil(x, terms, taps_w, out, bias=None):
    """Accumulate the tile into ``out`` (B, Do, Ho, Wo, F) from ``x`` (B, Di, Hi, Wi, C).

    With ``bias`` (one term per axis, so every output is written once), ``out``
    need not be initialised: it is set to bias + sum, saving two passes over it.
    """
    groups = taps_w.shape[3]
    assign = bias is not None
    init = (np.asarray(bias, out.dtype) if assign else np.zeros(out.shape[4], out.dtype))
    xt = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    for t0, t1, t2 in product(*terms):
        js = [np.array([j for j, _ in t.taps], np.intp) for t in (t0, t1, t2)]
        w = np.ascontiguousarray(taps_w[np.ix_(*js)])
        offs = [np.array([o for _, o in t.taps], np.intp) for t in (t0, t1, t2)]
        _kernel(xt, w, out,
                np.array([t0.in_start, t1.in_start, t2.in_start], np.intp),
                np.array([t0.in_step, t1.in_step, t2.in_step], np.intp),
                offs[0], offs[1], offs[2],
                np.array([t0.out_start, t1.out_start, t2.out_start], np.intp),
                np.array([t0.out_step, t1.out_step, t2.out_step], np.intp),
                np.array([t0.count, t1.count, t2.count], np.intp), groups, init, assign)
    return out
