"""Float32 error of Winograd F(m, 3) in 3-D against exact (float64) summation.

    python tools/winograd_error.py

Why the engine uses F(2, 3) and not F(4, 3) or F(3, 3): for each point set
this builds the Toom-Cook matrices A^T, G, B^T, runs the 3-D algorithm with
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


def winograd(x, w, at, g, bt, transform_dtype):
    """Valid 3-D correlation of x (D, D, D, C) by w (3, 3, 3, C, F), float32 GEMMs."""
    m, n = at.shape
    t = (x.shape[0] - 2) // m
    idx = np.arange(t)[:, None] * m + np.arange(n)
    d = x[idx][:, :, idx][:, :, :, :, idx].astype(transform_dtype)  # (t, n, t, n, t, n, C)
    b = bt.astype(transform_dtype)
    v = np.einsum("ai,xiyjzkc->xyzajkc", b, d)
    v = np.einsum("bj,xyzajkc->xyzabkc", b, v)
    v = np.einsum("ek,xyzabkc->xyzabec", b, v).astype(np.float32)
    u = np.einsum("ai,bj,ek,ijkcf->abecf", g, g, g, w.astype(np.float64)).astype(np.float32)
    prod = np.matmul(v.reshape(t ** 3, n ** 3, -1).transpose(1, 0, 2),
                     u.reshape(n ** 3, w.shape[3], -1))
    mm = prod.transpose(1, 0, 2).reshape((t,) * 3 + (n,) * 3 + (-1,)).astype(transform_dtype)
    a = at.astype(transform_dtype)
    y = np.einsum("ia,xyzabef->xyzibef", a, mm)
    y = np.einsum("jb,xyzibef->xyzijef", a, y)
    y = np.einsum("ke,xyzijef->xyzijkf", a, y)
    return y.transpose(0, 3, 1, 4, 2, 5, 6).reshape((t * m,) * 3 + (-1,)).astype(np.float32)


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
    got = [winograd(x, w, *matrices, np.float32), winograd(x, w, *matrices, np.float64),
           direct(x, w)]
    return [np.abs(y - exact).max() / scale for y in got]


def main():
    half = Fraction(1, 2)
    variants = {
        "F(2,3) (0, +-1)": toom_cook([0, 1, -1], 2, 3),
        "F(3,3) (0, +-1, 2)": toom_cook([0, 1, -1, 2], 3, 3),
        "F(3,3) (0, +-1, 1/2)": toom_cook([0, 1, -1, half], 3, 3),
        "F(4,3) (0, +-1, +-2)": toom_cook([0, 1, -1, 2, -2], 4, 3),
        "F(4,3) (0, +-1, +-1/2)": toom_cook([0, 1, -1, half, -half], 4, 3),
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
