"""The engine's tiles on a Dask cluster (``--scheduler ADDRESS`` or ``local``).

Each tile is one Dask task: it reads its input region from shared storage,
computes, and writes its block straight into the output store (a Zarr store
chunked like the tiles, so no two tasks touch a chunk and no lock is needed).
Only the job description (layer geometry and weights) and the small results
(activity sums) travel through the scheduler; no volume passes the client.
Lost workers' tasks are recomputed by Dask (``retries``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

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


def _tile_task(job, plan, source, sink, index, want_sums):
    from .execute import run_tile
    from .fft import SpectrumCache
    return index, run_tile(job, plan, index, source, sink, SpectrumCache(), 1, want_sums)


def run_on_dask(scheduler, job, plan, source, sink, indices, want_sums, done, workers):
    """Run ``indices`` of ``plan`` on the cluster; returns the number of workers used."""
    distributed = require_distributed()
    if not getattr(sink, "parallel_writes", True):
        raise ArgumentError("--scheduler writes from many workers: use a Zarr OUTPUT "
                            "(store.zarr), .npy or .nii, not HDF5")
    if scheduler != "local":
        check_address(scheduler)
    timeout = scheduler_timeout()
    with _quiet_logs():
        try:
            return _run(distributed, scheduler, timeout, job, plan, source, sink, indices,
                        want_sums, done, workers)
        except (Conv3DError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the cluster's own failures: lost workers, closed comms
            raise EngineError(f"--scheduler {scheduler}: the cluster failed "
                              f"({_reason(exc)}); no output was written") from None


def _run(distributed, scheduler, timeout, job, plan, source, sink, indices, want_sums, done,
         workers):
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
                                               scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            client = distributed.Client(cluster)
        else:
            _probe(scheduler, timeout)
            client = distributed.Client(scheduler, timeout=f"{timeout}s")
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise EngineError(f"--scheduler {scheduler}: cannot connect ({_reason(exc)})") from None
    try:
        n_workers = len(client.scheduler_info().get("workers", {})) or workers
        [job_f] = client.scatter([job], broadcast=True)
        futures = [client.submit(_tile_task, job_f, plan, source, sink, i, want_sums,
                                 key=f"conv3d-tile-{i}-{id(plan)}", retries=3, pure=False)
                   for i in indices]
        try:
            for fut in distributed.as_completed(futures):
                index, sums = fut.result()
                done(index, sums)
        except distributed.client.FutureCancelledError as exc:
            raise EngineError(f"the cluster cancelled a tile ({_reason(exc)})") from None
        except BaseException:
            client.cancel(futures)
            raise
        return n_workers
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
