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

With several threads a tile is cut into independent parts, one per thread,
each computed with single-threaded FFTs (a tile on pocketfft's own threads
gave 1.4-1.6x on two cores; each of two parts costs half the whole's CPU
time): along the batch when it divides evenly, else along the first spatial
axis when the overlap this costs (``span - step`` input rows per cut) is
small, else one part with threaded FFTs.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import product

import numpy as np

from .fftsize import next_fast_len

# scipy.fft is imported in the functions that transform: importing it costs more
# than the rest of a small run, which may never take the FFT path.


def tile_scratch_bytes(job, nb, shape) -> int:
    """Peak scratch bytes of one tile of output ``shape`` (``nb`` batch elements).

    Over the FFT shape of the tile's input extent: the input and output
    spectra and the inverse transform (complex = 2 reals), and the kernel
    spectra (C x F / G per frequency, half the frequencies); a transposed
    layer holds one set per output phase (counted as two).
    """
    isz = job.work_dtype.itemsize
    per = math.prod(next_fast_len(e) for e in job.input_extent(shape))
    scratch = nb * per * (job.in_channels + 2 * job.filters) * isz * 2
    scratch += per * job.in_channels * job.filters // job.groups * isz
    if job.kind != "conv":
        scratch *= 2
    return scratch


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
        from scipy import fft as sfft
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


def _fft_shape(combo):
    from scipy import fft as sfft
    return tuple(sfft.next_fast_len(L, real=True) for _, _, L in map(_term_extent, combo))


# Cutting the first axis pays while the parts' FFT lengths add up to at most
# this much of the whole's: two threads on one FFT reach about 1.45x, so up to
# 2 / 1.45 = 1.38x more FFT work would still pay; 1.25 keeps a margin.
MAX_SPLIT_GROWTH = 1.25


def _split_axis0(terms, parts):
    """``terms`` with axis 0's terms cut into ``parts`` runs of outputs, or None
    when the overlap makes the parts' FFTs too much longer than the whole's."""
    from scipy import fft as sfft
    pieces = []
    for p in range(parts):
        axis0 = []
        for t in terms[0]:
            per = -(-t.count // parts)
            q0, q1 = p * per, min(t.count, (p + 1) * per)
            if q1 > q0:
                axis0.append(replace(t, count=q1 - q0, in_start=t.in_start + q0 * t.in_step,
                                     out_start=t.out_start + q0 * t.out_step))
        if axis0:
            pieces.append([axis0] + list(terms[1:]))
    whole = sum(sfft.next_fast_len(_term_extent(t)[2], real=True) for t in terms[0])
    cut = sum(sfft.next_fast_len(_term_extent(t)[2], real=True) for pc in pieces for t in pc[0])
    return pieces if len(pieces) > 1 and cut <= MAX_SPLIT_GROWTH * whole else None


def correlate_fft(x, terms, taps_w, out, cache=None, workers=1, bias=None):
    """Accumulate the tile into ``out`` (B, Do, Ho, Wo, F) from ``x`` (B, Di, Hi, Wi, C).

    With ``bias`` (one term per axis covering the tile), ``out`` is set to
    bias + result instead, saving a pass over it. ``workers`` threads share
    the tile (see the module's notes).
    """
    cache = cache or SpectrumCache()
    nb = x.shape[0]
    if workers > 1 and nb % workers == 0:
        per = nb // workers
        parts = [(slice(b, b + per), terms) for b in range(0, nb, per)]
    elif workers > 1 and (pieces := _split_axis0(terms, workers)) is not None:
        parts = [(slice(None), pc) for pc in pieces]
    else:
        return _correlate(x, terms, taps_w, out, cache, workers, bias)
    # The kernel spectra once, before the parts look them up.
    for _, pc in parts:
        for combo in product(*pc):
            cache.get(taps_w, combo, _fft_shape(combo), x.dtype, workers)

    def part(i):
        b, pc = parts[i]
        _correlate(x[b], pc, taps_w, out[b], cache, 1, bias)

    with ThreadPoolExecutor(len(parts) - 1) as pool:
        futures = [pool.submit(part, i) for i in range(1, len(parts))]
        part(0)
        for f in futures:
            f.result()
    return out


def _correlate(x, terms, taps_w, out, cache, workers, bias):
    from scipy import fft as sfft
    nb = x.shape[0]
    g, cg, fg = taps_w.shape[3:]
    for combo in product(*terms):
        ext = [_term_extent(t) for t in combo]
        fshape = _fft_shape(combo)
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
