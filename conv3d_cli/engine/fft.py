"""FFT computation of one tile (overlap-save).

For each polyphase term combination (see :mod:`conv3d_cli.engine.direct`)
the taps are laid out as a dense kernel of extent ``span`` per axis (dilation
leaves zeros between taps). Keras correlates, so the kernel is flipped and the
correlation is the "valid" part of a linear convolution:

    y[q] = sum_m x[q + m] k[m] = (x * flip(k))[q + span - 1].

Only that valid part is kept, so the FFT length need only cover the input
extent ``L = (count - 1) * step + span`` (circular wrap-around falls into the
discarded first ``span - 1`` samples): this is overlap-save, with sizes from
``scipy.fft.next_fast_len``. Channels are mixed by a matrix product per
frequency, group by group. Kernel spectra are computed once per tile shape
and cached for the job.
"""

from __future__ import annotations

import threading
from itertools import product

import numpy as np
from scipy import fft as sfft


def _term_extent(term):
    offs = [o for _, o in term.taps]
    lo = min(offs)
    span = max(offs) - lo + 1
    return lo, span, (term.count - 1) * term.in_step + span


class SpectrumCache:
    """Kernel spectra by (taps, FFT shape); one per job and process."""

    def __init__(self, max_bytes=256 << 20):
        self._store = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.max_bytes = max_bytes

    def get_or(self, key, make):
        """A cached value by key, made by ``make()`` on a miss (any kernel transform)."""
        with self._lock:
            hit = self._store.get(key)
        if hit is None:
            hit = make()
            with self._lock:
                self._store[key] = hit
                self._bytes += hit.nbytes
        return hit

    def get(self, taps_w, terms, fshape, dtype, workers=1):
        key = (tuple(t.taps for t in terms), fshape)
        with self._lock:
            hit = self._store.get(key)
        if hit is not None:
            return hit
        spans = []
        for t in terms:
            lo, span, _ = _term_extent(t)
            spans.append((lo, span))
        g, cg, fg = taps_w.shape[3:]
        dense = np.zeros(tuple(s for _, s in spans) + (g, cg, fg), dtype)
        for (j0, o0), (j1, o1), (j2, o2) in product(*(t.taps for t in terms)):
            dense[o0 - spans[0][0], o1 - spans[1][0], o2 - spans[2][0]] = taps_w[j0, j1, j2]
        dense = dense[::-1, ::-1, ::-1]
        # rfftn(dense, s=fshape) one axis at a time, so each transform runs only
        # over the kernel's nonzero extent of the axes not yet transformed
        # (the padded kernel is mostly zeros): about a third of the work.
        spec = sfft.rfft(dense, n=fshape[2], axis=2, workers=workers)
        spec = sfft.fft(spec, n=fshape[1], axis=1, workers=workers)
        spec = sfft.fft(spec, n=fshape[0], axis=0, workers=workers)
        # (f0, f1, f2, G, Cg, Fg) -> (N, G, Cg, Fg) for per-frequency matmul
        spec = np.ascontiguousarray(spec.reshape(-1, g, cg, fg))
        with self._lock:
            if self._bytes + spec.nbytes > self.max_bytes:
                self._store.clear()
                self._bytes = 0
            self._store[key] = spec
            self._bytes += spec.nbytes
        return spec


def correlate_fft(x, terms, taps_w, out, cache=None, workers=1, bias=None):
    """Accumulate the tile into ``out`` (B, Do, Ho, Wo, F) from ``x`` (B, Di, Hi, Wi, C).

    With ``bias`` (one term per axis covering the tile), ``out`` is set to
    bias + result instead, saving a pass over it.
    """
    cache = cache or SpectrumCache()
    nb = x.shape[0]
    g, cg, fg = taps_w.shape[3:]
    for combo in product(*terms):
        ext = [_term_extent(t) for t in combo]
        fshape = tuple(sfft.next_fast_len(L, real=True) for _, _, L in ext)
        spec = cache.get(taps_w, combo, fshape, x.dtype, workers)
        src = x[(slice(None),) + tuple(
            slice(t.in_start + lo, t.in_start + lo + L) for t, (lo, _, L) in zip(combo, ext))]
        xs = sfft.rfftn(src, s=fshape, axes=(1, 2, 3), workers=workers)
        fshape_c = xs.shape[1:4]
        n = int(np.prod(fshape_c))
        if g == 1 and cg == 1 and fg == 1:
            xs *= spec.reshape(fshape_c + (1,))
            ys = xs
        else:
            # (B, N, G, Cg) -> (N, G, B, Cg) @ (N, G, Cg, Fg) -> (N, G, B, Fg)
            xm = xs.reshape(nb, n, g, cg).transpose(1, 2, 0, 3)
            ym = np.matmul(xm, spec)
            ys = ym.transpose(2, 0, 1, 3).reshape((nb,) + fshape_c + (g * fg,))
        y = sfft.irfftn(ys, s=fshape, axes=(1, 2, 3), workers=workers)
        sel = (slice(None),) + tuple(
            slice(span - 1, span - 1 + (t.count - 1) * t.in_step + 1, t.in_step)
            for t, (_, span, _) in zip(combo, ext))
        dst = (slice(None),) + tuple(
            slice(t.out_start, t.out_start + (t.count - 1) * t.out_step + 1, t.out_step)
            for t in combo)
        if bias is not None:
            np.add(y[sel], bias, out=out[dst], casting="unsafe")
        else:
            out[dst] += y[sel].astype(out.dtype, copy=False)
    return out
