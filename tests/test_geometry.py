"""The format-neutral geometry: frozen, and moved through a layer as the voxels are."""

import math

import numpy as np
import pytest

from conv3d_cli import Conv3D
from conv3d_cli.geometry import Geometry


def test_geometry_is_frozen_and_moves_through_the_layer():
    job = Conv3D(1, 3, strides=2, padding="same").job((1, 9, 8, 7, 1))
    a = np.array([[0.0, -2.0, 0, 5], [1.5, 0, 0, -3], [0, 0, 2.5, 1], [0, 0, 0, 1]])
    g = Geometry(a, ("millimeter",) * 3, header="opaque", kind="affine")
    with pytest.raises(ValueError):
        g.affine[0, 0] = 1  # a read-only copy
    moved = g.moved(job.geoms)
    # Output voxel o sits at input voxel o * 2 + 1 - pad_before, pad_before = (3 - n % 2) // 2.
    pad = [max((math.ceil(n / 2) - 1) * 2 + 3 - n, 0) // 2 for n in (9, 8, 7)]
    m = np.diag([2.0, 2.0, 2.0, 1.0])
    m[:3, 3] = [1 - p for p in pad]
    np.testing.assert_allclose(moved.affine, a @ m)
    np.testing.assert_allclose(moved.to_source, m)
    assert moved.header == "opaque" and moved.units == g.units
    assert Geometry().moved(job.geoms).affine is None
    assert moved.voxel_sizes_in("micrometer") == pytest.approx((3000.0, 4000.0, 5000.0))
