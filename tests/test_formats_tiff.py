"""TIFF stacks and OME-TIFF through tifffile: ZYX[C] pages read in place or page by page,
voxel sizes from OME and ImageJ metadata, outputs read back by tifffile, refusals."""

import os
import sys

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

import reference
from conftest import assert_close
from conv3d_cli import Conv3D
from conv3d_cli.api import apply_to_file
from conv3d_cli.cli.main import cli
from conv3d_cli.io import open_volume, write_volume

tifffile = pytest.importorskip("tifffile")

OME_SIZES = {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 2.0}


def _layer(channels, filters, k=(3, 3, 3), s=(1, 2, 2), padding="same", seed=0):
    rng = np.random.default_rng(seed)
    layer = Conv3D(filters, k, strides=s, padding=padding)
    kernel = rng.standard_normal(k + (channels, filters)).astype(np.float32)
    bias = rng.standard_normal(filters).astype(np.float32)
    layer.set_weights([kernel, bias])
    return layer, kernel.astype(np.float64), bias


def _refusal(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _pixels(tif):
    return tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]


@pytest.mark.parametrize("how", ["contiguous", "zlib", "tiled"])
def test_region_reads(tmp_path, rng, how):
    """ZCYX pages (2 channels) read as (Z, Y, X, C), in place or page by page."""
    x = rng.standard_normal((4, 2, 20, 24)).astype(np.float32)
    extra = {"zlib": {"compression": "zlib"}, "tiled": {"tile": (16, 16)}}.get(how, {})
    tifffile.imwrite(tmp_path / "a.tif", x, photometric="minisblack",
                     metadata={"axes": "ZCYX"}, **extra)
    expected = np.moveaxis(x, 1, -1)
    with open_volume(str(tmp_path / "a.tif")) as vol:
        assert vol.shape == (4, 20, 24, 2) and vol.affine is None
        assert (vol.array.raw is not None) == (how == "contiguous")
        np.testing.assert_array_equal(vol[1:3, 5:17, 3:20, :], expected[1:3, 5:17, 3:20])
        np.testing.assert_array_equal(vol[2, :, 7, 1], expected[2, :, 7, 1])


def test_ome_tiff_in_and_out(tmp_path, rng):
    x = rng.standard_normal((5, 2, 8, 9)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.ome.tif", x, ome=True,
                     metadata={"axes": "ZCYX", **OME_SIZES, "PhysicalSizeZUnit": "nm"})
    with open_volume(str(tmp_path / "a.ome.tif")) as vol:
        assert vol.geometry.units == ("nanometer", "micrometer", "micrometer")
        np.testing.assert_allclose(vol.geometry.voxel_sizes, (2.0, 0.25, 0.5))
    layer, kernel, bias = _layer(2, 3)
    apply_to_file(layer, str(tmp_path / "a.ome.tif"), str(tmp_path / "o.ome.tif"),
                  progress=False)
    with tifffile.TiffFile(tmp_path / "o.ome.tif") as tif:
        series = tif.series[0]
        assert series.axes == "ZCYX" and series.shape == (5, 3, 4, 5)
        assert series.dtype == np.float32
        data = series.asarray()
        pixels = _pixels(tif)
    expected = reference.conv3d(np.moveaxis(x, 1, -1)[None].astype(np.float64), kernel, bias,
                                strides=(1, 2, 2), padding="same")[0]
    assert_close(np.moveaxis(data, 1, -1), expected)
    # Z in nanometres and Y, X in micrometres: written in micrometres, Y and X doubled.
    assert float(pixels["PhysicalSizeX"]) == 1.0 and float(pixels["PhysicalSizeY"]) == 0.5
    assert float(pixels["PhysicalSizeZ"]) == pytest.approx(2e-3)
    assert pixels["PhysicalSizeXUnit"] == pixels["PhysicalSizeZUnit"] == "µm"


def test_imagej_in_and_out(tmp_path, rng):
    x = rng.standard_normal((6, 10, 12)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", x, imagej=True, resolution=(2.0, 4.0),
                     metadata={"axes": "ZYX", "spacing": 3.0, "unit": "um"})
    layer, kernel, bias = _layer(1, 1, s=(2, 2, 2), padding="valid")
    report = apply_to_file(layer, str(tmp_path / "a.tif"), str(tmp_path / "o.tif"),
                           progress=False)
    with tifffile.TiffFile(tmp_path / "o.tif") as tif:
        assert tif.is_imagej
        data, meta = tif.series[0].asarray(), tif.imagej_metadata
        xres = tif.pages[0].tags["XResolution"].value
        yres = tif.pages[0].tags["YResolution"].value
    expected = reference.conv3d(x[None, ..., None].astype(np.float64), kernel, bias,
                                strides=(2, 2, 2))[0, ..., 0]
    assert data.shape == (2, 4, 5)
    assert_close(data, expected)
    assert meta["spacing"] == 6.0 and meta["unit"] == "micron"
    assert xres[1] / xres[0] == pytest.approx(1.0) and yres[1] / yres[0] == pytest.approx(0.5)
    # 'valid' k3 s2: the first output voxel is the centre of the first window, voxel 1.
    assert report["output_notes"] == ["TIFF holds voxel sizes only: the input's origin and "
                                      "orientation are not kept in OUTPUT"]


