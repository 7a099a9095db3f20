"""Float32 error of Winograd F(m, 3) in 3-D against float64 direct summation.

    python tools/winograd_error.py

Why the engine uses F(2, 3) and not F(4, 3) or F(3, 3): builds the Toom-Cook
matrices A^T, G, B^T for a point set, runs the 3-D algorithm with float32
GEMMs (transforms in float32, or float64 and rounded to float32 before the
GEMM), and prints max |error| / max |exact output| for random normal data,
with 256 channels, with a large dynamic range and with an offset, beside
direct float32 summation. The engine's tolerance is 1e-5 of that scale.
"""
import itertools

import numpy as np
from fractions import Fraction as Fr

def toom(points, m, r):
    """A^T (m x n), G (n x r), B^T (n x n) for correlation F(m, r): finite points + inf."""
    n = m + r - 1
    assert len(points) == n - 1
    pts = [Fr(p) for p in points]
    AT = np.zeros((m, n)); G = np.zeros((n, r))
    for i, a in enumerate(pts):
        for j in range(m): AT[j, i] = float(a ** j)
        Ni = 1
        for l, b in enumerate(pts):
            if l != i: Ni *= (a - b)
        for k in range(r): G[i, k] = float(a ** k / Ni)
    AT[m - 1, n - 1] = 1; G[n - 1, r - 1] = 1
    # solve for BT: sum_i AT[j,i] G[i,k] BT[i,l] = [l == j+k]
    rows, rhs = [], []
    for j in range(m):
        for k in range(r):
            for l in range(n):
                row = np.zeros((n, n))
                for i in range(n): row[i, l] = AT[j, i] * G[i, k]
                rows.append(row.ravel()); rhs.append(1.0 if l == j + k else 0.0)
    sol, res, rank, _ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    BT = sol.reshape(n, n)
    BT[np.abs(BT) < 1e-12] = 0
    chk = np.einsum('ji,ik,il->jkl', AT, G, BT)
    want = np.zeros((m, r, n))
    for j in range(m):
        for k in range(r): want[j, k, j + k] = 1
    assert np.abs(chk - want).max() < 1e-9, np.abs(chk - want).max()
    return AT, G, BT

def wino3d(x, w, AT, G, BT, dt=np.float32, tdt=np.float32):
    """valid correlation, x (D,H,W,C), w (3,3,3,C,F), F(m,3) per axis (same matrices per axis)."""
    m, n = AT.shape
    D = x.shape[0] - 2
    T = D // m
    # tiles
    idx = np.arange(T)[:, None] * m + np.arange(n)[None, :]  # (T, n)
    d = x[idx][:, :, idx][:, :, :, :, idx]  # (T,n,T,n,T,n,C)
    d = d.astype(tdt)
    B = BT.astype(tdt)
    v = np.einsum('ai,xiyjzkc->xyzajkc', B, d)
    v = np.einsum('bj,xyzajkc->xyzabkc', B, v)
    v = np.einsum('gk,xyzabkc->xyzabgc', B, v)
    v = v.astype(dt)
    u = np.einsum('ai,bj,ek,ijkcf->abecf', G, G, G, w.astype(np.float64)).astype(dt)
    M = np.einsum('xyzabgc,abgcf->xyzabgf', v, u) if dt == np.float64 else \
        np.matmul(v.reshape(T**3, n**3, -1).transpose(1, 0, 2), u.reshape(n**3, u.shape[3], -1)).transpose(1, 0, 2).reshape(T, T, T, n, n, n, -1)
    M = M.astype(tdt); A = AT.astype(tdt)
    y = np.einsum('ia,xyzabgf->xyzibgf', A, M)
    y = np.einsum('jb,xyzibgf->xyzijgf', A, y)
    y = np.einsum('kg,xyzijgf->xyzijkf', A, y)
    y = y.transpose(0, 3, 1, 4, 2, 5, 6).reshape(T * m, T * m, T * m, -1)
    return y.astype(dt)

def direct(x, w):
    D = x.shape[0] - 2
    y = 0
    for a, b, c in itertools.product(range(3), repeat=3):
        y = y + x[a:a + D, b:b + D, c:c + D] @ w[a, b, c]
    return y

def err(kind, C, F, n=12, tdt=np.float32, seed=0, scale=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n + 2,) * 3 + (C,))
    w = rng.standard_normal((3, 3, 3, C, F))
    if scale == 'range':
        x *= np.exp(rng.uniform(-6, 6, x.shape))
        w *= np.exp(rng.uniform(-3, 3, w.shape))
    if scale == 'offset':
        x += 10.0
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    ref = direct(x32.astype(np.float64), w32.astype(np.float64))
    y = wino3d(x32, w32, *kind, tdt=tdt)
    yd = direct(x32, w32)
    s = np.abs(ref).max()
    return np.abs(y - ref).max() / s, np.abs(yd - ref).max() / s

if __name__ == '__main__':
    f23 = toom([0, 1, -1], 2, 3)
    variants = {
        'F23': f23,
        'F43(0,1,-1,2,-2)': toom([0, 1, -1, 2, -2], 4, 3),
        'F43(0,1,-1,.5,-.5)': toom([0, 1, -1, Fr(1, 2), Fr(-1, 2)], 4, 3),
        'F33(0,1,-1,.5)': toom([0, 1, -1, Fr(1, 2)], 3, 3),
        'F33(0,1,-1,2)': toom([0, 1, -1, 2], 3, 3),
    }
    for name, kind in variants.items():
        print(name)
        n = 12
        for C, F, sc in [(32, 64, None), (256, 16, None), (32, 64, 'range'), (32, 64, 'offset'), (256, 16, 'offset')]:
            e, ed = err(kind, C, F, n=n, scale=sc)
            e64, _ = err(kind, C, F, n=n, scale=sc, tdt=np.float64)
            print(f'  C={C} F={F} {sc}: wino {e:.2e} (f64 transforms {e64:.2e}) direct {ed:.2e}')
