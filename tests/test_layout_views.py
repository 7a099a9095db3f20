"""Canonical blocks in and out of in-memory arrays: a view where NumPy gives one,
never a silent copy that loses the blocks written into it."""

import numpy as np

from conv3d_cli.layout import CanonicalView, Layout


def test_writes_into_an_array_whose_batch_dims_do_not_flatten_are_not_lost():
    """x[:, :3] of a Keras-layout array cannot flatten its batch dims into a view;
    reshape would copy, and blocks written into the copy would vanish."""
    base = np.zeros((2, 6, 4, 5, 3, 2), np.float32)
    out = base[:, :3]
    view = CanonicalView(out, Layout(out.shape, "channels_last"))
    block = np.arange(6 * 4 * 5 * 3 * 2, dtype=np.float32).reshape(6, 4, 5, 3, 2)
    view.write(0, 6, [(0, 4), (0, 5), (0, 3)], block)
    np.testing.assert_array_equal(out.reshape(6, 4, 5, 3, 2), block)
    region = view.region_view(0, 6, [(0, 4), (0, 5), (0, 3)])
    if region is not None:  # where a view is given, it must be one
        region[...] = -1
        assert (out == -1).all()
    np.testing.assert_array_equal(view.read(1, 3, [(1, 3), (0, 5), (0, 3)]),
                                  out.reshape(6, 4, 5, 3, 2)[1:3, 1:3])


def test_contiguous_batches_are_still_computed_in_place():
    out = np.zeros((2, 3, 4, 4, 4, 1), np.float32)
    view = CanonicalView(out, Layout(out.shape, "channels_last"))
    region = view.region_view(1, 4, [(0, 2), (0, 4), (1, 3)])
    region[...] = 7
    assert (out.reshape(6, 4, 4, 4, 1)[1:4, 0:2, :, 1:3] == 7).all() and out.sum() == 7 * 48
