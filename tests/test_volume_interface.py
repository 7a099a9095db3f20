"""One way in and out of every format: open_volume / create_output, the geometry that
travels between them, canonical blocks that never write into a silent copy, and a
format added as one module and one line of the table."""

import math
import os
import re
import sys
import types

import nibabel as nib
import numpy as np
import pytest

from conftest import assert_close
from conv3d_cli import Conv3D
from conv3d_cli.api import apply_to_file
from conv3d_cli.errors import ArgumentError, ShapeError
from conv3d_cli.io import create_output, open_volume, read_volume, registry, write_volume
from conv3d_cli.layout import CanonicalView, Layout
from reference import conv3d as ref_conv3d

zarr = pytest.importorskip("zarr", reason="zarr is part of the test extra")
SOURCE = os.path.join(os.path.dirname(__file__), os.pardir, "conv3d_cli")


def _layer(filters=1, seed=0, **kw):
    layer = Conv3D(filters, 3, **kw)
    layer.build((1, 4, 4, 4, 1))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    return layer


# ------------------------------------------------------------ canonical blocks
def test_parallel_writes_follows_the_writer(tmp_path):
    assert CanonicalView(np.zeros((4, 4, 4)), Layout((4, 4, 4), "channels_last")) \
        .parallel_writes is False  # a forked worker's writes would stay in the worker
    for name, parallel in (("o.npy", True), ("o.nii", True), ("o.h5:/d", False),
                           ("o.zarr", True)):
        with create_output(f"{tmp_path}/{name}", shape=(4, 4, 4), dtype="f4") as writer:
            view = CanonicalView(writer, Layout((4, 4, 4), "channels_last"))
            assert view.parallel_writes is parallel, name
    assert os.listdir(tmp_path) == []  # never committed: nothing left


