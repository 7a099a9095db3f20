"""Winograd F(2x2x2, 3x3x3): 3x3x3 stride-1 layers with many channels.

Lavin & Gray's minimal filtering algorithm, in 3-D. Each 2x2x2 block of
output comes from a 4x4x4 block of input:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (one factor per axis)

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

so the channel mixing becomes 64 independent GEMMs (one per transform point,
``(tiles x C/G) @ (C/G x F/G)`` through BLAS) with 64 / 8 = 8 multiply-adds
per output voxel and channel pair instead of 27: 3.4x fewer. The transforms
(additions only, entries 0, +-1, +-1/2) are compiled with numba and run on
cache-sized slabs of tiles; the output transform adds the bias and sets the
output (no separate pass over it). A slab is stored tile by tile (each tile's
64 x C/G transformed values, then its 64 x F/G products, contiguous), so the
transforms read and write one contiguous run per tile; the GEMMs read and
write it with a row stride of 64 values, which BLAS takes as it is (stored
point by point instead, each tile's values land in 64 runs a slab apart: the
transforms took twice as long and the GEMMs 10-15% less). F(2, 3) computes correlation, as Keras
does, and its small constants keep float32 rounding at the level of direct
summation. F(4, 3) (6^3 points per 4^3 outputs: 3.4 multiply-adds per output
and channel pair, against 8 here) is not used: its larger constants (up to 8
in A^T, 5 in B^T) give float32 errors of 1.6e-5 to 4.4e-5 of the output's
scale on random normal data with 32 to 256 channels (direct: 2e-7 to 3e-7),
whether its transforms run in float32 or float64, and with either point set
(0, +-1, +-2) or (0, +-1, +-1/2): the float32 GEMM on the amplified transform
values dominates. F(3, 3) still reaches 1.2e-5 (tools/winograd_error.py).
"""

from __future__ import annotations

import numpy as np

from .stencil import FASTMATH, numba

