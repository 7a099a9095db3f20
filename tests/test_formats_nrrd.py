"""NRRD through pynrrd: LPS geometry by hand, raw/gzip/detached data, round trips read
back by pynrrd and nibabel, and one-line refusals."""

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
from conv3d_cli.io import open_volume, read_volume, write_volume

nrrd = pytest.importorskip("nrrd")

# An LPS volume as 3D Slicer writes it: voxel (i, j, k) lies at LPS
# (10 + 1 i, 20 + 2 j, 30 + 3 k), i.e. at RAS (-10 - i, -20 - 2 j, 30 + 3 k).
LPS = {"space": "left-posterior-superior", "space directions": np.diag([1.0, 2.0, 3.0]),
       "space origin": np.array([10.0, 20.0, 30.0])}
RAS_BY_HAND = np.array([[-1.0, 0, 0, -10], [0, -2, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]])


def _layer(channels, filters, k=(3, 3, 3), s=(2, 2, 2), padding="same", seed=0):
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


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_lps_geometry_by_hand(tmp_path, rng, encoding):
    x = rng.standard_normal((5, 6, 7)).astype(np.float32)
    nrrd.write(str(tmp_path / "a.nrrd"), x, {**LPS, "encoding": encoding})
    with open_volume(str(tmp_path / "a.nrrd")) as vol:
        np.testing.assert_allclose(vol.affine, RAS_BY_HAND)
        assert vol.geometry.units == ("millimeter",) * 3
        np.testing.assert_array_equal(vol[:, :, :], x)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_run_into_nrrd_read_back_by_pynrrd(tmp_path, rng):
    """Conv3D k3 s2 'same' over 5x6x7: output voxel o sits at input voxel 2 o + 1 - pad."""
    x = rng.standard_normal((5, 6, 7)).astype(np.float32)
    nrrd.write(str(tmp_path / "a.nrrd"), x, {**LPS, "encoding": "gzip"})
    layer, kernel, bias = _layer(1, 2)
    apply_to_file(layer, str(tmp_path / "a.nrrd"), str(tmp_path / "o.nrrd"), progress=False)
    data, header = nrrd.read(str(tmp_path / "o.nrrd"))
    expected = reference.conv3d(x[None, ..., None].astype(np.float64), kernel, bias,
                                strides=(2, 2, 2), padding="same")[0]
    assert data.shape == (3, 3, 4, 2) and data.dtype == np.float32
    assert_close(data, expected)
    # o -> 2 o + (3 - 1) / 2 - pad_before; pads before: (2*2 + 3 - 5) // 2 = 1,
    # (2*2 + 3 - 6) // 2 = 0, (3*2 + 3 - 7) // 2 = 1: shifts 0, 1, 0 input voxels.
    shift = np.array([0.0, 1.0, 0.0])
    np.testing.assert_allclose(header["space directions"][:3], np.diag([2.0, 4.0, 6.0]))
    assert np.isnan(header["space directions"][3]).all()
    np.testing.assert_allclose(header["space origin"], [10, 20, 30] + shift * [1, 2, 3])
    assert header["space"] == "left-posterior-superior"
    assert header["kinds"] == ["domain", "domain", "domain", "vector"]


def test_channels_first_and_detached(tmp_path, rng):
    """A vector axis first (as Slicer writes a displacement field), data in a .raw file."""
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    directions = np.vstack([np.full(3, np.nan), np.diag([1.0, 1.0, 2.0])])
    nrrd.write(str(tmp_path / "v.nhdr"), x, {"space": "RAS", "space directions": directions,
                                              "kinds": ["vector", "domain", "domain", "domain"],
                                              "encoding": "raw"},
               detached_header=True)
    layer, kernel, bias = _layer(2, 1, k=(3, 3, 3), s=(1, 1, 1))
    apply_to_file(layer, str(tmp_path / "v.nhdr"), str(tmp_path / "o.nii"), progress=False)
    img = nib.load(tmp_path / "o.nii", mmap=False)
    expected = reference.conv3d(np.moveaxis(x, 0, -1)[None].astype(np.float64), kernel, bias,
                                padding="same")[0]
    assert_close(img.get_fdata(), expected)
    np.testing.assert_allclose(img.affine, np.diag([1.0, 1.0, 2.0, 1.0]))


