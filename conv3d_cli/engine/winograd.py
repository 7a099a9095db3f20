"""Winograd F(2x2x4, 3x3x3) and F(2x2x2, 3x3x3): 3x3x3 stride-1 layers with many channels.

Lavin & Gray's minimal filtering algorithm, in 3-D, one factor per axis:

    Y = A^T [ (G g G^T) * (B^T d B) ] A

with F(m, 3) along an axis turning m outputs into m + 2 transform points
from m + 2 inputs. F(2, 3) (points 0, +-1):

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

F(4, 3) (points 0, +-1, +-2; ``F4_*`` below), along W when a tile has at
least ``F4_MIN_W`` outputs there. Each block of 2 x 2 x m outputs (D, H, W)
is then 4 x 4 x (m + 2) points, and the channel mixing is one GEMM per point,
``(tiles x C/G) @ (C/G x F/G)`` through BLAS: 64 / 8 = 8 multiply-adds per
output voxel and channel pair with F(2, 3) along W, 96 / 16 = 6 with F(4, 3)
(against 27 directly: 3.4x and 4.5x fewer).

Why F(4, 3) along one axis only: its larger constants (up to 8 in A^T, 5 in
B^T) amplify the float32 rounding of the GEMM's operands. On random data
with 32 to 256 channels (normal, offset by 10, or a dynamic range of e^12),
the error is, in units of the output's scale: 2.4e-7 to 8.0e-7 for F(2, 3)
along all three axes, 4.7e-7 to 3.3e-6 with F(4, 3) along W, 7.3e-7 to
1.3e-5 along two axes, 1.6e-5 to 4.4e-5 along all three (direct summation:
2e-7 to 6e-7), whether the transforms run in float32 or float64
(``tools/winograd_error.py``); the engine keeps 1e-5.

The transforms (few nonzero constants per row) are compiled with numba and
run on cache-sized slabs of tiles; the output transform adds the bias and
sets the output (no separate pass over it). A slab is stored tile by tile
(each tile's P x C/G transformed values, then its P x F/G products,
contiguous), so the transforms read and write one contiguous run per tile;
the GEMMs read and write it with a row stride of P values, which BLAS takes
as it is (stored point by point instead, each tile's values land in P runs a
slab apart: the transforms took twice as long and the GEMMs 10-15% less).
Winograd computes correlation, as Keras does.
"""

from __future__ import annotations

import numpy as np

from .stencil import FASTMATH, numba

F2_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float)
F2_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
F2_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float)
F4_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], float)
F4_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                 [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
F4_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], float)
G_MATRIX = F2_G
# F(4, 3) along W from this many outputs of a tile on: fewer would compute
# too many outputs past the tile's end (a tile of 5 computes 8).
F4_MIN_W = 8
# Bytes of a slab's transformed input and GEMM product (P x (C + F) values
# per tile): small enough to stay in L2 between the transform that writes
# them and the GEMM / output transform that reads them, large enough for the
# GEMMs' M (tiles) to keep BLAS efficient (64 tiles of 32 -> 64 channels were
# as fast as 128, 256 slower). Tiles are counted over the whole tile box, not
# per row plane, so a slab can be smaller than one plane.
SLAB_BYTES = 3 << 19
MIN_SLAB_TILES = 16


def axis_steps(counts):
    """Outputs per block along (D, H, W) for a tile of ``counts`` outputs."""
    return (2, 2, 4 if counts[2] >= F4_MIN_W else 2)


def _matrices(m):
    return (F4_AT, F4_G, F4_BT) if m == 4 else (F2_AT, F2_G, F2_BT)


def axis_fits(term) -> bool:
    offs = sorted(o for _, o in term.taps)
    return term.in_step == 1 and len(offs) == 3 and offs == list(range(offs[0], offs[0] + 3))


