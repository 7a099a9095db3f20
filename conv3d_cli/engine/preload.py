"""Imported by the forkserver (see :mod:`~conv3d_cli.engine.workers`), never by
the engine itself: loads numba's runtime and the compiled stencil for float32
into the server, so that the workers it forks start with them.

A process's first call of a compiled kernel costs about 0.2 s even when the
kernel comes from numba's cache (the compiler's runtime starts); each further
kernel or dtype costs a few milliseconds. Paying that here once, rather than
in every worker, is why this module exists.
"""

import numpy as np

from .stencil import correlate_stencil, numba
from .task import ZerosSource  # noqa: F401 (the worker's modules, loaded here too)


def _load_float32_stencil():
    from ..shapes import AxisTerm
    term = AxisTerm(out_start=0, out_step=1, count=1, in_start=0, in_step=1, taps=((0, 0),))
    x = np.zeros((1, 1, 1, 1, 2), np.float32)
    taps = np.zeros((1, 1, 1, 1, 2, 1), np.float32)
    out = np.empty((1, 1, 1, 1, 1), np.float32)
    correlate_stencil(x, [[term]] * 3, taps, out, bias=np.zeros(1, np.float32))


if numba is not None:
    _load_float32_stencil()