# ------------------------------------------------- geometry across formats
def _world_of_output(a_in, shape, o, s=2, k=3):
    """World position of output voxel ``o`` of a stride-s 'same' Conv3D, from the input's
    affine: the centre of its window, input voxel o * s + (k - 1) / 2 - pad_before."""
    pad = [max((math.ceil(n / s) - 1) * s + k - n, 0) // 2 for n in shape]
    i = [oo * s + (k - 1) / 2 - p for oo, p in zip(o, pad)]
    return a_in[:3, :3] @ i + a_in[:3, 3]


def test_nifti_to_zarr_writes_ome_transforms(tmp_path, rng):
    a = rng.standard_normal((9, 8, 7, 2)).astype(np.float32)
    affine = np.array([[-1.5, 0, 0, 40], [0, 2.0, 0, -12], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    img = nib.Nifti1Image(a, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, tmp_path / "in.nii.gz")
    layer = Conv3D(3, 3, strides=2, padding="same")
    layer.build((1, 9, 8, 7, 2))
    report = apply_to_file(layer, str(tmp_path / "in.nii.gz"), str(tmp_path / "o.zarr"),
                           progress=False)
    root = zarr.open_group(store=str(tmp_path / "o.zarr"), mode="r")
    assert root.metadata.zarr_format == 3
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    # NGFF puts channels before space: the output is (F, X, Y, Z), axes named by world axis.
    assert [(ax["name"], ax["type"]) for ax in ms["axes"]] == \
        [("c", "channel"), ("x", "space"), ("y", "space"), ("z", "space")]
    assert [ax.get("unit") for ax in ms["axes"][1:]] == ["millimeter"] * 3
    data = zarr.open_array(store=str(tmp_path / "o.zarr"), path="data", mode="r")[...]
    expected = ref_conv3d(a[None], layer.kernel, layer.bias, strides=(2, 2, 2),
                          padding="same")[0]
    assert_close(data, np.moveaxis(expected, -1, 0))
    assert report["file_output_shape"] == [3, 5, 4, 4] and report["output_notes"] == []
    t = {x["type"]: x[x["type"]] for x in ms["datasets"][0]["coordinateTransformations"]}
    for o in [(0, 0, 0), (4, 3, 2), (2, 1, 3)]:
        world = [s * i + tr for s, i, tr in zip(t["scale"][1:], o, t["translation"][1:])]
        np.testing.assert_allclose(world, _world_of_output(affine, (9, 8, 7), o))
    with open_volume(str(tmp_path / "o.zarr")) as vol:  # read back: the same placement
        assert vol.geometry.kind == "ome" and vol.axes == "channels_first"
        np.testing.assert_allclose(vol.geometry.affine[:3, 3], _world_of_output(
            affine, (9, 8, 7), (0, 0, 0)))


def test_oblique_nifti_to_zarr_is_a_plain_array_and_says_so(tmp_path, rng):
    a = rng.standard_normal((6, 7, 8)).astype(np.float32)
    oblique = np.array([[1.9, 0.4, 0.0, -30.0], [-0.35, 2.1, 0.3, 12.0],
                        [0.1, -0.25, 2.5, 4.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(a, oblique), tmp_path / "in.nii")
    report = apply_to_file(_layer(padding="same"), str(tmp_path / "in.nii"),
                           str(tmp_path / "o.zarr"), progress=False)
    assert len(report["output_notes"]) == 1 and "oblique" in report["output_notes"][0]
    root = zarr.open_group(store=str(tmp_path / "o.zarr"), mode="r")
    assert "ome" not in root.attrs and "multiscales" not in root.attrs
    assert root["data"].shape == (6, 7, 8)


def test_ome_zarr_to_nifti_keeps_the_placement(tmp_path, rng):
    a = rng.standard_normal((7, 6, 5)).astype(np.float32)  # z, y, x
    root = zarr.open_group(store=str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=a.shape, chunks=a.shape, dtype="f4")[...] = a
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"], "datasets": [
        {"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [2.0, 0.5, 0.25]},
            {"type": "translation", "translation": [10.0, 20.0, 30.0]}]}]}]
    apply_to_file(_layer(padding="same", strides=2), str(tmp_path / "img.zarr"),
                  str(tmp_path / "o.nii"), progress=False)
    img = nib.load(tmp_path / "o.nii")
    # Array axis 0 is z, 2 is x: world x = 0.25 * v[2] + 30, y = 0.5 * v[1] + 20, z = 2 * v[0] + 10.
    a_in = np.array([[0, 0, 0.25, 30.0], [0, 0.5, 0, 20.0], [2.0, 0, 0, 10.0], [0, 0, 0, 1]])
    assert img.header.get_xyzt_units()[0] == "micron"
    for o in [(0, 0, 0), (3, 2, 1)]:
        np.testing.assert_allclose(img.affine[:3, :3] @ o + img.affine[:3, 3],
                                   _world_of_output(a_in, (7, 6, 5), o))


def test_channels_first_array_to_nifti(tmp_path, rng):
    """A channels-first volume written as NIfTI: the output is (X, Y, Z, C), as NIfTI
    wants, whatever the input's layout (this failed with a broadcast error)."""
    a = rng.standard_normal((2, 6, 7, 8)).astype(np.float32)  # c, d, h, w
    np.save(tmp_path / "in.npy", a)
    layer = Conv3D(3, 3, padding="same", data_format="channels_first")
    layer.build((1, 2, 6, 7, 8))
    report = apply_to_file(layer, str(tmp_path / "in.npy"), str(tmp_path / "o.nii"),
                           progress=False)
    expected = ref_conv3d(a[None], layer.kernel, layer.bias, padding="same",
                          data_format="channels_first")[0]
    assert report["file_output_shape"] == [6, 7, 8, 3]
    assert_close(nib.load(tmp_path / "o.nii").get_fdata(), np.moveaxis(expected, 0, -1))


def test_nifti_refuses_more_than_one_volume_before_writing(tmp_path, rng):
    np.save(tmp_path / "in.npy", rng.standard_normal((2, 5, 5, 5, 1)).astype(np.float32))
    with pytest.raises(ShapeError, match=re.escape(
            "o.nii: a NIfTI output holds one volume (X, Y, Z[, C]); this output has "
            "shape (2, 5, 5, 5, 1)")):
        apply_to_file(_layer(padding="same"), str(tmp_path / "in.npy"),
                      str(tmp_path / "o.nii"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in.npy"]


# ------------------------------------------------------------------ resume
def test_resumable_writer_records_tiles_and_done(tmp_path):
    spec = f"{tmp_path}/o.zarr"
    record = {"input": "x", "tiles": [[0, 1, [[0, 2], [0, 4], [0, 4]]],
                                      [0, 1, [[2, 4], [0, 4], [0, 4]]]]}
    w = create_output(spec, shape=(4, 4, 4), dtype="f4", chunks=(2, 4, 4),
                      resume_record=record)
    assert w.recorded_tiles is None and w.done_tiles() == set()
    w[0:2] = 1.0
    w.mark_done(0)
    kept = w.abort()
    assert kept and "o.zarr.partial is kept" in kept
    with pytest.raises(ArgumentError, match="written by another job"):
        create_output(spec, shape=(4, 4, 4), dtype="f4", resume_record={"input": "y"},
                      resume=True)
    w = create_output(spec, shape=(4, 4, 4), dtype="f4", resume_record=record, resume=True)
    assert w.recorded_tiles == ((0, 1, ((0, 2), (0, 4), (0, 4))),
                                (0, 1, ((2, 4), (0, 4), (0, 4))))
    assert w.done_tiles() == {0}
    w[2:4] = 2.0
    w.commit()
    np.testing.assert_array_equal(read_volume(spec)[0][:, 0, 0], [1, 1, 2, 2])
    assert sorted(os.listdir(tmp_path)) == ["o.zarr"]
    with pytest.raises(ArgumentError, match="--resume needs a Zarr OUTPUT"):
        create_output(f"{tmp_path}/o.npy", shape=(4, 4, 4), dtype="f4", resume=True)
    assert sorted(os.listdir(tmp_path)) == ["o.zarr"]


# ------------------------------------------------------- adding a format
_RAW = '''
"""A test format: a .npy under another name (one module, one line of the table)."""
from conv3d_cli.io import npy


def open_volume(spec, header_only=False, tmp_dir=None):
    return npy.open_volume(spec, header_only, tmp_dir)


class Writer(npy.Writer):
    pass
'''


def test_a_format_is_one_module_and_one_line(tmp_path, rng, monkeypatch):
    mod = types.ModuleType("conv3d_tests.rawformat")
    exec(_RAW, mod.__dict__)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    # The module exists in this process only: workers must be forked from it (not
    # started by a forkserver, as they are once other threads run here).
    monkeypatch.setenv("CONV3D_START_METHOD", "fork")
    line = registry.Format("raw", (".rawvol",), "raw", registry.FLOATS, module=mod.__name__)
    monkeypatch.setattr(registry, "FORMATS", registry.FORMATS + [line])
    monkeypatch.setitem(registry.BY_NAME, "raw", line)
    monkeypatch.setitem(registry.BY_EXTENSION, ".rawvol", line)
    a = rng.standard_normal((6, 7, 8)).astype(np.float32)
    write_volume(tmp_path / "in.rawvol", a)
    layer = _layer(padding="same")
    apply_to_file(layer, str(tmp_path / "in.rawvol"), str(tmp_path / "out.rawvol"),
                  progress=False, workers=2, chunk_shape=(3, 4, 4))
    expected = ref_conv3d(a[None, ..., None], layer.kernel, layer.bias, padding="same")
    assert_close(read_volume(str(tmp_path / "out.rawvol"))[0], expected[0, ..., 0])


def test_running_a_layer_asks_no_format_question():
    with open(os.path.join(SOURCE, "apply.py")) as fh:
        text = fh.read()
    assert not re.search(r"format ==|zarr|nifti|hdf5|npy", text)
    for name in ("execute.py", "distributed.py"):
        with open(os.path.join(SOURCE, "engine", name)) as fh:
            assert "single_writer" not in fh.read()
