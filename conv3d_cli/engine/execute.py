"""Run a plan's tiles: the run's bookkeeping around an executor.

``execute`` picks the executor (:func:`~conv3d_cli.engine.executors.make_executor`:
serial, threads, worker processes or Dask), which computes each tile by the
tile task (:mod:`~conv3d_cli.engine.task`) into the sink; this module counts
what is done: the activity sums, the progress bar, and ``on_done`` for outputs
that record their finished tiles (a resumable Zarr store).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .executors import make_executor


@dataclass
class Stats:
    method: str = ""
    tiles: int = 0
    seconds: float = 0.0
    activity_sums: tuple | None = None
    workers: int = 1
    extra: dict = field(default_factory=dict)


def execute(job, plan, source, sink, want_sums=False, progress=None, executor="processes",
            skip=(), on_done=None, scheduler=None) -> Stats:
    """Compute the tiles of ``plan`` (but those in ``skip``) into ``sink``.

    ``executor`` is ``"processes"`` (worker processes that read and write
    files themselves) or ``"threads"`` (for in-memory arrays); ``scheduler``
    (a Dask address or ``"local"``) sends the tiles to a Dask cluster
    instead. ``on_done(index)`` is called once a tile is written;
    ``progress`` is a tqdm-like bar or None.
    """
    start = time.perf_counter()
    skip = set(skip)
    indices = [i for i in range(len(plan.tiles)) if i not in skip]
    tally = _Tally(plan, len(indices), want_sums, progress, on_done)
    runner = make_executor(job, plan, source, sink, len(indices), want_sums, executor, scheduler)
    runner.run(indices, tally.done)
    return Stats(method=plan.method, tiles=len(plan.tiles),
                 seconds=time.perf_counter() - start,
                 activity_sums=tally.sums if want_sums else None, workers=runner.workers)


class _Tally:
    """What a run has done: tiles, activity sums, the progress bar."""

    def __init__(self, plan, count, want_sums, progress, on_done):
        self.plan, self.count, self.progress, self.on_done = plan, count, progress, on_done
        self.finished = 0
        self.sums = (0.0, 0.0) if want_sums else None

    def done(self, index, sums):
        if sums is not None:
            self.sums = (self.sums[0] + sums[0], self.sums[1] + sums[1])
        if self.on_done is not None:
            self.on_done(index)
        self.finished += 1
        if self.progress is not None:
            tile = self.plan.tiles[index]
            self.progress.set_postfix_str(f"tiles {self.finished}/{self.count}", refresh=False)
            self.progress.update((tile.b1 - tile.b0) * math.prod(tile.shape))