G_MATRIX = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
# Bytes of a slab's transformed input and GEMM product (64 x (C + F) values
# per tile): small enough to stay in L2 between the transform that writes
# them and the GEMM / output transform that reads them, large enough for the
# GEMMs' M (tiles) to keep BLAS efficient (64 tiles of 32 -> 64 channels were
# as fast as 128, 256 slower). Tiles are counted over the whole tile box, not
# per row plane, so a slab can be smaller than one plane.
SLAB_BYTES = 3 << 19
MIN_SLAB_TILES = 16


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
    the kernel transform U (64 x C x F / G), one slab of transformed input and
    GEMM product, the input padded by one zero row on axes of odd output
    length, and one batch element's contiguous copy of it."""
    isz = job.work_dtype.itemsize
    c, f, g = job.in_channels, job.filters, job.groups
    per_tile = 64 * (c + f) * isz
    total = 1
    for n in shape:
        total *= -(-n // 2)
    slab = max(1, min(total, max(MIN_SLAB_TILES, SLAB_BYTES // per_tile)))
    need = 1
    for n in shape:
        need *= 2 * -(-n // 2) + 2
    padded = nb * need * c * isz if any(n % 2 for n in shape) else 0
    return 64 * c * (f // g) * isz + slab * per_tile + padded + need * c * isz


def kernel_transform(taps_w, terms):
    """``U = G g G^T`` per axis: (64, G, C/G, F/G), taps laid out by offset."""
    order = [[j for j, _ in sorted(t.taps, key=lambda t: t[1])] for t in terms]
    g = taps_w[np.ix_(*order)].astype(np.float64)  # (3, 3, 3, G, Cg, Fg)
    u = np.einsum("ai,bj,ck,ijkgxf->abcgxf", G_MATRIX, G_MATRIX, G_MATRIX, g)
    return np.ascontiguousarray(u.reshape((64,) + g.shape[3:]).astype(taps_w.dtype))


if numba is not None:
    @numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
    def _input_transform(x, v, na, nb, n1, n2, groups):
        """V[tile - na, xi, g, c] = (B^T d B)[xi] for the tiles na..nb (flat index
        over the (n0, n1, n2) tiles)."""
        cg = x.shape[3] // groups
        u = np.empty((4, 4, 4, cg), x.dtype)
        w = np.empty((4, 4, 4, cg), x.dtype)
        for tile in range(na, nb):
            n = tile - na
            t0 = tile // (n1 * n2)
            t1 = (tile // n2) % n1
            t2 = tile % n2
            for g in range(groups):
                c0 = g * cg
                for i in range(4):  # along W
                    for j in range(4):
                        for c in range(cg):
                            d0 = x[2 * t0 + i, 2 * t1 + j, 2 * t2, c0 + c]
                            d1 = x[2 * t0 + i, 2 * t1 + j, 2 * t2 + 1, c0 + c]
                            d2 = x[2 * t0 + i, 2 * t1 + j, 2 * t2 + 2, c0 + c]
                            d3 = x[2 * t0 + i, 2 * t1 + j, 2 * t2 + 3, c0 + c]
                            u[i, j, 0, c] = d0 - d2
                            u[i, j, 1, c] = d1 + d2
                            u[i, j, 2, c] = d2 - d1
                            u[i, j, 3, c] = d1 - d3
                for i in range(4):  # along H
                    for k in range(4):
                        for c in range(cg):
                            a0 = u[i, 0, k, c]
                            a1 = u[i, 1, k, c]
                            a2 = u[i, 2, k, c]
                            a3 = u[i, 3, k, c]
                            w[i, 0, k, c] = a0 - a2
                            w[i, 1, k, c] = a1 + a2
                            w[i, 2, k, c] = a2 - a1
                            w[i, 3, k, c] = a1 - a3
                for j in range(4):  # along D, into V
                    for k in range(4):
                        for c in range(cg):
                            a0 = w[0, j, k, c]
                            a1 = w[1, j, k, c]
                            a2 = w[2, j, k, c]
                            a3 = w[3, j, k, c]
                            v[n, j * 4 + k, g, c] = a0 - a2
                            v[n, 16 + j * 4 + k, g, c] = a1 + a2
                            v[n, 32 + j * 4 + k, g, c] = a2 - a1
                            v[n, 48 + j * 4 + k, g, c] = a1 - a3

    @numba.njit(nogil=True, fastmath=FASTMATH, cache=True)
    def _output_transform(  # noqa: C901 (unrolled for numba)
            m, out, b, o0, o1, o2, na, nb, n1, n2, c0, c1, c2, groups, bias):
        """out[b, o + 2t + (0|1), g*Fg + f] = bias + (A^T M A) for the tiles na..nb,
        from M[tile - na, xi, g, f]."""
        fg = m.shape[3]
        p = np.empty((2, 4, 4, fg), m.dtype)
        q = np.empty((2, 2, 4, fg), m.dtype)
        for tile in range(na, nb):
            n = tile - na
            t0 = tile // (n1 * n2)
            t1 = (tile // n2) % n1
            t2 = tile % n2
            for g in range(groups):
                for j in range(4):  # along D
                    for k in range(4):
                        for f in range(fg):
                            a0 = m[n, j * 4 + k, g, f]
                            a1 = m[n, 16 + j * 4 + k, g, f]
                            a2 = m[n, 32 + j * 4 + k, g, f]
                            a3 = m[n, 48 + j * 4 + k, g, f]
                            p[0, j, k, f] = a0 + a1 + a2
                            p[1, j, k, f] = a1 - a2 - a3
                for a in range(2):  # along H
                    for k in range(4):
                        for f in range(fg):
                            a0 = p[a, 0, k, f]
                            a1 = p[a, 1, k, f]
                            a2 = p[a, 2, k, f]
                            a3 = p[a, 3, k, f]
                            q[a, 0, k, f] = a0 + a1 + a2
                            q[a, 1, k, f] = a1 - a2 - a3
                for a in range(2):  # along W, into the output
                    y0 = 2 * t0 + a
                    if y0 >= c0:
                        continue
                    for bb in range(2):
                        y1 = 2 * t1 + bb
                        if y1 >= c1:
                            continue
                        for f in range(fg):
                            a0 = q[a, bb, 0, f]
                            a1 = q[a, bb, 1, f]
                            a2 = q[a, bb, 2, f]
                            a3 = q[a, bb, 3, f]
                            bf = bias[g * fg + f]
                            out[b, o0 + y0, o1 + y1, o2 + 2 * t2, g * fg + f] = bf + (a0 + a1 + a2)
                            if 2 * t2 + 1 < c2:
                                w2 = o2 + 2 * t2 + 1
                                out[b, o0 + y0, o1 + y1, w2, g * fg + f] = bf + (a1 - a2 - a3)


def correlate_winograd(x, terms, taps_w, out, cache=None, bias=None):
    """Set ``out`` (B, Do, Ho, Wo, F) to ``bias`` (zeros without one) + the tile's
    correlation of ``x`` (B, Di, Hi, Wi, C): one term per axis covers the tile."""
    (t0,), (t1,), (t2,) = terms
    terms = (t0, t1, t2)
    groups, cg, fg = taps_w.shape[3:]
    key = ("winograd", tuple(t.taps for t in terms))
    u = cache.get_or(key, lambda: kernel_transform(taps_w, terms)) if cache is not None \
        else kernel_transform(taps_w, terms)
    bias = np.zeros(out.shape[4], out.dtype) if bias is None else np.asarray(bias, out.dtype)
    counts = (t0.count, t1.count, t2.count)
    tiles = [-(-c // 2) for c in counts]
    starts = [t.in_start + min(o for _, o in t.taps) for t in terms]
    need = [2 * n + 2 for n in tiles]
    region = x[(slice(None),) + tuple(slice(s, s + n) for s, n in zip(starts, need))]
    if region.shape[1:4] != tuple(need):  # odd output: one more (zero) input row
        padded = np.zeros((x.shape[0],) + tuple(need) + (x.shape[4],), x.dtype)
        padded[(slice(None),) + tuple(slice(0, n) for n in region.shape[1:4])] = region
        region = padded
    total = tiles[0] * tiles[1] * tiles[2]
    per_tile = 64 * (groups * cg + groups * fg) * x.itemsize
    slab = max(1, min(total, max(MIN_SLAB_TILES, SLAB_BYTES // per_tile)))
    v = np.empty((slab, 64, groups, cg), x.dtype)
    m = np.empty((slab, 64, groups, fg), x.dtype)
    for b in range(x.shape[0]):
        xb = np.ascontiguousarray(region[b])
        for a in range(0, total, slab):
            z = min(total, a + slab)
            vv, mm = v[:z - a], m[:z - a]  # the last slab may be shorter (still C-contiguous)
            _input_transform(xb, vv, a, z, tiles[1], tiles[2], groups)
            # (64, G, n, Cg) @ (64, G, Cg, Fg): one GEMM per transform point and group
            np.matmul(vv.transpose(1, 2, 0, 3), u, out=mm.transpose(1, 2, 0, 3))
            _output_transform(mm, out, b, t0.out_start, t1.out_start, t2.out_start,
                              a, z, tiles[1], tiles[2], counts[0], counts[1], counts[2], groups,
                              bias)
    return out
