"""Worker processes: how they start, and what each keeps between its tiles.

Start method (``CONV3D_START_METHOD`` = ``fork``, ``forkserver`` or ``spawn``
overrides it):

- Linux, no other thread running in this process: ``fork``. A forked worker
  starts at once and shares this process's memory: the loaded modules, the
  compiled kernels (:func:`~conv3d_cli.engine.task.warm_up` runs first), the
  job. This is what a ``conv3d run`` does.
- Linux, other threads running (a library caller's, a Dask client's, a
  threads executor's): ``forkserver``. Forking a process whose other threads
  may hold a lock (the allocator's, the import lock, a logging handler's)
  can leave the child waiting on it forever, which is why Python 3.12 warns
  on such a fork and 3.14 makes forkserver the default. The server process
  imports the engine once (and loads the compiled kernels of the usual
  dtypes); each worker is forked from it.
- Elsewhere (macOS, where a forked process may not use the system's
  frameworks): ``spawn``, a fresh interpreter per worker.

Whatever the start method, a worker gets its state through the pool's
initializer arguments, pickled when it is not forked: the
:class:`~conv3d_cli.engine.task.TileTask` (job, method, source, sink or None)
and its thread count. The worker keeps it, and its cache of kernel
transforms, for its life: that is the one piece of state here, and it exists
only in worker processes (each belongs to one ``execute()``), never in the
process that runs ``execute()``.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading

START_METHODS = ("fork", "forkserver", "spawn")
# Modules the forkserver imports before it forks workers (the workers then
# share them); importing the second loads the usual compiled kernels.
FORKSERVER_PRELOAD = ["conv3d_cli.engine.task", "conv3d_cli.engine.preload"]


def start_method() -> str:
    """How worker processes start here and now (see the module's docstring)."""
    asked = os.environ.get("CONV3D_START_METHOD", "").strip()
    if asked:
        if asked not in START_METHODS or asked not in multiprocessing.get_all_start_methods():
            from ..errors import ArgumentError
            available = [m for m in START_METHODS if m in multiprocessing.get_all_start_methods()]
            raise ArgumentError(f"CONV3D_START_METHOD={asked[:40]!r}: expected one of "
                                f"{', '.join(available)}")
        return asked
    if not sys.platform.startswith("linux"):
        return "spawn"
    return "fork" if threading.active_count() == 1 else "forkserver"


def pool_context(method):
    """The multiprocessing context that starts workers by ``method``."""
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Read when the server starts (once per process): harmless after.
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


class _Worker:
    """The state of this worker process (set by :func:`init_worker`)."""

    def __init__(self, task, threads):
        from threadpoolctl import threadpool_limits

        from .fft import SpectrumCache
        self.task = task
        self.limits = threadpool_limits(limits=threads)  # for the worker's life
        self.cache = SpectrumCache()


def init_worker(task, threads, parent_pid):
    """The pool's initializer, in each worker: signals, BLAS threads, the task."""
    from .. import signals
    signals.worker_defaults(parent_pid)
    global _this_worker
    _this_worker = _Worker(task, threads)


_this_worker = None  # set in worker processes only: see the module's docstring


def run_in_worker(index, tile):
    """Compute ``tile`` (the plan's tile ``index``) in this worker: ``(index,
    block or None, sums)``; the block when the parent writes it."""
    worker = _this_worker
    block, sums = worker.task(tile, worker.cache)
    return index, block, sums
