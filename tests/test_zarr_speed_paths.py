"""Zarr outputs chunked finer than the tiles (conv3d_cli/io/zarr_io.py, split_chunks): every
chunk still has one writer, and runs give the reference's values whatever the split."""

import math

import numpy as np
import pytest

from conftest import assert_close
from conv3d_cli import Conv3D
from conv3d_cli.api import apply_to_file
from conv3d_cli.io import zarr_io
from reference import conv3d as ref_conv3d

zarr = pytest.importorskip("zarr", reason="zarr is part of the test extra")


@pytest.mark.parametrize("tile", [(254, 254, 254), (64, 254, 254), (1, 60, 90, 35, 8),
                                  (127, 127, 127, 8), (5, 6, 7, 2), (4096, 4096, 4096), (1,)])
def test_split_chunks_divide_the_tile_and_fit_the_bound(tile):
    chunks = zarr_io.split_chunks(tile, np.float32)
    assert all(n % c == 0 for n, c in zip(tile, chunks))
    assert all(n // c in (1, 2, 3, 4, 5, 7) or n // c >= 8 for n, c in zip(tile, chunks))
    fits = math.prod(chunks) * 4 <= zarr_io.CHUNK_BYTES
    assert fits or math.prod(tile) * 4 <= zarr_io.CHUNK_BYTES or chunks != tile
    if math.prod(tile) * 4 <= zarr_io.CHUNK_BYTES:
        assert chunks == tile


def test_split_chunks_examples():
    assert zarr_io.split_chunks((254, 254, 254), np.float32) == (127, 127, 127)
    assert zarr_io.split_chunks((64, 254, 254), np.float32) == (64, 254, 127)
    assert zarr_io.split_chunks((127, 127, 127), np.float32, limit=1 << 20) == (127, 127, 127)
    assert zarr_io.split_chunks((60, 60, 60), np.float64, limit=100_000) == (30, 15, 15)


@pytest.mark.parametrize("workers", [1, 2])
def test_tiles_written_into_several_chunks_each(tmp_path, rng, monkeypatch, workers):
    a = rng.standard_normal((21, 30, 24)).astype(np.float32)
    zarr.create_array(store=str(tmp_path / "in.zarr"), shape=a.shape, chunks=(8, 8, 8),
                      dtype="f4")[:] = a
    layer = Conv3D(2, 3, padding="same")
    layer.build((1, 21, 30, 24, 1))
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    monkeypatch.setattr(zarr_io, "CHUNK_BYTES", 2000)
    report = apply_to_file(layer, str(tmp_path / "in.zarr"), str(tmp_path / "o.zarr"),
                           workers=workers, chunk_shape=(10, 15, 12), progress=False)
    out = zarr.open_array(store=str(tmp_path / "o.zarr"), path="data", mode="r")
    assert report["tiles"] == 3 * 2 * 2
    assert out.chunks != (10, 15, 12, 2)
    assert all(t % c == 0 for t, c in zip((10, 15, 12, 2), out.chunks))
    assert_close(out[...], ref_conv3d(a[None, ..., None], layer.kernel, layer.bias,
                                      padding="same")[0])
