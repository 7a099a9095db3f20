"""Plans are frozen; a recorded tiling (a resumed output's) is planned as given,
and refused unless it covers the output exactly once."""

import dataclasses

import pytest

from conv3d_cli import Conv3D
from conv3d_cli.engine import plan_job
from conv3d_cli.errors import ArgumentError


def _job(**kw):
    return Conv3D(2, 3, padding="same", **kw).job((2, 8, 6, 4, 1))


def test_plan_and_job_are_frozen():
    job = _job()
    plan = plan_job(job, "direct", workers=1, chunk_shape=(4, 3, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.tiles = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.filters = 3
    assert isinstance(plan.tiles, tuple)


def test_recorded_tiles_are_kept_whatever_the_workers():
    job = _job()
    recorded = plan_job(job, "direct", workers=1, chunk_shape=(4, 3, 4)).tiles
    as_stored = [[t.b0, t.b1, [list(r) for r in t.out]] for t in recorded]  # e.g. from JSON
    plan = plan_job(job, "direct", workers=2, tiles=as_stored)
    assert plan.tiles == recorded and plan.tile_shape == (4, 3, 4)


@pytest.mark.parametrize("tiles, why", [
    ([(0, 2, ((0, 8), (0, 6), (0, 3)))], "exactly once"),                       # a gap
    ([(0, 2, ((0, 8), (0, 6), (0, 4))), (0, 1, ((0, 1), (0, 1), (0, 1)))], "exactly once"),
    ([(0, 2, ((0, 9), (0, 6), (0, 4)))], "inside the output"),
    ([(0, 2, ((0, 8), (0, 6)))], "inside the output"),
    (["nonsense"], "inside the output"),
])
def test_a_tiling_that_does_not_cover_the_output_once_is_refused(tiles, why):
    with pytest.raises(ArgumentError, match=f"Invalid `tiles`.*{why}"):
        plan_job(_job(), "direct", workers=1, tiles=tiles)


def test_a_recorded_tiling_must_span_w_where_glu_needs_it():
    job = Conv3D(2, 3, padding="same", activation="glu",
                 data_format="channels_first").job((1, 1, 4, 4, 4))
    halves = [(0, 1, ((0, 4), (0, 4), (0, 2))), (0, 1, ((0, 4), (0, 4), (2, 4)))]
    with pytest.raises(ArgumentError, match="span W whole"):
        plan_job(job, "direct", workers=1, tiles=halves)
