"""The faster kernels give the reference's result: the scatter form's product
blocks, the FFT tile split across threads, Winograd's fused output transform;
and ``layer(x)`` uses the usable cores by default."""

import importlib

import numpy as np
import pytest

from conftest import FLOAT64_RTOL, assert_close
from conv3d_cli import Conv3D, Conv3DTranspose
from reference import conv3d as ref_conv3d
from reference import conv3d_transpose as ref_conv3d_transpose

engine_mod = importlib.import_module("conv3d_cli.engine")
direct_mod = importlib.import_module("conv3d_cli.engine.direct")
fft_mod = importlib.import_module("conv3d_cli.engine.fft")


def _x(rng, shape, df="channels_last", dtype=np.float32):
    b, d, h, w, c = shape
    s = shape if df == "channels_last" else (b, c, d, h, w)
    return rng.standard_normal(s).astype(dtype)


def _rtol(dtype):
    return FLOAT64_RTOL if dtype == np.float64 else 1e-5


# ------------------------------------------------------------- default workers
def test_layer_call_uses_the_usable_cores_by_default(rng, monkeypatch):
    monkeypatch.setattr(engine_mod, "default_workers", lambda: 2)
    layer = Conv3D(16, 3)
    x = rng.standard_normal((1, 28, 28, 28, 16)).astype(np.float32)  # > 2e8 FLOPs: split
    default = layer(x, method="direct")
    assert layer.last_stats.workers == 2
    one = layer(x, method="direct", workers=1)
    assert layer.last_stats.workers == 1
    assert_close(default, one)


# ------------------------------------------------- scatter transpose, blocked
@pytest.mark.parametrize("block", [1, 3000, 1 << 20])  # one H row, a few rows, planes
@pytest.mark.parametrize("case", [  # kernel, strides, padding, output_padding, df
    ((3, 3, 3), 2, "valid", None, "channels_last"),
    ((4, 2, 3), (2, 3, 1), "same", None, "channels_first"),
    ((3, 3, 3), 2, "same", 1, "channels_last"),
])
def test_scatter_transpose_blocks_equal_reference(rng, monkeypatch, block, case):
    monkeypatch.setattr(direct_mod, "SCATTER_BLOCK_BYTES", block)
    k, s, pad, op, df = case
    layer = Conv3DTranspose(5, k, strides=s, padding=pad, output_padding=op, data_format=df,
                            bias_initializer="random_normal")
    x = _x(rng, (2, 5, 7, 6, 9), df)
    layer.build(x.shape)
    expected = ref_conv3d_transpose(x, layer.kernel, layer.bias, layer.strides, pad,
                                    layer.output_padding, layer.dilation_rate, df)
    for chunk in (None, (3, 4, 5)):
        assert_close(layer(x, method="direct", workers=1, chunk_shape=chunk), expected)
    assert layer.last_stats.method == "direct"


# ------------------------------------------------------- FFT stages across threads
@pytest.fixture
def fft_stages(monkeypatch):
    """How many threads' shares each stage of correlate_fft ran in (tiles of any
    size on the threads asked for)."""
    seen = []
    real = fft_mod._in_threads
    monkeypatch.setattr(fft_mod, "MIN_THREADED_VALUES", 0)

    def spy(pool, jobs):
        seen.append(len(jobs))
        return real(pool, jobs)

    monkeypatch.setattr(fft_mod, "_in_threads", spy)
    return seen


def _whole_tile(layer, x):
    """The job of ``layer`` on ``x`` and the terms of one tile covering its output."""
    job = layer.job(x.shape)
    return job, [g.terms(0, g.out)[2] for g in job.geoms]


@pytest.mark.parametrize("block", [1, 5000])  # one plane / H row per block, a few
@pytest.mark.parametrize("workers,dtype", [(1, np.float32), (2, np.float32), (3, np.float32),
                                           (2, np.float64)])