def winograd_suits(job) -> bool:
    """3x3x3 kernels at stride 1 (Conv3D, or Conv3DTranspose at stride 1),
    no dilation, and enough channels for the GEMMs to dominate."""
    if numba is None:
        return False
    cg, fg = job.in_channels // job.groups, job.filters // job.groups
    return (all(g.k == 3 and g.s == 1 and g.d == 1 for g in job.geoms)
            and cg >= 8 and fg >= 8)


def tile_scratch_bytes(job, nb, shape) -> int:
    """Peak scratch bytes of one tile of output ``shape`` (``nb`` batch elements):
    the kernel transform U (P x C x F / G), one slab of transformed input and
    GEMM product, the input padded by zero rows where the blocks pass the
    tile's end, and one batch element's contiguous copy of it."""
    isz = job.work_dtype.itemsize
    c, f, g = job.in_channels, job.filters, job.groups
    steps = axis_steps(shape)
    points = 1
    for m in steps:
        points *= m + 2
    per_tile = points * (c + f) * isz
    total = 1
    for n, m in zip(shape, steps):
        total *= -(-n // m)
    slab = max(1, min(total, max(MIN_SLAB_TILES, SLAB_BYTES // per_tile)))
    need = 1
    for n, m in zip(shape, steps):
        need *= m * -(-n // m) + 2
    padded = nb * need * c * isz if any(n % m for n, m in zip(shape, steps)) else 0
    return points * c * (f // g) * isz + slab * per_tile + padded + need * c * isz


def kernel_transform(taps_w, terms, steps=(2, 2, 2)):
    """``U = G g G^T`` per axis (F(m, 3) along an axis of ``steps`` m): (P, G, C/G,
    F/G), taps laid out by offset."""
    order = [[j for j, _ in sorted(t.taps, key=lambda t: t[1])] for t in terms]
    g = taps_w[np.ix_(*order)].astype(np.float64)  # (3, 3, 3, G, Cg, Fg)
    g0, g1, g2 = (_matrices(m)[1] for m in steps)
    u = np.einsum("ai,bj,ck,ijkgxf->abcgxf", g0, g1, g2, g)
    return np.ascontiguousarray(u.reshape((-1,) + g.shape[3:]).astype(taps_w.dtype))


if numba is not None:
    @numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
    def _input_transform(x, v, na, nb, n1, n2, k2):  # noqa: C901 (loop nest for numba)
        """V[tile - na, xi, c] = (B^T d B)[xi] for the tiles na..nb (flat index over
        the (n0, n1, n2) tiles), point xi = (p * 4 + q) * k2 + r: d is the tile's
        4 x 4 x k2 input block, transformed along W (F(2, 3)'s B^T for k2 = 4,
        F(4, 3)'s for k2 = 6), then along H and D (F(2, 3)'s)."""
        cc = x.shape[3]
        u = np.empty((4, 4, k2, cc), x.dtype)  # along W
        w = np.empty((4, 4, k2, cc), x.dtype)  # along W and H
        for tile in range(na, nb):
            n = tile - na
            i0 = 2 * (tile // (n1 * n2))
            i1 = 2 * ((tile // n2) % n1)
            i2 = (k2 - 2) * (tile % n2)
            for i in range(4):
                for j in range(4):
                    if k2 == 4:
                        for c in range(cc):
                            d0 = x[i0 + i, i1 + j, i2, c]
                            d1 = x[i0 + i, i1 + j, i2 + 1, c]
                            d2 = x[i0 + i, i1 + j, i2 + 2, c]
                            d3 = x[i0 + i, i1 + j, i2 + 3, c]
                            u[i, j, 0, c] = d0 - d2
                            u[i, j, 1, c] = d1 + d2
                            u[i, j, 2, c] = d2 - d1
                            u[i, j, 3, c] = d1 - d3
                    else:
                        for c in range(cc):
                            d0 = x[i0 + i, i1 + j, i2, c]
                            d1 = x[i0 + i, i1 + j, i2 + 1, c]
                            d2 = x[i0 + i, i1 + j, i2 + 2, c]
                            d3 = x[i0 + i, i1 + j, i2 + 3, c]
                            d4 = x[i0 + i, i1 + j, i2 + 4, c]
                            d5 = x[i0 + i, i1 + j, i2 + 5, c]
                            u[i, j, 0, c] = 4 * d0 - 5 * d2 + d4
                            u[i, j, 1, c] = d3 + d4 - 4 * (d1 + d2)
                            u[i, j, 2, c] = d4 - d3 + 4 * (d1 - d2)
                            u[i, j, 3, c] = d4 - d2 + 2 * (d3 - d1)
                            u[i, j, 4, c] = d4 - d2 + 2 * (d1 - d3)
                            u[i, j, 5, c] = 4 * d1 - 5 * d3 + d5
            for i in range(4):  # along H
                for r in range(k2):
                    for c in range(cc):
                        a0 = u[i, 0, r, c]
                        a1 = u[i, 1, r, c]
                        a2 = u[i, 2, r, c]
                        a3 = u[i, 3, r, c]
                        w[i, 0, r, c] = a0 - a2
                        w[i, 1, r, c] = a1 + a2
                        w[i, 2, r, c] = a2 - a1
                        w[i, 3, r, c] = a1 - a3
            for q in range(4):  # along D, into V
                for r in range(k2):
                    for c in range(cc):
                        a0 = w[0, q, r, c]
                        a1 = w[1, q, r, c]
                        a2 = w[2, q, r, c]
                        a3 = w[3, q, r, c]
                        v[n, q * k2 + r, c] = a0 - a2
                        v[n, (4 + q) * k2 + r, c] = a1 + a2
                        v[n, (8 + q) * k2 + r, c] = a2 - a1
                        v[n, (12 + q) * k2 + r, c] = a1 - a3

    @numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
    def _output_transform(  # noqa: C901 (loop nest for numba)
            m, out, b, o0, o1, o2, na, nb, n1, n2, c0, c1, c2, bias, k2):
        """out[b, o + (2, 2, k2 - 2) t + e, f] = bias + (A^T M A)[e] for the tiles
        na..nb, from M[tile - na, xi, f]: along D and H (F(2, 3)'s A^T), then
        along W (F(2, 3)'s for k2 = 4, F(4, 3)'s for k2 = 6) into the output,
        only where it is inside the tile's ``(c0, c1, c2)`` outputs."""
        ff = m.shape[2]
        p = np.empty((2, 4, k2, ff), m.dtype)
        q = np.empty((2, 2, k2, ff), m.dtype)
        for tile in range(na, nb):
            n = tile - na
            y0 = 2 * (tile // (n1 * n2))
            y1 = 2 * ((tile // n2) % n1)
            y2 = (k2 - 2) * (tile % n2)
            for j in range(4):  # along D
                for r in range(k2):
                    for f in range(ff):
                        a0 = m[n, j * k2 + r, f]
                        a1 = m[n, (4 + j) * k2 + r, f]
                        a2 = m[n, (8 + j) * k2 + r, f]
                        a3 = m[n, (12 + j) * k2 + r, f]
                        p[0, j, r, f] = a0 + a1 + a2
                        p[1, j, r, f] = a1 - a2 - a3
            for a in range(2):  # along H
                for r in range(k2):
                    for f in range(ff):
                        a0 = p[a, 0, r, f]
                        a1 = p[a, 1, r, f]
                        a2 = p[a, 2, r, f]
                        a3 = p[a, 3, r, f]
                        q[a, 0, r, f] = a0 + a1 + a2
                        q[a, 1, r, f] = a1 - a2 - a3
            left = c2 - y2  # outputs of this block inside the tile along W
            for a in range(min(2, c0 - y0)):  # along W, into the output
                for e in range(min(2, c1 - y1)):
                    dst = out[b, o0 + y0 + a, o1 + y1 + e, o2 + y2:]
                    if k2 == 4:
                        for f in range(ff):
                            a0 = q[a, e, 0, f]
                            a1 = q[a, e, 1, f]
                            a2 = q[a, e, 2, f]
                            a3 = q[a, e, 3, f]
                            dst[0, f] = bias[f] + (a0 + a1 + a2)
                            if left > 1:
                                dst[1, f] = bias[f] + (a1 - a2 - a3)
                    else:
                        for f in range(ff):
                            a0 = q[a, e, 0, f]
                            a1 = q[a, e, 1, f]
                            a2 = q[a, e, 2, f]
                            a3 = q[a, e, 3, f]
                            a4 = q[a, e, 4, f]
                            a5 = q[a, e, 5, f]
                            s12, d12 = a1 + a2, a1 - a2
                            s34, d34 = a3 + a4, a3 - a4
                            dst[0, f] = bias[f] + (a0 + s12 + s34)
                            if left > 1:
                                dst[1, f] = bias[f] + (d12 + 2 * d34)
                            if left > 2:
                                dst[2, f] = bias[f] + (s12 + 4 * s34)
                            if left > 3:
                                dst[3, f] = bias[f] + (d12 + 8 * d34 + a5)


def correlate_winograd(x, terms, taps_w, out, cache=None, bias=None):
    """Set ``out`` (B, Do, Ho, Wo, F) to ``bias`` (zeros without one) + the tile's
    correlation of ``x`` (B, Di, Hi, Wi, C): one term per axis covers the tile."""
    (t0,), (t1,), (t2,) = terms
    terms = (t0, t1, t2)
    groups, cg, fg = taps_w.shape[3:]
    counts = (t0.count, t1.count, t2.count)
    steps = axis_steps(counts)
    key = ("winograd", steps, tuple(t.taps for t in terms))
    u = cache.get_or(key, lambda: kernel_transform(taps_w, terms, steps)) if cache is not None \
        else kernel_transform(taps_w, terms, steps)
    bias = np.zeros(out.shape[4], out.dtype) if bias is None else np.asarray(bias, out.dtype)
    tiles = [-(-c // m) for c, m in zip(counts, steps)]
    starts = [t.in_start + min(o for _, o in t.taps) for t in terms]
    need = [m * n + 2 for m, n in zip(steps, tiles)]
    region = x[(slice(None),) + tuple(slice(s, s + n) for s, n in zip(starts, need))]
    if region.shape[1:4] != tuple(need):  # blocks past the tile's end: zero input rows
        padded = np.zeros((x.shape[0],) + tuple(need) + (x.shape[4],), x.dtype)
        padded[(slice(None),) + tuple(slice(0, n) for n in region.shape[1:4])] = region
        region = padded
    points = u.shape[0]
    total = tiles[0] * tiles[1] * tiles[2]
    per_tile = points * (groups * cg + groups * fg) * x.itemsize
    slab = max(1, min(total, max(MIN_SLAB_TILES, SLAB_BYTES // per_tile)))
    v = np.empty((slab, points, groups * cg), x.dtype)
    m = np.empty((slab, points, groups * fg), x.dtype)
    for b in range(x.shape[0]):
        xb = np.ascontiguousarray(region[b])
        for a in range(0, total, slab):
            z = min(total, a + slab)
            vv, mm = v[:z - a], m[:z - a]  # the last slab may be shorter (still C-contiguous)
            _input_transform(xb, vv, a, z, tiles[1], tiles[2], steps[2] + 2)
            # (P, G, n, Cg) @ (P, G, Cg, Fg): one GEMM per transform point and group
            np.matmul(vv.reshape(z - a, points, groups, cg).transpose(1, 2, 0, 3), u,
                      out=mm.reshape(z - a, points, groups, fg).transpose(1, 2, 0, 3))
            _output_transform(mm, out, b, t0.out_start, t1.out_start, t2.out_start,
                              a, z, tiles[1], tiles[2], counts[0], counts[1], counts[2],
                              bias, steps[2] + 2)
    return out
