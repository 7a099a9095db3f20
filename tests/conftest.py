import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def assert_close(actual, expected, rtol=1e-4):
    """Float32 agreement: relative to the output's scale (Keras's own rounding)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
