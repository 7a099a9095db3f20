"""FFT lengths, for planning without importing SciPy."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def next_fast_len(n):
    """The smallest 2-3-5-smooth length >= ``n``: ``scipy.fft.next_fast_len(n,
    real=True)``, without importing SciPy to plan."""
    best, p5 = 2 * max(n, 1), 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:  # the smallest power of two times p35 that reaches n
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best
