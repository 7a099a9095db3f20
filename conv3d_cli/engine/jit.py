"""numba's ``njit``, with numba imported on the first call of a compiled kernel.

Importing numba (and llvmlite) costs more CPU than NumPy and click together,
and most commands never call a kernel: ``conv3d shape`` asks the planner, which
asks each method whether it suits the job (``stencil_suits``), and ``--help``
asks nothing. The kernel modules therefore decorate with this module's
``numba.njit``: the decorated function is a :class:`LazyKernel` that creates
the real numba dispatcher (with the same options, so ``cache=True`` finds the
same cache files) on its first call or attribute access.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading

_LOCK = threading.Lock()

# Work below which a job takes the NumPy paths (im2col + GEMM) instead of a
# compiled kernel. A fresh process spends about 0.6 s of CPU importing numba
# and loading a kernel from its cache; the GEMM path costs at most about 3 ns
# per multiply-add more than the stencil (one core, one channel, measured), so
# a job of 10 million multiply-adds (a 72^3 single-channel volume and a 3^3
# kernel) loses at most 0.03 s there and never loads numba: a small `conv3d run`
# costs about what its start-up costs.
MIN_COMPILED_FLOPS = 2e7


def worth_compiling(job) -> bool:
    """Whether ``job`` does enough work for a compiled (numba) kernel to pay its loading."""
    return job.flops() >= MIN_COMPILED_FLOPS


class LazyKernel:
    """A function to compile with ``numba.njit(**options)``, on first use.

    Calling it calls the compiled dispatcher; any other attribute
    (``targetoptions``, ``signatures``, ...) is the dispatcher's. It pickles by
    reference (module and name), as a module-level function does.
    """

    def __init__(self, py_func, options):
        self.py_func = py_func
        self.options = options
        self.__module__ = py_func.__module__
        self.__name__ = py_func.__name__
        self.__qualname__ = py_func.__qualname__
        self.__doc__ = py_func.__doc__
        self._dispatcher = None

    @property
    def dispatcher(self):
        """The numba dispatcher (numba imported, nothing compiled yet)."""
        if self._dispatcher is None:
            with _LOCK:  # threads calling a kernel for the first time create it once
                if self._dispatcher is None:
                    import numba
                    self._dispatcher = numba.njit(**self.options)(self.py_func)
        return self._dispatcher

    def __call__(self, *args):
        return self.dispatcher(*args)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_dispatcher":
            raise AttributeError(name)
        return getattr(self.dispatcher, name)

    def __reduce__(self):
        return _by_name, (self.__module__, self.__qualname__)

    def __repr__(self):
        return f"<LazyKernel {self.__module__}.{self.__qualname__}>"


def _by_name(module, qualname):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _Numba:
    """The part of numba's interface the kernels use."""

    @staticmethod
    def njit(**options):
        return lambda py_func: LazyKernel(py_func, options)


# None where numba is not installed, as ``import numba`` failing would give.
numba = _Numba() if importlib.util.find_spec("numba") is not None else None