def test_oblique_nifti_to_nrrd_and_back(tmp_path, rng):
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[c * 2, -s, 0, 5], [s * 2, c, 0, -7], [0, 0, 1.5, 9], [0, 0, 0, 1]])
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    write_volume(tmp_path / "a.nii", x, affine)
    layer, _, _ = _layer(1, 1, k=(1, 1, 1), s=(1, 1, 1))
    apply_to_file(layer, str(tmp_path / "a.nii"), str(tmp_path / "o.nrrd"), progress=False)
    apply_to_file(layer, str(tmp_path / "o.nrrd"), str(tmp_path / "b.nii"), progress=False)
    np.testing.assert_allclose(nib.load(tmp_path / "b.nii").affine, affine, atol=1e-6)
    y, back = read_volume(str(tmp_path / "o.nrrd"))
    np.testing.assert_allclose(back, affine, atol=1e-12)


def test_nrrd_refusals(tmp_path, rng):
    x = rng.standard_normal((5, 6, 7)).astype(np.float32)
    run = ["--filters", "1", "--kernel-size", "1"]
    nrrd.write(str(tmp_path / "a.nrrd"), x, {**LPS, "encoding": "raw"})
    size = os.path.getsize(tmp_path / "a.nrrd")
    with open(tmp_path / "a.nrrd", "r+b") as fh:
        fh.truncate(size - 10)
    assert "a.nrrd: file is truncated" in _refusal(["run", str(tmp_path / "a.nrrd"),
                                                   str(tmp_path / "o.npy")] + run)
    nrrd.write(str(tmp_path / "g.nrrd"), x, {**LPS, "encoding": "gzip"})
    with open(tmp_path / "g.nrrd", "r+b") as fh:
        fh.truncate(os.path.getsize(tmp_path / "g.nrrd") - 100)
    assert "g.nrrd: corrupt or truncated gzip" in _refusal(["run", str(tmp_path / "g.nrrd"),
                                                           str(tmp_path / "o.npy")] + run)
    nrrd.write(str(tmp_path / "b.nrrd"), x, {**LPS, "encoding": "bzip2"})
    assert "bzip2 encoding is not read" in _refusal(["info", str(tmp_path / "b.nrrd")])
    (tmp_path / "j.nrrd").write_bytes(b"NRRD0004\ntype: complex\n\n")
    assert "j.nrrd: not a valid NRRD file" in _refusal(["info", str(tmp_path / "j.nrrd")])
    assert not os.path.exists(tmp_path / "o.npy")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_missing_pynrrd_is_a_one_line_install_hint(tmp_path, monkeypatch):
    (tmp_path / "a.nrrd").write_bytes(b"NRRD0004\n")
    monkeypatch.setitem(sys.modules, "nrrd", None)  # import nrrd raises ImportError
    message = _refusal(["info", str(tmp_path / "a.nrrd")])
    assert message == ("Error: NRRD volumes need pynrrd: pip install pynrrd (or pip install "
                       "\".[nrrd]\" in the conv3d clone)")


@pytest.mark.parametrize("field,expected", [
    ("space: LPS\nspace directions: (1,0,0) (0,1,0)", "'space directions' has 2 vectors"),
    ("byte skip: -5", "not a valid NRRD file (byte skip -5)"),
    ("data file: ../../etc/passwd", "data file '../../etc/passwd' is outside the header's "
                                    "folder; not followed"),
    ("data file: /etc/passwd", "is outside the header's folder"),
])
def test_hostile_headers(tmp_path, field, expected):
    text = f"NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2 2\n{field}\nendian: little\n" \
           "encoding: raw\n\n"
    (tmp_path / "h.nrrd").write_bytes(text.encode() + bytes(32))
    assert expected in _refusal(["info", str(tmp_path / "h.nrrd"), "--stats"])
