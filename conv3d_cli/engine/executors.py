"""Executors: who computes a plan's tiles, behind one interface.

Each executor has ``workers`` (tiles computed at once) and
``run(indices, on_done)``: compute the plan's tiles ``indices``, each into the
sink, calling ``on_done(index, sums)`` in this thread once a tile is written
(its activity sums, or None). Every one runs the same tile task
(:class:`~conv3d_cli.engine.task.TileTask`):

- :class:`Serial`: one tile after another in this thread;
- :class:`Threads`: tiles in threads of this process (in-memory arrays: the
  kernels release the GIL, and nothing is copied or pickled);
- :class:`ProcessPool`: worker processes (see :mod:`~conv3d_cli.engine.workers`)
  that read their input and, when the sink allows several writers, write
  their blocks themselves; otherwise the blocks come back to be written here;
- :class:`~conv3d_cli.engine.distributed.Dask`: the tiles on a Dask cluster.

Each tile gets ``plan.threads`` BLAS/FFT threads, so the threads of the tiles
computed at once never exceed the workers asked for.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import threading
import time
from concurrent.futures import (
    FIRST_COMPLETED,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
    wait,
)
from concurrent.futures.process import BrokenProcessPool

from .. import signals
from ..errors import ArgumentError, EngineError
from .fft import SpectrumCache
from .task import TileTask, warm_up, write_block
from .workers import init_worker, pool_context, run_in_worker, start_method

# Tasks submitted to the process pool per worker at a time (one running, one
# queued so a worker never waits for the parent).
IN_FLIGHT = 2


def parallel_writes(sink) -> bool:
    """Whether several processes may write regions of ``sink`` at once."""
    return getattr(sink, "parallel_writes", True)


def make_executor(job, plan, source, sink, tiles, want_sums=False, executor="processes",
                  scheduler=None):
    """The executor for ``tiles`` tiles of ``plan`` (see the module's docstring):
    Dask when a ``scheduler`` is given, else serial for one worker, else
    ``executor`` (``"threads"`` or ``"processes"``)."""
    task = TileTask(job, plan.method, source, sink, plan.threads, want_sums)
    if scheduler is not None:
        from .distributed import Dask
        return Dask(scheduler, task, plan)
    workers = min(plan.workers, max(tiles, 1))
    if workers <= 1:
        return Serial(task, plan)
    if executor == "threads":
        return Threads(task, plan, workers)
    return ProcessPool(task, plan, workers)


class Serial:
    def __init__(self, task, plan):
        self.task, self.plan, self.workers = task, plan, 1

    def run(self, indices, on_done):
        cache = SpectrumCache()
        with blas_threads(self.task.threads):
            for index in indices:
                _, sums = self.task(self.plan.tiles[index], cache)
                on_done(index, sums)


class Threads:
    def __init__(self, task, plan, workers):
        self.task, self.plan, self.workers = task, plan, workers

    def run(self, indices, on_done):
        cache = SpectrumCache()  # shared: it has its own lock
        with blas_threads(self.task.threads), ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(self.task, self.plan.tiles[i], cache): i for i in indices}
            try:
                for fut in as_completed(futures):
                    on_done(futures[fut], fut.result()[1])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


class ProcessPool:
    """Tiles in worker processes, at most ``IN_FLIGHT`` per worker at a time.

    A finished block that comes back (the sink takes one writer) is written
    and dropped at once, so blocks never pile up here. An interruption or a
    failure stops the workers at once (:func:`stop_pool`); a worker that dies
    (killed, out of memory) ends the run with one :class:`EngineError`.
    """

    def __init__(self, task, plan, workers):
        self.plan, self.workers = plan, workers
        self.sink = task.sink
        # Workers get the sink only if they may write it themselves.
        self.task = task if parallel_writes(task.sink) else \
            TileTask(task.job, task.method, task.source, None, task.threads, task.want_sums)

    def run(self, indices, on_done):
        method = start_method()
        if method != "fork":
            _check_sendable(self.task, method)
        context = pool_context(method)
        warm_up(self.task.job, self.task.method)  # compiled kernels, before any worker starts
        try:
            pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=init_worker,
                                       initargs=(self.task, self.task.threads, os.getpid()))
            try:
                self._feed(pool, indices, on_done)
            except BaseException:
                with signals.shielded():
                    stop_pool(pool)
                raise
            pool.shutdown(wait=True)
        except BrokenProcessPool:
            raise EngineError(
                "a worker process died (killed, or out of memory). "
                "Try fewer --workers or a lower --memory-limit.") from None

    def _feed(self, pool, indices, on_done):
        todo = iter(indices)
        pending = set()
        while True:
            # A submit may start a worker: it runs to its end before a signal is
            # raised (a worker started but not yet counted would be left running).
            with signals.blocked(), signals.shielded():
                for index in itertools.islice(todo, IN_FLIGHT * self.workers - len(pending)):
                    pending.add(pool.submit(run_in_worker, index, self.plan.tiles[index]))
            if not pending:
                return
            ready, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in ready:
                index, block, sums = fut.result()
                if block is not None:
                    write_block(self.task.job, self.sink, self.plan.tiles[index], block)
                del block
                on_done(index, sums)
            del ready, fut


def _check_sendable(task, method):
    """Refuse a task that workers not forked from this process cannot receive
    (they get it pickled: a lambda or a local function does not pickle)."""
    try:
        pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ArgumentError(
            f"this job cannot be sent to worker processes started by {method} ({exc}). "
            "Give the layer module-level functions (not lambdas or local functions), "
            "or run with --workers 1.") from None


def stop_pool(pool, grace=2.0):
    """Stop ``pool`` now: drop the queued tiles, terminate the workers, reap them.

    ``shutdown(wait=True)`` would wait for the running tiles (minutes for
    large ones) and so would the interpreter at exit; an interrupted or failed
    run must not. Workers get SIGTERM, then SIGKILL after ``grace`` seconds.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    _wait_exited(processes, grace)
    for p in processes:
        if p.exitcode is None:
            p.kill()
    _wait_exited(processes, grace)
    for p in processes:  # reap (the pool's manager thread may have done it)
        p.join(0)
    # Let the pool's manager thread finish closing its wake-up pipe now: at exit,
    # concurrent.futures wakes every manager thread still registered, and on
    # Python 3.11 a pipe closed meanwhile raised "Bad file descriptor" there
    # (printed under the one-line error).
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None:
        manager.join(grace)


def _wait_exited(processes, timeout):
    """Reap the ``processes`` that end within ``timeout`` seconds."""
    from multiprocessing.connection import wait as wait_for
    deadline = time.monotonic() + timeout
    pending = {p.sentinel: p for p in processes}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for sentinel in wait_for(list(pending), left):
            # The sentinel is ready once the process has closed its files, a
            # moment before it can be reaped: join waits for that moment
            # (join(0) could miss it and leave the process unreaped).
            pending.pop(sentinel).join(max(left, 0.1))


class _BlasThreads:
    """BLAS thread limits of this process, shared by the runs in it.

    The limit is a setting of the BLAS library, one per process: runs in two
    threads at once must not restore each other's. The first run in sets the
    limit (each further one sets its own), the last one out restores what the
    process had before.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._original = None

    @contextlib.contextmanager
    def limit(self, threads):
        from threadpoolctl import threadpool_limits
        with self._lock:
            limiter = threadpool_limits(limits=threads)
            if self._users == 0:
                self._original = limiter
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._original.restore_original_limits()
                    self._original = None


blas_threads = _BlasThreads().limit
