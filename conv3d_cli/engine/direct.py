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

from itertools import product

import numpy as np

# Bytes of im2col block to build at a time: large enough for BLAS to run near
# peak, small enough to stay in L2/L3.
COLS_BLOCK_BYTES = 8 << 20


def _axis_slice(term, off, q0, q1):
    a = term.in_start + off + q0 * term.in_step
    return slice(a, a + (q1 - q0 - 1) * term.in_step + 1, term.in_step)


def _out_slice(term, q0, q1):
    a = term.out_start + q0 * term.out_step
    return slice(a, a + (q1 - q0 - 1) * term.out_step + 1, term.out_step)


def stacked_weights(taps_w, taps):
    """``(G, T * C/G, F/G)`` weights for the tap list ``((j0, o0), (j1, o1), (j2, o2))``."""
    w = np.stack([taps_w[j0, j1, j2] for (j0, _), (j1, _), (j2, _) in taps])  # T,G,Cg,Fg
    t, g, cg, fg = w.shape
    return np.ascontiguousarray(w.transpose(1, 0, 2, 3).reshape(g, t * cg, fg))


def correlate_gemm(x, terms, taps_w, out):
    """Accumulate the tile into ``out`` (B, Do, Ho, Wo, F) from ``x`` (B, Di, Hi, Wi, C)."""
    nb = x.shape[0]
    g, cg, fg = taps_w.shape[3:]
    for t0, t1, t2 in product(*terms):
        taps = list(product(t0.taps, t1.taps, t2.taps))
        w = stacked_weights(taps_w, taps)
        k = len(taps) * cg
        row_bytes = nb * t1.count * t2.count * k * g * x.itemsize
        planes = max(1, min(t0.count, COLS_BLOCK_BYTES // max(row_bytes, 1)))
        cols = np.empty((nb, planes, t1.count, t2.count, g, len(taps), cg), x.dtype)
        for q0 in range(0, t0.count, planes):
            q1 = min(t0.count, q0 + planes)
            m = q1 - q0
            c = cols if m == planes else np.empty((nb, m) + cols.shape[2:], x.dtype)
            for i, ((_, o0), (_, o1), (_, o2)) in enumerate(taps):
                src = x[:, _axis_slice(t0, o0, q0, q1), _axis_slice(t1, o1, 0, t1.count),
                        _axis_slice(t2, o2, 0, t2.count)]
                c[..., i, :] = src.reshape(src.shape[:4] + (g, cg))
            rows = c.reshape(-1, g, k)
            if g == 1:
                res = rows[:, 0] @ w[0]
            else:
                res = np.matmul(rows.transpose(1, 0, 2), w).transpose(1, 0, 2)
            dst = (slice(None), _out_slice(t0, q0, q1), _out_slice(t1, 0, t1.count),
                   _out_slice(t2, 0, t2.count))
            out[dst] += res.reshape(nb, m, t1.count, t2.count, g * fg)
    return out
