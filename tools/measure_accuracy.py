"""Measure how close each engine method comes to the float64 NumPy reference.

The tolerances of tests/conftest.py (FLOAT32_RTOL, FLOAT64_RTOL) come from
this table: the largest ``max|y - ref| / max|ref|`` over a few workloads, per
method and dtype. Rerun it after changing a kernel:

    .venv/bin/python tools/measure_accuracy.py

Every method is forced: ``direct`` as the compiled stencil (few channels),
as im2col + GEMM (many channels) and, for strided transposed layers, as the
scatter form; ``winograd`` (3x3x3, stride 1); ``fft``. Tiles are small, so
tile seams are part of the measurement.
"""

import importlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conv3d_cli import Conv3D, Conv3DTranspose  # noqa: E402
from reference import conv3d as ref_conv3d  # noqa: E402
from reference import conv3d_transpose as ref_conv3d_transpose  # noqa: E402

stencil_mod = importlib.import_module("conv3d_cli.engine.stencil")

# name, layer class, layer kwargs, input shape (channels_last), methods
WORKLOADS = [
    ("conv k3 C2 F3 same", Conv3D, dict(filters=3, kernel_size=3, padding="same"),
     (2, 12, 11, 10, 2), ["stencil", "gemm", "fft"]),
    ("conv k5 C8 F8 s2", Conv3D, dict(filters=8, kernel_size=5, strides=2, padding="same"),
     (1, 15, 14, 13, 8), ["stencil", "gemm", "fft"]),
    ("conv k3 C16 F16", Conv3D, dict(filters=16, kernel_size=3, padding="same"),
     (1, 10, 9, 11, 16), ["gemm", "winograd", "fft"]),
    ("conv k7 C1 F1 d2", Conv3D, dict(filters=1, kernel_size=7, dilation_rate=2, padding="same"),
     (1, 16, 15, 14, 1), ["stencil", "gemm", "fft"]),
    ("tconv k3 C6 F5 s2", Conv3DTranspose,
     dict(filters=5, kernel_size=3, strides=2, padding="same"),
     (1, 7, 6, 8, 6), ["stencil", "gemm-scatter", "fft"]),
    ("tconv k3 C16 F16 s1", Conv3DTranspose, dict(filters=16, kernel_size=3, padding="same"),
     (1, 8, 7, 9, 16), ["gemm", "winograd", "fft"]),
]


def run(cls, kwargs, shape, dtype, path, rng):
    layer = cls(dtype=dtype, bias_initializer="random_normal", **kwargs)
    x = rng.standard_normal(shape).astype(dtype)
    layer.build(x.shape)
    layer.set_weights([rng.standard_normal(w.shape).astype(dtype) for w in layer.get_weights()])
    if cls is Conv3D:
        ref = ref_conv3d(x, layer.kernel, layer.bias, layer.strides, layer.padding,
                         layer.dilation_rate)
    else:
        ref = ref_conv3d_transpose(x, layer.kernel, layer.bias, layer.strides, layer.padding,
                                   layer.output_padding, layer.dilation_rate)
    method = {"stencil": "direct", "gemm": "direct", "gemm-scatter": "direct"}.get(path, path)
    saved = stencil_mod.MAX_CG_FG
    stencil_mod.MAX_CG_FG = 10 ** 9 if path == "stencil" else 0 if "gemm" in path else saved
    try:
        errors = [np.max(np.abs(layer(x, method=method, chunk_shape=chunk) - ref))
                  for chunk in (None, (3, 4, 5))]
    finally:
        stencil_mod.MAX_CG_FG = saved
    return max(errors) / np.max(np.abs(ref))


def main():
    rng = np.random.default_rng(0)
    worst = {}
    print(f"{'workload':22s} {'method':13s} {'float32':>9s} {'float64':>9s}")
    for name, cls, kwargs, shape, paths in WORKLOADS:
        for path in paths:
            e32 = run(cls, kwargs, shape, "float32", path, rng)
            e64 = run(cls, kwargs, shape, "float64", path, rng)
            worst[path] = max(worst.get(path, (0, 0))[0], e32), max(worst.get(path, (0, 0))[1], e64)
            print(f"{name:22s} {path:13s} {e32:9.1e} {e64:9.1e}")
    print("\nworst relative to the output's scale")
    for path, (e32, e64) in worst.items():
        print(f"{path:13s} float32 {e32:.1e}  float64 {e64:.1e}")


if __name__ == "__main__":
    main()
