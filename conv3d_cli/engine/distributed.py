"""The engine's tiles on a Dask cluster (``--scheduler ADDRESS`` or ``local``).

Each Dask task runs the engine's tile task
(:class:`~conv3d_cli.engine.task.TileTask`) on a run of consecutive tiles:
each tile reads its input region from shared storage, is computed, and is
written straight into the output (a Zarr store chunked like the tiles, so no
two tasks touch a chunk and no lock is needed). The task (job, weights,
source, sink) and the plan's tiles (one integer array) go to every worker
once, where the volumes are opened once; each Dask task carries only the
range of tile indices it computes, and a bounded number of them are
submitted at a time, so the client's memory does not grow with the number of
tiles. Only the small results (activity sums) come back; no volume passes
the client. Lost workers' tasks are recomputed by Dask (``retries``).

Small tiles are grouped (:func:`task_batches`): a Dask task costs a few
milliseconds of scheduling and two network round trips, as much as computing
a small tile, so a task holds enough tiles to dwarf that, while every cluster
thread still gets several tasks to balance the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os

import numpy as np

from ..errors import ArgumentError, Conv3DError, EngineError

# Seconds to wait for a scheduler to answer (CONV3D_SCHEDULER_TIMEOUT changes it).
DEFAULT_TIMEOUT = 30.0


def require_distributed():
    try:
        import distributed
    except ImportError:
        raise ArgumentError(
            "--scheduler needs dask.distributed: pip install \"dask[distributed]\" zarr (or "
            "pip install \".[distributed]\" in the conv3d clone)") from None
    return distributed


def scheduler_timeout() -> float:
    text = os.environ.get("CONV3D_SCHEDULER_TIMEOUT")
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise ArgumentError(f"CONV3D_SCHEDULER_TIMEOUT={text[:40]!r}: expected a number of "
                            "seconds greater than 0")
    return value


def check_address(scheduler):
    """Refuse what is not a scheduler address (tcp://HOST:PORT, HOST:PORT, tls://...)."""
    from distributed.comm.addressing import parse_address, parse_host_port
    shown = f"--scheduler {scheduler!r}"
    if not isinstance(scheduler, str) or not scheduler.strip() or \
            any(c.isspace() for c in scheduler):
        raise ArgumentError(f"{shown}: not a scheduler address; expected tcp://HOST:PORT "
                            "(e.g. tcp://10.0.0.5:8786) or 'local'")
    try:
        scheme, location = parse_address(scheduler)
        if scheme in ("tcp", "tls", "ws", "wss"):
            parse_host_port(location)
    except (ValueError, TypeError) as exc:
        raise ArgumentError(f"{shown}: not a scheduler address ({exc}); expected "
                            "tcp://HOST:PORT (e.g. tcp://10.0.0.5:8786) or 'local'") from None


def _probe(address, timeout):
    """Ask the scheduler who it is, within ``timeout`` seconds in all.

    A Client waits without end for an address that accepts connections and
    never answers (any TCP service that is not a scheduler, a hung one); this
    bounds the first exchange."""
    from distributed.comm import connect

    async def identity():
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    async def bounded():
        return await asyncio.wait_for(identity(), timeout)

    try:
        reply = asyncio.run(bounded())
    except (asyncio.TimeoutError, TimeoutError):
        raise EngineError(f"--scheduler {address}: no answer within {timeout:g} s (is a Dask "
                          "scheduler listening there? CONV3D_SCHEDULER_TIMEOUT sets the wait)"
                          ) from None
    except Exception as exc:  # refused, unreachable, not the Dask protocol
        raise EngineError(f"--scheduler {address}: cannot connect ({_reason(exc)})") from None
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        raise EngineError(f"--scheduler {address}: what answers there is not a Dask scheduler")


def _reason(exc):
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _debugging():
    return os.environ.get("CONV3D_DEBUG") == "1" or \
        logging.getLogger("conv3d").isEnabledFor(logging.DEBUG)


@contextlib.contextmanager
def _quiet_logs():
    """Dask logs reconnection attempts, lost workers and whole tracebacks on
    stderr; the tool reports one line instead. CONV3D_DEBUG=1 (conv3d --debug)
    keeps them."""
    if _debugging():
        yield
        return
    loggers = [logging.getLogger(n) for n in ("distributed", "tornado", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def tile_task(task, plan, index):
    """Tile ``index`` of ``plan`` by ``task`` on a Dask worker: ``(index, sums)``."""
    return tiles_task(task, plan.tiles, (index,))[0]


def tiles_task(task, tiles, indices):
    """Tiles ``indices`` of ``tiles`` (a plan's, or its :class:`TileTable`) by ``task``
    on a Dask worker, one after another: ``[(index, sums), ...]``."""
    from .fft import SpectrumCache
    cache = SpectrumCache()
    return [(index, task(tiles[index], cache)[1]) for index in indices]


class TileTable:
    """A plan's tiles as one integer array, what the workers get: a row per tile
    (``b0, b1`` and the output box's six bounds). It is sent as one buffer of
    32 bytes a tile (int32 when every bound fits, as for any volume of fewer
    than 2^31 voxels along each axis), where the tuple of tiles pickles object
    by object through a memo of every one of them (tens of MiB on the client
    for 65,536 tiles)."""

    def __init__(self, tiles, largest):
        from itertools import chain
        values = chain.from_iterable((t.b0, t.b1, *chain.from_iterable(t.out)) for t in tiles)
        dtype = np.int32 if largest < np.iinfo(np.int32).max else np.int64
        self.rows = np.fromiter(values, dtype, count=8 * len(tiles)).reshape(len(tiles), 8)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        from .plan import Tile
        b0, b1, d0, d1, h0, h1, w0, w1 = self.rows[index].tolist()
        return Tile(b0, b1, ((d0, d1), (h0, h1), (w0, w1)))


class Dask:
    """The tiles on a Dask cluster (the executor interface of
    :mod:`~conv3d_cli.engine.executors`); ``workers`` is known once it ran."""

    def __init__(self, scheduler, task, plan):
        self.scheduler, self.task, self.plan = scheduler, task, plan
        self.workers = plan.workers

    def run(self, indices, on_done):
        distributed = require_distributed()
        from .executors import parallel_writes
        if not parallel_writes(self.task.sink):
            raise ArgumentError("--scheduler writes from many workers: use a Zarr OUTPUT "
                                "(store.zarr), .npy or .nii, not HDF5")
        if self.scheduler != "local":
            check_address(self.scheduler)
        timeout = scheduler_timeout()
        with _quiet_logs():
            try:
                with _client(distributed, self.scheduler, timeout, self.plan.workers) as client:
                    self.workers = _run(distributed, client, self.task, self.plan, indices,
                                        on_done, self.plan.workers)
            except (Conv3DError, KeyboardInterrupt):
                raise
            except Exception as exc:  # the cluster's own failures: lost workers, closed comms
                raise EngineError(f"--scheduler {self.scheduler}: the cluster failed "
                                  f"({_reason(exc)}); no output was written") from None


@contextlib.contextmanager
def _client(distributed, scheduler, timeout, workers):
    """A client of the cluster at ``scheduler`` (a new local one for ``"local"``)."""
    cluster = None
    try:
        if scheduler == "local":
            # Its worker processes log a failed task's traceback on this stderr.
            # The scheduler's HTTP routes listen even without a dashboard: on a
            # free loopback port, not 8787, which another cluster may hold.
            quiet = logging.WARNING if _debugging() else logging.CRITICAL + 1
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                               processes=True, dashboard_address=None,
                                               silence_logs=quiet,
                                               scheduler_kwargs={
                                                   "dashboard_address": "127.0.0.1:0"})
            client = distributed.Client(cluster)
        else:
            _probe(scheduler, timeout)
            client = distributed.Client(scheduler, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise EngineError(f"--scheduler {scheduler}: cannot connect ({_reason(exc)})") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# Dask tasks submitted per worker thread of the cluster at a time: enough to
# keep every thread busy while results travel back, few enough that the client
# holds a handful of futures however many tiles the plan has.
IN_FLIGHT = 2
# Tiles are grouped until a task moves about this many values (input and
# output voxels times channels: 8 MiB of float32), where the tile's own work
# outweighs the task's scheduling; ...
TASK_VALUES = 1 << 21
# ... but every cluster thread gets at least this many tasks (the last ones
# to finish then keep a thread busy for at most 1/8 of its share), and no task
# holds more than MAX_TILES_PER_TASK tiles (its description stays small when
# the indices are not consecutive, as when a run is resumed).
TASKS_PER_THREAD = 8
MAX_TILES_PER_TASK = 1024


def task_batches(job, plan, indices, threads):
    """The runs of ``indices`` (a sequence) each Dask task computes, one by one as
    they are submitted: a ``range`` for consecutive indices (a few bytes,
    whatever its length), else a tuple."""
    if not indices:
        return
    tile = plan.tiles[indices[0]]
    values = (tile.b1 - tile.b0) * math.prod(tile.shape) * (job.in_channels + job.filters)
    size = min(-(-TASK_VALUES // max(values, 1)), MAX_TILES_PER_TASK,
               len(indices) // (threads * TASKS_PER_THREAD))
    size = max(size, 1)
    for i in range(0, len(indices), size):
        yield _compact(indices[i:i + size])


def _compact(indices):
    first, last = indices[0], indices[-1]
    if last - first + 1 == len(indices):
        return range(first, last + 1)
    return tuple(indices)


def _run(distributed, client, task, plan, indices, on_done, workers):
    """Run ``indices`` of ``plan``; returns the number of workers of the cluster.

    The task and the plan's tiles go to every worker once; each Dask task then
    carries only its run of tile indices (:func:`task_batches`). Its key is
    the job's token and its first index, so the keys of two runs of different
    jobs (or outputs) never meet on a cluster.
    """
    from dask.base import tokenize
    info = client.scheduler_info().get("workers", {})
    n_workers = len(info) or workers
    threads = sum(w.get("nthreads", 1) for w in info.values()) or n_workers
    table = TileTable(plan.tiles, max(task.job.batch, *task.job.out_spatial))
    task_f, tiles_f = client.scatter([task, table], broadcast=True, hash=False)
    token = tokenize(task, plan.method, plan.tile_shape, plan.batch_per_tile, len(plan.tiles))
    todo = task_batches(task.job, plan, indices, threads)
    pending = set()

    def submit(count):
        for batch in itertools.islice(todo, count):
            fut = client.submit(tiles_task, task_f, tiles_f, batch, retries=3, pure=False,
                                key=f"conv3d-tiles-{token}-{batch[0]}")
            pending.add(fut)
            running.add(fut)

    running = distributed.as_completed()
    submit(IN_FLIGHT * threads)
    try:
        for fut in running:
            pending.discard(fut)
            for index, sums in fut.result():
                on_done(index, sums)
            submit(1)
    except distributed.client.FutureCancelledError as exc:
        raise EngineError(f"the cluster cancelled a tile ({_reason(exc)})") from None
    except BaseException:
        client.cancel(list(pending))
        raise
    return n_workers
