"""The engine's tiles on a Dask cluster (``--scheduler ADDRESS`` or ``local``).

Each tile is one Dask task: it reads its input region from shared storage,
computes, and writes its block straight into the output store (a Zarr store
chunked like the tiles, so no two tasks touch a chunk and no lock is needed).
Only the job description (layer geometry and weights) and the small results
(activity sums) travel through the scheduler; no volume passes the client.
Lost workers' tasks are recomputed by Dask (``retries``).
"""

from __future__ import annotations

from ..errors import ArgumentError, EngineError


def require_distributed():
    try:
        import distributed
    except ImportError:
        raise ArgumentError(
            "--scheduler needs dask.distributed: pip install \"dask[distributed]\" zarr (or "
            "pip install \".[distributed]\" in the conv3d clone)") from None
    return distributed


def _tile_task(job, plan, source, sink, index, want_sums):
    from .execute import run_tile
    from .fft import SpectrumCache
    return index, run_tile(job, plan, index, source, sink, SpectrumCache(), 1, want_sums)


def run_on_dask(scheduler, job, plan, source, sink, indices, want_sums, done, workers):
    """Run ``indices`` of ``plan`` on the cluster; returns the number of workers used."""
    distributed = require_distributed()
    if getattr(sink, "single_writer", False):
        raise ArgumentError("--scheduler writes from many workers: use a Zarr OUTPUT "
                            "(store.zarr), .npy or .nii, not HDF5")
    cluster = None
    try:
        if scheduler == "local":
            # The scheduler's HTTP routes listen even without a dashboard: on a
            # free loopback port, not 8787, which another cluster may hold.
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                               processes=True, dashboard_address=None,
                                               scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            client = distributed.Client(cluster)
        else:
            client = distributed.Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise EngineError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
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
            raise EngineError(f"the cluster cancelled a tile ({exc})") from None
        except BaseException:
            client.cancel(futures)
            raise
        return n_workers
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
