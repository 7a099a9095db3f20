"""The engine: chunked == unchunked == the NumPy reference, FFT == direct, workers,
the planner's memory bound, a killed worker."""

import importlib
import multiprocessing
import os
import signal

import numpy as np
import pytest

from conftest import assert_close
from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.api import apply_to_file
from conv3d_cli.engine import plan_job
from conv3d_cli.engine.choose import choose_method
from conv3d_cli.errors import ArgumentError, EngineError
from reference import conv3d as ref_conv3d
from reference import conv3d_transpose as ref_conv3d_transpose

CONV_CASES = [  # kernel, strides, dilation, padding, groups, channels, filters
    ((3, 3, 3), 1, 1, "valid", 1, 2, 3),
    ((2, 4, 3), 1, 1, "same", 1, 1, 2),        # even kernels
    ((3, 3, 3), (2, 1, 3), 1, "same", 1, 3, 2),  # strides
    ((3, 2, 3), 1, (2, 1, 3), "same", 1, 2, 2),  # dilation
    ((3, 3, 3), 2, 1, "valid", 3, 6, 3),        # groups
    ((1, 1, 1), 1, 1, "valid", 1, 4, 5),
]
TCONV_CASES = [  # kernel, strides, dilation, padding, output_padding
    ((3, 3, 3), 2, 1, "same", None),
    ((4, 2, 3), (2, 3, 1), 1, "valid", (1, 2, 0)),
    ((3, 3, 3), 2, 1, "same", 1),
    ((2, 3, 2), 1, (2, 1, 2), "same", None),
    ((1, 2, 1), 3, 1, "valid", None),
]
CHUNKS = [None, (2, 3, 5), (1, 1, 7), (4, 4, 1)]
stencil_mod = importlib.import_module("conv3d_cli.engine.stencil")


@pytest.fixture(params=["gemm", "stencil"])
def direct_path(request, monkeypatch):
    """Run a test with each direct formulation (im2col + GEMM, compiled stencil)."""
    monkeypatch.setattr(stencil_mod, "MAX_CG_FG", 0 if request.param == "gemm" else 10 ** 9)
    return request.param


def _x(rng, df, shape=(2, 9, 8, 10), c=2):
    b, d, h, w = shape
    s = (b, d, h, w, c) if df == "channels_last" else (b, c, d, h, w)
    return rng.standard_normal(s).astype(np.float32)


