"""Pure shape math against Keras's formulas (``keras/src/ops/operation_utils.py``,
``keras/src/backend/common/backend_utils.py``), written out here independently."""

import itertools
import math

import pytest

from conv3d_cli import shapes
from conv3d_cli.errors import ShapeError


@pytest.mark.parametrize("n,k,s,d",
                         list(itertools.product([1, 5, 8, 13], [1, 2, 3, 4], [1, 2, 3], [1, 2])))
def test_conv_lengths_and_same_split(n, k, s, d):
    ke = (k - 1) * d + 1
    assert shapes.conv_output_length(n, k, s, d, "valid") == math.floor((n - ke) / s) + 1
    out = math.ceil(n / s)
    assert shapes.conv_output_length(n, k, s, d, "same") == out
    total = max((out - 1) * s + ke - n, 0)
    assert shapes.conv_padding(n, k, s, d, "same") == (total // 2, total - total // 2)
    assert shapes.conv_padding(n, k, s, d, "valid") == (0, 0)


@pytest.mark.parametrize("n,k,s,d",
                         list(itertools.product([1, 4, 7], [1, 2, 3, 5], [1, 2, 3], [1, 2])))
def test_transpose_lengths_and_crops(n, k, s, d):
    ke = (k - 1) * d + 1
    assert shapes.transpose_output_length(n, k, s, d, "valid") == (
        (n - 1) * s + ke + max(ke, s) - ke)
    assert shapes.transpose_crop_left(k, s, d, "valid") == 0
    assert shapes.transpose_output_length(n, k, s, d, "same") == n * s
    assert shapes.transpose_crop_left(k, s, d, "same") == max((ke - s) // 2, 0)
    for op in range(s):
        assert shapes.transpose_output_length(n, k, s, d, "valid", op) == (n - 1) * s + ke + op
        assert shapes.transpose_output_length(n, k, s, d, "same", op) == (n - 1) * s + ke % 2 + op
        assert shapes.transpose_crop_left(k, s, d, "same", op) == max(
            ke // 2 - math.ceil(op / 2), 0)


def test_even_kernel_same_output_padding_zero_shrinks_like_keras():
    assert shapes.transpose_output_length(10, 2, 1, 1, "same", 0) == 9


@pytest.mark.parametrize("kind", [shapes.CONV, shapes.TRANSPOSE])
@pytest.mark.parametrize("n,k,s,d,padding", [
    (9, 3, 1, 1, "same"), (10, 4, 2, 1, "same"), (7, 3, 1, 2, "valid"), (11, 5, 3, 1, "same"),
    (6, 1, 3, 1, "valid"), (5, 2, 2, 1, "valid")])
def test_terms_cover_each_output_once_with_in_range_taps(kind, n, k, s, d, padding):
    g = shapes.axis_geometries(kind, (n, n, n), (k,) * 3, (s,) * 3, (d,) * 3, padding)[0]
    for o0, o1 in [(0, g.out), (1, max(2, g.out - 1)), (g.out // 2, g.out)]:
        if o1 <= o0:
            continue
        i0, i1, terms = g.terms(o0, o1)
        covered = []
        for t in terms:
            outs = [t.out_start + q * t.out_step for q in range(t.count)]
            covered += outs
            for q in range(t.count):
                for _, off in t.taps:
                    assert 0 <= t.in_start + off + q * t.in_step < i1 - i0
        if kind == shapes.CONV:
            assert sorted(covered) == list(range(o1 - o0))
        else:  # phases with no taps are absent: their outputs are bias only
            assert len(covered) == len(set(covered)) and all(0 <= c < o1 - o0 for c in covered)


def test_output_shape_errors_with_keras_wording():
    with pytest.raises(ShapeError, match="Computed output size would be zero or negative"):
        shapes.output_shape(shapes.CONV, (1, 2, 8, 8, 1), 1, (3, 3, 3), (1, 1, 1), "valid",
                            "channels_last", (1, 1, 1))
    with pytest.raises(ShapeError, match="expected min_ndim=5"):
        shapes.output_shape(shapes.CONV, (8, 8, 8, 1), 1, (3, 3, 3), (1, 1, 1), "valid",
                            "channels_last", (1, 1, 1))


def test_output_shape_layouts():
    args = (4, (3, 3, 3), (2, 2, 2), "same")
    assert shapes.output_shape(shapes.CONV, (2, 9, 9, 9, 3), *args, "channels_last",
                               (1, 1, 1)) == (2, 5, 5, 5, 4)
    assert shapes.output_shape(shapes.CONV, (2, 3, 9, 9, 9), *args, "channels_first",
                               (1, 1, 1)) == (2, 4, 5, 5, 5)
    assert shapes.output_shape(shapes.CONV, (7, 2, 9, 9, 9, 3), *args, "channels_last",
                               (1, 1, 1)) == (7, 2, 5, 5, 5, 4)
