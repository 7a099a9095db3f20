"""Every computation path against the float64 reference: float64 layers at FLOAT64_RTOL
(so a float64 run computed anywhere in float32 fails), and float32 layers on two
threads in tiny tiles.

The paths: the compiled stencil (few channels), im2col + GEMM (many channels), the
scatter form of strided transposed layers, Winograd and FFT. Each case checks that
the path it names is the one that ran.
"""

import importlib

import numpy as np
import pytest

from conftest import FLOAT64_RTOL, assert_close
from conv3d_cli import Conv3D, Conv3DTranspose
from reference import conv3d as ref_conv3d
from reference import conv3d_transpose as ref_conv3d_transpose

task_mod = importlib.import_module("conv3d_cli.engine.task")
stencil_mod = importlib.import_module("conv3d_cli.engine.stencil")
KERNELS = ("correlate_stencil", "correlate_gemm", "scatter_transpose", "correlate_winograd",
           "correlate_fft")

# path: (method, stencil allowed, layer class, arguments, input shape (channels_last))
CASES = {
    "stencil": ("direct", True, Conv3D,
                dict(filters=3, kernel_size=(3, 2, 3), strides=(1, 2, 1), padding="same"),
                (2, 7, 8, 6, 2)),
    "stencil-transpose": ("direct", True, Conv3DTranspose,
                          dict(filters=2, kernel_size=3, strides=(2, 1, 2), padding="same",
                               output_padding=(1, 0, 0)),
                          (1, 4, 5, 3, 2)),
    "gemm": ("direct", False, Conv3D,
             dict(filters=4, kernel_size=3, dilation_rate=(2, 1, 1), padding="same", groups=2),
             (1, 8, 6, 7, 4)),
    "gemm-transpose": ("direct", False, Conv3DTranspose,
                       dict(filters=3, kernel_size=(2, 3, 3), padding="valid"),
                       (1, 5, 4, 6, 3)),
    "scatter": ("direct", False, Conv3DTranspose,
                dict(filters=3, kernel_size=3, strides=2, padding="valid", output_padding=1),
                (1, 4, 3, 5, 2)),
    "winograd": ("winograd", False, Conv3D,
                 dict(filters=16, kernel_size=3, padding="same", groups=2),
                 (1, 7, 6, 5, 16)),
    "winograd-transpose": ("winograd", False, Conv3DTranspose,
                           dict(filters=8, kernel_size=3, padding="valid"),
                           (1, 4, 5, 3, 8)),
    "fft": ("fft", False, Conv3D,
            dict(filters=2, kernel_size=4, strides=(2, 1, 1), padding="same"),
            (1, 9, 7, 8, 3)),
    "fft-transpose": ("fft", False, Conv3DTranspose,
                      dict(filters=2, kernel_size=3, strides=2, padding="same"),
                      (1, 4, 5, 3, 2)),
}
EXPECTED_KERNEL = {"stencil": "correlate_stencil", "gemm": "correlate_gemm",
                   "scatter": "scatter_transpose", "winograd": "correlate_winograd",
                   "fft": "correlate_fft"}


@pytest.fixture
def kernels_run(monkeypatch):
    """The names of the tile kernels called while the test runs."""
    called = set()
    for name in KERNELS:
        real = getattr(task_mod, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            called.add(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(task_mod, name, spy)
    return called


def _setup(path, dtype, monkeypatch):
    method, stencil, cls, kwargs, shape = CASES[path]
    monkeypatch.setattr(stencil_mod, "MAX_CG_FG", 10 ** 9 if stencil else 0)
    rng = np.random.default_rng(sorted(CASES).index(path))
    layer = cls(dtype=dtype, **kwargs)
    x = rng.standard_normal(shape).astype(dtype)
    layer.build(x.shape)
    # Weights drawn in float64: a float32 rounding anywhere shows at ~1e-8.
    layer.set_weights([rng.standard_normal(w.shape).astype(dtype) for w in layer.get_weights()])
    if cls is Conv3D:
        expected = ref_conv3d(x, layer.kernel, layer.bias, layer.strides, layer.padding,
                              layer.dilation_rate, layer.groups)
    else:
        expected = ref_conv3d_transpose(x, layer.kernel, layer.bias, layer.strides,
                                        layer.padding, layer.output_padding,
                                        layer.dilation_rate)
    return layer, x, method, expected


@pytest.mark.parametrize("path", sorted(CASES))
def test_float64_every_path_against_float64_reference(path, monkeypatch, kernels_run):
    layer, x, method, expected = _setup(path, "float64", monkeypatch)
    for chunk in (None, (2, 3, 2)):
        y = layer(x, method=method, chunk_shape=chunk)
        assert y.dtype == np.float64
        assert_close(y, expected, rtol=FLOAT64_RTOL)
    assert kernels_run == {EXPECTED_KERNEL[path.split("-")[0]]}


@pytest.mark.parametrize("path", sorted(CASES))
def test_two_threads_tiny_tiles_every_path(path, monkeypatch, kernels_run):
    layer, x, method, expected = _setup(path, "float32", monkeypatch)
    y = layer(x, method=method, workers=2, chunk_shape=(2, 3, 2))
    assert layer.last_stats.workers == 2 and layer.last_stats.tiles > 4
    assert y.dtype == np.float32
    assert_close(y, expected)
    assert kernels_run == {EXPECTED_KERNEL[path.split("-")[0]]}