@pytest.mark.parametrize("df", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv3d_chunked_equals_reference(rng, df, case, direct_path):
    k, s, d, pad, g, c, f = case
    layer = Conv3D(f, k, strides=s, dilation_rate=d, padding=pad, groups=g, data_format=df,
                   bias_initializer="random_normal")
    x = _x(rng, df, c=c)
    layer.build(x.shape)
    expected = ref_conv3d(x, layer.kernel, layer.bias, layer.strides, pad,
                          layer.dilation_rate, g, df)
    for method in ("direct", "fft"):
        for chunk in CHUNKS:
            assert_close(layer(x, method=method, chunk_shape=chunk), expected)


@pytest.mark.parametrize("df", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", TCONV_CASES)
def test_conv3d_transpose_chunked_equals_reference(rng, df, case, direct_path):
    k, s, d, pad, op = case
    layer = Conv3DTranspose(3, k, strides=s, dilation_rate=d, padding=pad, output_padding=op,
                            data_format=df, bias_initializer="random_normal")
    x = _x(rng, df, shape=(1, 5, 4, 6))
    layer.build(x.shape)
    expected = ref_conv3d_transpose(x, layer.kernel, layer.bias, layer.strides, pad,
                                    layer.output_padding, layer.dilation_rate, df)
    for method in ("direct", "fft"):
        for chunk in CHUNKS:
            assert_close(layer(x, method=method, chunk_shape=chunk), expected)


def test_extended_batch_dims(rng, direct_path):
    layer = Conv3D(2, 3, padding="same")
    x = rng.standard_normal((2, 3, 5, 6, 4, 1)).astype(np.float32)
    y = layer(x, chunk_shape=(2, 2, 2))
    flat = ref_conv3d(x.reshape(6, 5, 6, 4, 1), layer.kernel, layer.bias, padding="same")
    assert_close(y, flat.reshape(2, 3, 5, 6, 4, 2))


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_two_workers_tiny_tiles(rng, method, direct_path):
    layer = Conv3DTranspose(2, 3, strides=2, padding="same", activation="relu",
                            activity_regularizer="l1")
    x = rng.standard_normal((3, 6, 7, 5, 2)).astype(np.float32)
    one = layer(x, method=method)
    loss_one = layer.losses[0]
    two = layer(x, method=method, workers=2, chunk_shape=(3, 2, 5))
    assert layer.last_stats.workers == 2 and layer.last_stats.tiles > 2
    assert_close(two, one)
    assert layer.losses[0] == pytest.approx(loss_one, rel=1e-5)


def test_axiswise_activation_tiles_span_w_under_channels_first(rng):
    layer = Conv3D(3, 3, padding="same", activation="softmax", data_format="channels_first")
    x = rng.standard_normal((1, 2, 6, 6, 7)).astype(np.float32)
    whole = layer(x)
    assert_close(whole.sum(axis=-1), np.ones((1, 3, 6, 6)), rtol=1e-5)
    job = layer.job(x.shape)
    plan = plan_job(job, "direct", memory_limit="1G", workers=2)
    assert all(t.out[2] == (0, 7) for t in plan.tiles)
    # A forced chunk shape is widened along W (see tests/test_keras_edge.py).
    assert_close(layer(x, chunk_shape=(2, 2, 2)), whole)


def test_plan_respects_memory_limit():
    layer = Conv3D(8, 3, padding="same")
    layer.build((1, 128, 128, 128, 4))
    job = layer.job((1, 128, 128, 128, 4))
    for limit in ("1200M", "2G", "4G"):
        for processes in (True, False):
            plan = plan_job(job, "direct", memory_limit=limit, workers=2, processes=processes)
            assert plan.peak_bytes <= plan.memory_limit
            assert sum(np.prod(t.shape) for t in plan.tiles) == 128 ** 3
    # The plan counts this process's own memory, which grows as the suite runs:
    # leave a fixed 150 MiB for tiles above it.
    from conv3d_cli.engine.plan import process_baseline
    small = plan_job(job, "direct", memory_limit=process_baseline() + (150 << 20), workers=1)
    assert small.peak_bytes <= small.memory_limit and len(small.tiles) > 1
    assert small.tile_bytes < plan_job(job, "direct", memory_limit="4G", workers=1).tile_bytes
    with pytest.raises(ArgumentError, match="too small for this layer"):
        plan_job(job, "direct", memory_limit="10M", workers=1)


def test_method_choice_follows_cost_model():
    small = Conv3D(1, 3)
    assert choose_method(small.job((1, 64, 64, 64, 1))) == "direct"
    big = Conv3D(1, 15)
    assert choose_method(big.job((1, 96, 96, 96, 1))) == "fft"
    strided = Conv3D(16, 3, strides=2)
    assert choose_method(strided.job((1, 32, 32, 32, 16))) == "direct"


def _dies_in_a_worker(x):
    """An activation that kills the worker process computing it (pickled by name,
    so it reaches workers however they start)."""
    if multiprocessing.parent_process() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_killed_worker_gives_clean_error(tmp_path, rng):
    np.save(tmp_path / "in.npy", rng.standard_normal((20, 20, 20)).astype(np.float32))
    layer = Conv3D(1, 3, activation=_dies_in_a_worker)
    with pytest.raises(EngineError, match="worker process died"):
        apply_to_file(layer, str(tmp_path / "in.npy"), str(tmp_path / "out.npy"), workers=2,
                      chunk_shape=(5, 5, 5), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.npy"]


def test_file_workers_processes_equal_serial(tmp_path, rng):
    np.save(tmp_path / "in.npy", rng.standard_normal((2, 11, 12, 13, 3)).astype(np.float32))
    layer = Conv3D(4, 3, padding="same", activation="tanh")
    apply_to_file(layer, str(tmp_path / "in.npy"), str(tmp_path / "a.npy"), workers=1,
                  progress=False)
    apply_to_file(layer, str(tmp_path / "in.npy"), str(tmp_path / "b.npy"), workers=2,
                  chunk_shape=(4, 5, 3), progress=False)
    assert_close(np.load(tmp_path / "b.npy"), np.load(tmp_path / "a.npy"), rtol=1e-6)


@pytest.mark.parametrize("df", ["channels_last", "channels_first"])
@pytest.mark.parametrize("padding,groups", [("valid", 1), ("same", 1), ("same", 2)])
def test_winograd_equals_reference(rng, df, padding, groups):
    layer = Conv3D(16, 3, padding=padding, groups=groups, data_format=df,
                   bias_initializer="random_normal")
    x = _x(rng, df, shape=(2, 7, 6, 9), c=16)
    layer.build(x.shape)
    expected = ref_conv3d(x, layer.kernel, layer.bias, padding=padding, groups=groups,
                          data_format=df)
    for chunk in (None, (3, 2, 5), (1, 4, 4)):
        assert_close(layer(x, method="winograd", chunk_shape=chunk), expected)
    tconv = Conv3DTranspose(16, 3, padding=padding, data_format=df)
    tconv.build(x.shape)
    assert_close(tconv(x, method="winograd", chunk_shape=(4, 3, 5)), tconv(x, method="direct"))


def test_winograd_refuses_other_kernels():
    with pytest.raises(ArgumentError, match="winograd needs 3x3x3 kernels at stride 1"):
        Conv3D(16, 3, strides=2)(np.zeros((1, 8, 8, 8, 16), np.float32), method="winograd")