@pytest.mark.parametrize("batch,d,groups,channels", [
    (2, 9, 2, 4),       # channels mixed per frequency, by group
    (1, 30, 1, 1),      # one channel: one multiply per frequency
    (3, 6, 1, 3),
])
def test_fft_stages_across_threads_equal_reference(rng, monkeypatch, fft_stages, block,
                                                   workers, dtype, batch, d, groups, channels):
    monkeypatch.setattr(fft_mod, "BLOCK_BYTES", block)
    layer = Conv3D(channels, 3, groups=groups, dtype="float64" if dtype == np.float64 else None,
                   bias_initializer="random_normal")
    x = _x(rng, (batch, d, 7, 8, channels), dtype=dtype)
    layer.build(x.shape)
    job, terms = _whole_tile(layer, x)
    expected = ref_conv3d(x, layer.kernel, None, groups=groups)
    got = np.zeros((batch,) + job.out_spatial + (channels,), dtype)
    fft_mod.correlate_fft(x, terms, job.taps, got, workers=workers)
    assert_close(got, expected, rtol=_rtol(dtype))
    # the kernel spectra's transform along D, then three stages, each shared
    # among the threads when it has a block for each (on one thread: no pool)
    assert len(fft_stages) == (0 if workers == 1 else 4)
    assert all(n == workers for n in fft_stages) if block == 1 else \
        all(1 <= n <= workers for n in fft_stages)
    # fused bias (one term per axis): bias + sum set on every output
    got[...] = np.nan
    fft_mod.correlate_fft(x, terms, job.taps, got, workers=workers, bias=layer.bias)
    assert_close(got, expected + layer.bias, rtol=_rtol(dtype))


def test_fft_small_tile_runs_on_one_thread(rng, monkeypatch):
    seen = []
    monkeypatch.setattr(fft_mod, "_in_threads", lambda pool, jobs: seen.append(len(jobs)))
    layer = Conv3D(2, 3)
    x = _x(rng, (1, 8, 8, 8, 2))
    layer.build(x.shape)
    job, terms = _whole_tile(layer, x)
    got = np.zeros((1,) + job.out_spatial + (2,), np.float32)
    fft_mod.correlate_fft(x, terms, job.taps, got, workers=2)
    assert seen == []  # no thread pool: its start costs more than the tile
    assert_close(got, ref_conv3d(x, layer.kernel, None))


@pytest.mark.parametrize("df", ["channels_first", "channels_last"])
@pytest.mark.parametrize("workers", [1, 2])
def test_fft_transposed_phases_across_threads_equal_reference(rng, monkeypatch, df, workers):
    # Strided transposed: one term per output phase along D and W, each output
    # plane kept once by its phase (accumulated, not set).
    monkeypatch.setattr(fft_mod, "BLOCK_BYTES", 3000)
    monkeypatch.setattr(fft_mod, "MIN_THREADED_VALUES", 0)
    layer = Conv3DTranspose(3, 3, strides=(2, 1, 2), padding="same", data_format=df,
                            bias_initializer="random_normal")
    x = _x(rng, (2, 11, 5, 6, 2), df)
    layer.build(x.shape)
    expected = ref_conv3d_transpose(x, layer.kernel, layer.bias, layer.strides, "same",
                                    None, layer.dilation_rate, df)
    assert_close(layer(x, method="fft", workers=workers), expected)
    assert_close(layer(x, method="fft", workers=workers, chunk_shape=(5, 4, 7)), expected)


# ------------------------------------------------- Winograd slabs, fused bias
winograd_mod = importlib.import_module("conv3d_cli.engine.winograd")


@pytest.mark.parametrize("slab", [7, 16, 10 ** 6])  # slabs cut rows and planes; one slab
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", [  # layer, input shape (B, D, H, W, C), data_format
    (lambda **kw: Conv3D(9, 3, padding="same", **kw), (2, 9, 6, 11, 8), "channels_last"),
    (lambda **kw: Conv3D(16, 3, groups=2, **kw), (1, 8, 7, 12, 16), "channels_first"),
    (lambda **kw: Conv3DTranspose(8, 3, **kw), (1, 5, 9, 6, 10), "channels_last"),  # stride 1
])
def test_winograd_slabs_equal_reference(rng, monkeypatch, slab, dtype, case):
    monkeypatch.setattr(winograd_mod, "SLAB_BYTES", 1)
    monkeypatch.setattr(winograd_mod, "MIN_SLAB_TILES", slab)
    make, shape, df = case
    layer = make(dtype="float64" if dtype == np.float64 else "float32", data_format=df,
                 bias_initializer="random_normal")
    x = _x(rng, shape, df, dtype)
    layer.build(x.shape)
    if layer.kind == "conv":
        expected = ref_conv3d(x, layer.kernel, layer.bias, padding=layer.padding,
                              groups=layer.groups, data_format=df)
    else:
        expected = ref_conv3d_transpose(x, layer.kernel, layer.bias, layer.strides,
                                        layer.padding, None, layer.dilation_rate, df)
    for chunk in (None, (3, 5, 4)):  # odd tile sizes: the zero row of odd outputs
        got = layer(x, method="winograd", workers=1, chunk_shape=chunk)
        assert layer.last_stats.method == "winograd"
        assert_close(got, expected, rtol=_rtol(dtype))
