"""Compiled stencil for few channels (numba); see :mod:`conv3d_cli.engine.direct`."""


def stencil_suits(job) -> bool:
    return False


def correlate_stencil(x, terms, taps_w, out):
    raise NotImplementedError
