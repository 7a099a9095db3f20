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

The 3-D transform of a term combination runs as its per-axis passes, in
three stages, each shared out among the tile's threads without overlap
(:func:`_correlate_combo`): ``rfft2`` over (H, W) of each input plane; per
run of H frequencies the FFT along D, the product with the kernel spectra
and the inverse FFT along D, while that run is in cache; ``irfft2`` of each
output plane that is kept, cropped into the output. The threads wait for each
other between stages only. Against one ``rfftn`` / ``irfftn`` of the whole
tile this transforms only the D planes of output that are kept, and keeps
each stage's block in L2; against cutting the tile into one part per thread,
it transforms no overlap twice.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
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

    def get(self, taps_w, terms, fshape, dtype, workers=1, pool=None):
        """The kernel spectra of the term combination ``terms`` over ``fshape``:
        (N, G, Cg, Fg), N over (f0, f1, f2 // 2 + 1). ``pool`` (with ``workers``
        threads in all) shares the transform along D; without one, ``workers``
        are the FFTs' own threads."""
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
        # Taps combine axis by axis: tap (j0, j1, j2) sits at offsets (o0, o1, o2).
        at = [np.array([o - lo for _, o in t.taps], np.intp) for t, (lo, _) in zip(terms, spans)]
        taps = [np.array([j for j, _ in t.taps], np.intp) for t in terms]
        dense[np.ix_(*at)] = taps_w[np.ix_(*taps)]
        dense = dense[::-1, ::-1, ::-1]
        # rfftn(dense, s=fshape) one axis at a time, so each transform runs only
        # over the kernel's nonzero extent of the axes not yet transformed
        # (the padded kernel is mostly zeros): about a third of the work. The
        # last (along D, over every (H, W) frequency) is most of it: with a
        # pool, the threads share it by runs of H frequencies.
        threads = 1 if pool is not None else workers
        part = sfft.rfft(dense, n=fshape[2], axis=2, workers=threads)
        part = sfft.fft(part, n=fshape[1], axis=1, workers=threads)
        spec = np.empty((fshape[0],) + part.shape[1:], part.dtype)

        def along_d(runs):
            for h0, h1 in runs:
                spec[:, h0:h1] = sfft.fft(part[:, h0:h1], n=fshape[0], axis=0, workers=threads)

        per_row = fshape[0] * part.shape[2] * g * cg * fg * part.itemsize
        runs = _blocks(fshape[1], max(1, BLOCK_BYTES // per_row))
        if pool is None:
            along_d(runs)
        else:
            _in_threads(pool, [lambda share=share: along_d(share)
                               for share in _shares(runs, workers)])
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


# Bytes of complex values one thread transforms at a time: a block of planes
# (stage 1, 3) or of H frequencies (stage 2) stays in L2 between its
# transform, its product and its copy.
BLOCK_BYTES = 1 << 19


# Values (complex, over the FFT shapes of the term combinations, input and
# output channels) below which a tile runs on one thread: the threads' start
# and the waits between stages cost about 0.2 ms, more than a 64^3 tile of one
# channel gains from them (96^3: 1.6x faster on two threads).
MIN_THREADED_VALUES = 1 << 20


def _transform_values(x, terms, taps_w):
    g, cg, fg = taps_w.shape[3:]
    n = sum(math.prod(_fft_shape(combo)) for combo in product(*terms))
    return x.shape[0] * n * g * (cg + fg)


def correlate_fft(x, terms, taps_w, out, cache=None, workers=1, bias=None):
    """Accumulate the tile into ``out`` (B, Do, Ho, Wo, F) from ``x`` (B, Di, Hi, Wi, C).

    With ``bias`` (one term per axis covering the tile), ``out`` is set to
    bias + result instead, saving a pass over it. ``workers`` threads share
    each stage (see the module's notes).
    """
    cache = cache or SpectrumCache()
    if workers <= 1 or _transform_values(x, terms, taps_w) < MIN_THREADED_VALUES:
        return _correlate(x, terms, taps_w, out, cache, None, 1, bias)
    with ThreadPoolExecutor(workers - 1) as pool:
        return _correlate(x, terms, taps_w, out, cache, pool, workers, bias)


def _correlate(x, terms, taps_w, out, cache, pool, workers, bias):
    for combo in product(*terms):
        spec = cache.get(taps_w, combo, _fft_shape(combo), x.dtype, workers, pool)
        _correlate_combo(x, combo, spec, out, pool, workers, bias)
    return out


def _in_threads(pool, jobs):
    """Run the callables ``jobs`` at once, one per thread (this thread runs the
    first, ``pool`` the others), and wait for all of them."""
    futures = [pool.submit(job) for job in jobs[1:]]
    try:
        jobs[0]()
    finally:
        for f in futures:
            f.result()


def _shares(items, parts):
    """``items`` in at most ``parts`` contiguous runs of nearly equal length."""
    per = max(1, -(-len(items) // max(parts, 1)))
    return [items[a:a + per] for a in range(0, len(items), per)] or [[]]


def _blocks(n, size):
    """``range(n)`` in runs ``(start, stop)`` of at most ``size``."""
    return [(a, min(n, a + size)) for a in range(0, n, max(size, 1))]


def _correlate_combo(x, combo, spec, out, pool, workers, bias):
    """One term combination (one term per axis) of the tile, by the three stages
    of the module's notes on ``workers`` threads.

    With ``fshape = (f0, f1, f2)``: stage 1 sets ``xs[b, d] = rfft2(src[b, d])``
    (zero planes for ``d`` past the input); stage 2 sets, per run of H
    frequencies, ``ys = ifft_D(fft_D(xs) @ spec)`` (a ``C/G x F/G`` matrix
    product per frequency and group, or one multiply for one channel);
    stage 3 sets ``out = irfft2(ys[b, d])`` over the kept outputs. The
    inverse along D (1/f0) and ``irfft2`` (1/(f1 f2)) give irfftn's
    normalisation 1/(f0 f1 f2).
    """
    from scipy import fft as sfft
    nb = x.shape[0]
    g, cg, fg = spec.shape[1:]
    one = g == cg == fg == 1
    ext = [_term_extent(t) for t in combo]
    f0, f1, f2 = _fft_shape(combo)
    f2c = f2 // 2 + 1
    src = x[(slice(None),) + tuple(
        slice(t.in_start + lo, t.in_start + lo + L) for t, (lo, _, L) in zip(combo, ext))]
    cdt = np.result_type(x.dtype, np.complex64)
    xs = np.empty((nb, f0, f1, f2c, g * cg), cdt)
    ys = xs if one else np.empty((nb, f0, f1, f2c, g * fg), cdt)
    plane = f1 * f2c * max(g * cg, g * fg) * xs.itemsize
    run = (lambda jobs: _in_threads(pool, jobs)) if pool is not None else \
        (lambda jobs: [job() for job in jobs])

    def forward(items):
        for b, (d0, d1) in items:
            filled = min(d1, src.shape[1])
            if filled > d0:
                xs[b, d0:filled] = sfft.rfft2(src[b, d0:filled], s=(f1, f2), axes=(1, 2))
            xs[b, max(d0, filled):d1] = 0

    items = [(b, r) for b in range(nb) for r in _blocks(f0, max(1, BLOCK_BYTES // plane))]
    run([lambda share=share: forward(share) for share in _shares(items, workers)])

    spec = spec.reshape(f0, f1, f2c, g, cg, fg)

    def mix(runs):
        for h0, h1 in runs:
            blk = sfft.fft(xs[:, :, h0:h1], axis=1)  # (B, f0, h, f2c, C), a new array
            if one:
                blk *= spec[:, h0:h1, :, 0, 0]
            else:
                # (B, n, G, Cg) -> (n, G, B, Cg) @ (n, G, Cg, Fg) -> (n, G, B, Fg)
                n = f0 * (h1 - h0) * f2c
                ym = np.matmul(blk.reshape(nb, n, g, cg).transpose(1, 2, 0, 3),
                               spec[:, h0:h1].reshape(n, g, cg, fg))
                blk = ym.transpose(2, 0, 1, 3).reshape(blk.shape[:4] + (g * fg,))
            ys[:, :, h0:h1] = sfft.ifft(blk, axis=1, overwrite_x=True)

    rows = max(1, BLOCK_BYTES // (nb * f0 * plane // f1))
    runs = _blocks(f1, rows)
    run([lambda share=share: mix(share) for share in _shares(runs, workers)])

    sel = [slice(span - 1, span - 1 + (t.count - 1) * t.in_step + 1, t.in_step)
           for t, (_, span, _) in zip(combo, ext)]
    dst = [slice(t.out_start, t.out_start + (t.count - 1) * t.out_step + 1, t.out_step)
           for t in combo]
    kept = list(zip(range(f0)[sel[0]], range(out.shape[1])[dst[0]]))

    def inverse(items):
        for b, (d, o) in items:
            y = sfft.irfft2(ys[b, d], s=(f1, f2), axes=(0, 1))[sel[1], sel[2]]
            if bias is not None:
                np.add(y, bias, out=out[b, o, dst[1], dst[2]], casting="unsafe")
            else:
                out[b, o, dst[1], dst[2]] += y.astype(out.dtype, copy=False)

    items = [(b, k) for b in range(nb) for k in kept]
    run([lambda share=share: inverse(share) for share in _shares(items, workers)])
    return out
