import os
import sys
import tempfile

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")

# The suite must not depend on the user's ~/.keras/keras.json (a channels_first
# there would change every default data_format): point KERAS_HOME at an empty
# folder for this process and every subprocess it starts. Tests of the
# keras.json behaviour set KERAS_HOME themselves.
_KERAS_HOME = tempfile.mkdtemp(prefix="conv3d-test-keras-home-")
os.environ["KERAS_HOME"] = _KERAS_HOME

# Tolerances, relative to the output's scale (max |expected|), from
# tools/measure_accuracy.py: the largest error against the float64 reference
# over six workloads (3x3x3 to 7x7x7 kernels, strides, dilation, transposed,
# 1 to 16 channels, whole and in small tiles) was, per method,
#
#                   stencil  GEMM     scatter  winograd  FFT
#     float32       8.5e-7   3.9e-7   9.7e-8   2.3e-7    2.6e-7
#     float64       2.1e-15  1.2e-15  2.9e-16  6.0e-16   1.2e-15
#
# Float32 results (and Keras's own float32 outputs in the golden fixtures) are
# compared at 1e-5: over 10x the worst measured error, and still small enough
# to catch a wrong formula (gelu's tanh approximation differs by 4.7e-4).
FLOAT32_RTOL = 1e-5
# Float64 runs, against the float64 reference: about 500x the worst measured
# error, and far below what a single float32 rounding costs (~1e-8), so a
# float64 run computed anywhere in float32 fails.
FLOAT64_RTOL = 1e-12
# float16 / bfloat16 layers against real Keras 3 (tests/fixtures/dtype_golden.*,
# tools/make_dtype_fixtures.py): the values are Keras's bit for bit, except
# where a float32 sum lies at a rounding boundary and the engine (FFT,
# Winograd, another tiling) sums in another order than XLA: that value rounds
# one ulp the other way. Measured: at most 2 such values per case, at most
# 0.43 ulp of the output's scale for float16 and 0.36 for bfloat16. The bound
# is one ulp of the scale (assert_close adds as much relative to each value):
# 2**-10 for float16 (10 fraction bits), 2**-7 for bfloat16 (7).
FLOAT16_RTOL = 2.0 ** -10
BFLOAT16_RTOL = 2.0 ** -7


def assert_close(actual, expected, rtol=FLOAT32_RTOL):
    """Agreement relative to the output's scale (max |expected|)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def compiled_kernels_for_small_jobs(monkeypatch):
    """The suite's arrays are small; let them take the compiled (numba) kernels as
    large jobs do. Outside the tests, jobs under ``MIN_COMPILED_FLOPS`` take the
    NumPy paths, so that a small run never loads numba (tests/test_startup.py)."""
    from conv3d_cli.engine import jit
    monkeypatch.setattr(jit, "MIN_COMPILED_FLOPS", 0)


def pytest_unconfigure(config):
    import shutil
    shutil.rmtree(_KERAS_HOME, ignore_errors=True)
