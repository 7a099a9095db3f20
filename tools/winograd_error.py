"""Float32 error of Winograd F(m, 3) in 3-D against exact (float64) summation.

    python tools/winograd_error.py

Why the engine uses F(2, 3) along D and H and F(4, 3) along W only, and not
F(4, 3) or F(3, 3) along every axis: for each point set this builds the
Toom-Cook matrices A^T, G, B^T (one set per axis), runs the 3-D algorithm with
float32 GEMMs (transforms in float32, or in float64 and rounded to float32
around the GEMM) and prints max |error| / max |exact output|, beside direct
float32 summation, for random normal data, 256 channels, a large dynamic range
(values and weights scaled by e^U(-6, 6) and e^U(-3, 3)) and an offset of 10.
The engine's tolerance is 1e-5 of that scale.
"""

import itertools
from fractions import Fraction

import numpy as np


def toom_cook(points, m, r):
    """A^T (m x n), G (n x r), B^T (n x n) of correlation F(m, r) with the finite
    ``points`` and infinity: y = A^T [(G g) * (B^T d)]."""
    n = m + r - 1
    pts = [Fraction(p) for p in points]
    assert len(pts) == n - 1
    at, g = np.zeros((m, n)), np.zeros((n, r))
    for i, a in enumerate(pts):
        norm = np.prod([a - b for b in pts if b != a])
        at[:, i] = [float(a ** j) for j in range(m)]
        g[i] = [float(a ** k / norm) for k in range(r)]
    at[m - 1, n - 1] = g[n - 1, r - 1] = 1
    # B^T from exactness: sum_i A^T[j, i] G[i, k] B^T[i, l] = [l == j + k], a linear
    # system in the unknowns B^T[i, q] (columns ordered q, i).
    eqs = np.einsum("ji,ik,lq->jklqi", at, g, np.eye(n)).reshape(m * r * n, n * n)
    want = np.zeros((m, r, n))
    for j, k in itertools.product(range(m), range(r)):
        want[j, k, j + k] = 1
    bt = np.linalg.lstsq(eqs, want.ravel(), rcond=None)[0].reshape(n, n).T
    assert np.allclose(np.einsum("ji,ik,il->jkl", at, g, bt), want, atol=1e-9)
    return at, g, bt


def winograd(x, w, matrices, transform_dtype):
    """Valid 3-D correlation of x (D, D, D, C) by w (3, 3, 3, C, F), float32 GEMMs;
    ``matrices`` one (A^T, G, B^T) per axis (D, H, W)."""
    ms = [at.shape[0] for at, _, _ in matrices]
    ns = [at.shape[1] for at, _, _ in matrices]
    t = [(x.shape[0] - 2) // m for m in ms]
    idx = [np.arange(ti)[:, None] * m + np.arange(n) for ti, m, n in zip(t, ms, ns)]
    d = x[idx[0]][:, :, idx[1]][:, :, :, :, idx[2]].astype(transform_dtype)
    b = [bt.astype(transform_dtype) for _, _, bt in matrices]
    v = np.einsum("ai,xiyjzkc->xyzajkc", b[0], d)
    v = np.einsum("bj,xyzajkc->xyzabkc", b[1], v)
    v = np.einsum("ek,xyzabkc->xyzabec", b[2], v).astype(np.float32)
    g = [gg for _, gg, _ in matrices]
    u = np.einsum("ai,bj,ek,ijkcf->abecf", *g, w.astype(np.float64)).astype(np.float32)
    points, tiles = int(np.prod(ns)), int(np.prod(t))
    prod = np.matmul(v.reshape(tiles, points, -1).transpose(1, 0, 2),
                     u.reshape(points, w.shape[3], -1))
    mm = prod.transpose(1, 0, 2).reshape(tuple(t) + tuple(ns) + (-1,)).astype(transform_dtype)
    a = [at.astype(transform_dtype) for at, _, _ in matrices]
    y = np.einsum("ia,xyzabef->xyzibef", a[0], mm)
    y = np.einsum("jb,xyzibef->xyzijef", a[1], y)
    y = np.einsum("ke,xyzijef->xyzijkf", a[2], y)
    shape = tuple(ti * m for ti, m in zip(t, ms))
    return y.transpose(0, 3, 1, 4, 2, 5, 6).reshape(shape + (-1,)).astype(np.float32)


def direct(x, w):
    n = x.shape[0] - 2
    return sum(x[a:a + n, b:b + n, c:c + n] @ w[a, b, c]
               for a, b, c in itertools.product(range(3), repeat=3))


def errors(matrices, c, f, data, n=12, seed=0):
    """Relative errors: Winograd (float32 transforms), Winograd (float64), direct float32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + 2,) * 3 + (c,))
    w = rng.standard_normal((3, 3, 3, c, f))
    if data == "range":
        x *= np.exp(rng.uniform(-6, 6, x.shape))
        w *= np.exp(rng.uniform(-3, 3, w.shape))
    elif data == "offset":
        x += 10.0
    x, w = x.astype(np.float32), w.astype(np.float32)
    exact = direct(x.astype(np.float64), w.astype(np.float64))
    scale = np.abs(exact).max()
    got = [winograd(x, w, matrices, np.float32), winograd(x, w, matrices, np.float64),
           direct(x, w)]
    return [np.abs(y - exact).max() / scale for y in got]


def main():
    half = Fraction(1, 2)
    f2 = toom_cook([0, 1, -1], 2, 3)
    f4 = toom_cook([0, 1, -1, 2, -2], 4, 3)
    variants = {  # one (A^T, G, B^T) per axis (D, H, W)
        "F(2,3) (0, +-1)": [f2] * 3,
        "F(3,3) (0, +-1, 2)": [toom_cook([0, 1, -1, 2], 3, 3)] * 3,
        "F(3,3) (0, +-1, 1/2)": [toom_cook([0, 1, -1, half], 3, 3)] * 3,
        "F(4,3) (0, +-1, +-2)": [f4] * 3,
        "F(4,3) (0, +-1, +-1/2)": [toom_cook([0, 1, -1, half, -half], 4, 3)] * 3,
        "F(2,3) on D, H x F(4,3) (0, +-1, +-2) on W (the engine's)": [f2, f2, f4],
        "F(2,3) on D x F(4,3) (0, +-1, +-2) on H, W": [f2, f4, f4],
    }
    cases = [(32, 64, "normal"), (256, 16, "normal"), (32, 64, "range"), (32, 64, "offset"),
             (256, 16, "offset")]
    print("| algorithm | C | F | data | float32 transforms | float64 transforms | direct |")
    print("|---|---|---|---|---|---|---|")
    for name, matrices in variants.items():
        for c, f, data in cases:
            e32, e64, ed = errors(matrices, c, f, data)
            print(f"| {name} | {c} | {f} | {data} | {e32:.1e} | {e64:.1e} | {ed:.1e} |")


if __name__ == "__main__":
    main()
