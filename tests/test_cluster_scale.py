"""The Dask executor at scale, without a cluster: the tile table the workers get
and the runs of tiles each Dask task computes."""

import numpy as np
import pytest

from conv3d_cli import Conv3D
from conv3d_cli.engine import plan_job
from conv3d_cli.engine.distributed import (
    MAX_TILES_PER_TASK,
    TASKS_PER_THREAD,
    TileTable,
    task_batches,
)
from conv3d_cli.engine.plan import Tile


def _job(spatial=(16, 16, 16), filters=1):
    layer = Conv3D(filters, 3, padding="same")
    shape = (1, *spatial, 1)
    layer.build(shape)
    return layer.job(shape)


def test_tile_table_gives_back_the_plans_tiles():
    job = _job((9, 10, 11))
    plan = plan_job(job, "direct", workers=1, chunk_shape=(2, 3, 4))
    table = TileTable(plan.tiles, max(job.batch, *job.out_spatial))
    assert table.rows.dtype == np.int32 and len(table) == len(plan.tiles) == 5 * 4 * 3
    assert [table[i] for i in range(len(table))] == list(plan.tiles)
    assert all(type(v) is int for v in (table[7].b0, *table[7].out[2]))
    # Bounds past int32 (an axis of 2^31 voxels or more) keep their values.
    big = [Tile(0, 1, ((0, 5), (2 ** 31, 2 ** 31 + 7), (3, 4)))]
    wide = TileTable(big, 2 ** 31 + 7)
    assert wide.rows.dtype == np.int64 and wide[0] == big[0]


@pytest.mark.parametrize("threads", [1, 2, 16])
def test_small_tiles_are_grouped_and_every_tile_is_run_once(threads):
    job = _job()
    plan = plan_job(job, "direct", workers=1, chunk_shape=(1, 2, 2))   # 2,048 tiles
    everything = list(range(len(plan.tiles)))
    runs = list(task_batches(job, plan, everything, threads))
    assert all(isinstance(r, range) for r in runs)
    assert [i for r in runs for i in r] == everything
    assert len(runs) >= threads * TASKS_PER_THREAD and max(map(len, runs)) > 1
    assert max(map(len, runs)) <= MAX_TILES_PER_TASK
    # A resumed run skips the tiles already written: runs with gaps are tuples.
    left = [i for i in everything if i % 3]
    runs = list(task_batches(job, plan, left, threads))
    assert [i for r in runs for i in r] == left
    assert all(isinstance(r, tuple) for r in runs if len(r) > 2)


def test_large_tiles_are_one_task_each():
    job = _job((64, 128, 128), filters=8)
    plan = plan_job(job, "direct", workers=1, chunk_shape=(32, 64, 64))
    runs = list(task_batches(job, plan, list(range(len(plan.tiles))), 2))
    assert runs == [range(i, i + 1) for i in range(len(plan.tiles))]
    assert list(task_batches(job, plan, [], 2)) == []