def test_nifti_to_tiff_keeps_voxel_sizes(tmp_path, rng):
    affine = np.diag([0.5, 0.8, 2.5, 1.0])
    write_volume(tmp_path / "a.nii", rng.standard_normal((4, 5, 6)).astype(np.float32), affine)
    layer, _, _ = _layer(1, 1, k=(1, 1, 1), s=(1, 1, 1))
    apply_to_file(layer, str(tmp_path / "a.nii"), str(tmp_path / "o.ome.tif"), progress=False)
    with tifffile.TiffFile(tmp_path / "o.ome.tif") as tif:
        pixels = _pixels(tif)
    # Array axes 0, 1, 2 are the TIFF's Z, Y, X.
    assert [float(pixels[f"PhysicalSize{a}"]) for a in "ZYX"] == pytest.approx([0.5, 0.8, 2.5])
    assert pixels["PhysicalSizeXUnit"] == "mm"
    apply_to_file(layer, str(tmp_path / "o.ome.tif"), str(tmp_path / "b.nii"), progress=False)
    img = nib.load(tmp_path / "b.nii", mmap=False)
    np.testing.assert_allclose(img.header.get_zooms(), (0.5, 0.8, 2.5))
    assert img.header.get_xyzt_units()[0] == "mm"


def test_tiff_refusals(tmp_path, rng):
    run = ["--filters", "1", "--kernel-size", "1"]
    x = rng.standard_normal((4, 8, 8)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", x, photometric="minisblack")
    with open(tmp_path / "a.tif", "r+b") as fh:
        fh.truncate(os.path.getsize(tmp_path / "a.tif") - 300)
    message = _refusal(["run", str(tmp_path / "a.tif"), str(tmp_path / "o.tif")] + run)
    assert "a.tif: file is truncated or damaged" in message
    tifffile.imwrite(tmp_path / "flat.tif", x[0])
    assert "flat.tif: expected a TIFF stack of axes Z, Y, X" in _refusal(
        ["info", str(tmp_path / "flat.tif")])
    (tmp_path / "junk.tif").write_bytes(b"II*\0" + b"\xff" * 40)
    assert "junk.tif: not a readable TIFF file" in _refusal(["info", str(tmp_path / "junk.tif")])
    write_volume(tmp_path / "a.npy", rng.standard_normal((2, 3, 4, 5, 1)).astype(np.float32))
    assert "a TIFF output holds one stack" in _refusal(
        ["run", str(tmp_path / "a.npy"), str(tmp_path / "o.tif")] + run)
    assert not os.path.exists(tmp_path / "o.tif")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_missing_tifffile_is_a_one_line_install_hint(tmp_path, monkeypatch):
    (tmp_path / "a.tif").write_bytes(b"II*\0")
    monkeypatch.setitem(sys.modules, "tifffile", None)  # import tifffile raises ImportError
    message = _refusal(["info", str(tmp_path / "a.tif")])
    assert message == ("Error: TIFF volumes need tifffile: pip install tifffile (or pip "
                       "install \".[tiff]\" in the conv3d clone)")


def test_compressed_reads_decode_only_the_pages_a_region_needs(tmp_path, rng, monkeypatch):
    x = rng.standard_normal((10, 3, 8, 8)).astype(np.float32)
    tifffile.imwrite(tmp_path / "a.tif", x, photometric="minisblack", compression="zlib",
                     metadata={"axes": "ZCYX"})
    decoded = []
    for cls in (tifffile.TiffPage, tifffile.TiffFrame):
        original = cls.asarray

        def counted(self, *args, _original=original, **kwargs):
            decoded.append(self.index)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(cls, "asarray", counted)
    with open_volume(str(tmp_path / "a.tif")) as vol:
        block = vol[4:6, 2:5, :, 1:3]
    np.testing.assert_array_equal(block, np.moveaxis(x, 1, -1)[4:6, 2:5, :, 1:3])
    # Pages are Z-major, C-minor: z 4 and 5, channels 1 and 2.
    assert sorted(set(decoded)) == [13, 14, 16, 17]  # (a frame decodes through its page)
