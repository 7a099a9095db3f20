"""Winograd with F(4, 3) along W: which tiles take it, and that its larger
constants keep the result within the engine's 1e-5 of scale on many channels."""

import importlib

import numpy as np
import pytest

from conftest import assert_close
from conv3d_cli import Conv3D
from reference import conv3d as ref_conv3d

winograd_mod = importlib.import_module("conv3d_cli.engine.winograd")


def test_f43_along_w_from_eight_outputs():
    assert winograd_mod.axis_steps((8, 8, 8)) == (2, 2, 4)
    assert winograd_mod.axis_steps((3, 30, 7)) == (2, 2, 2)


@pytest.mark.parametrize("f4_min_w", [8, 10 ** 6])  # F(4, 3) along W; F(2, 3) everywhere
def test_unrolled_transforms_match_their_matrices(rng, monkeypatch, f4_min_w):
    # The numba kernels unroll B^T and A^T; the kernel transform uses G: all three
    # must be one algorithm, on every in-tile position of a block (W = 13: the
    # last F(4, 3) block has one output inside the tile).
    monkeypatch.setattr(winograd_mod, "F4_MIN_W", f4_min_w)
    x = rng.standard_normal((1, 5, 6, 13, 8)).astype(np.float64)
    layer = Conv3D(8, 3, padding="same", dtype="float64", bias_initializer="random_normal")
    layer.build(x.shape)
    expected = ref_conv3d(x, layer.kernel, layer.bias, padding="same")
    assert_close(layer(x, method="winograd", workers=1), expected, rtol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_float32_error_with_many_channels_within_tolerance(rng, offset):
    # 128 channels into 16, W = 16 outputs: F(4, 3) along W (about 3e-6 of scale).
    x = (rng.standard_normal((1, 6, 6, 18, 128)) + offset).astype(np.float32)
    layer = Conv3D(16, 3, use_bias=False)
    layer.build(x.shape)
    got = layer(x, method="winograd", workers=1)
    assert layer.last_stats.method == "winograd"
    assert_close(got, ref_conv3d(x.astype(np.float64), layer.kernel.astype(np.float64), None))
