"""FreeSurfer MGH/MGZ and Analyze/NIfTI-1 pairs (.hdr/.img): nibabel's own example files,
round trips, geometry read back by nibabel, and one-line refusals."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from test_nifti_files import conv_map, nibabel_file

import reference
from conftest import assert_close
from conv3d_cli import Conv3D
from conv3d_cli.api import apply_to_file
from conv3d_cli.cli.main import cli
from conv3d_cli.io import open_volume, read_volume, write_volume


def _layer(channels, filters, k, s, padding, seed=0):
    rng = np.random.default_rng(seed)
    layer = Conv3D(filters, k, strides=s, padding=padding)
    kernel = rng.standard_normal(k + (channels, filters)).astype(np.float32)
    bias = rng.standard_normal(filters).astype(np.float32)
    layer.set_weights([kernel, bias])
    return layer, kernel, bias


def load(path):
    """The image at ``path`` by nibabel (an MGH from its bytes: nibabel's loader leaves
    the file open)."""
    path = str(path)
    if path.endswith((".mgh", ".mgz")):
        with (gzip.open if path.endswith(".mgz") else open)(path, "rb") as fh:
            return nib.MGHImage.from_bytes(fh.read())
    return nib.load(path, mmap=False)


def run_and_check(src, dst, filters, k, s, padding, scale=1.0):
    """Run over ``src`` into ``dst``; check values and affine with nibabel (the world in
    units ``scale`` times the input's); the output image."""
    img_in = load(src)
    x = img_in.get_fdata()
    channels = x.shape[3] if x.ndim == 4 else 1
    layer, kernel, bias = _layer(channels, filters, k, s, padding)
    apply_to_file(layer, src, dst, progress=False)
    y = reference.conv3d(x.reshape(x.shape[:3] + (channels,))[None], kernel.astype(np.float64),
                         bias, strides=s, padding=padding)[0]
    if x.ndim == 3 and filters == 1:
        y = y[..., 0]
    img = load(dst)
    assert_close(img.get_fdata(), y)
    m = conv_map(img_in.shape, k, s, padding)
    expected = img_in.affine @ m
    expected[:3] *= scale
    np.testing.assert_allclose(img.affine, expected, atol=1e-4 * scale)
    return img


# --- MGH ---------------------------------------------------------------------

@pytest.mark.parametrize("out", ["o.mgz", "o.mgh", "o.nii.gz"])
def test_mgz_example_file(tmp_path, out):
    """nibabel's test.mgz: 4-D (2 frames as channels), oblique, big-endian float32."""
    src = nibabel_file("test.mgz")
    img = run_and_check(src, str(tmp_path / out), 3, (3, 3, 3), (1, 2, 1), "same")
    assert img.shape == (3, 2, 5, 3)
    if out.endswith((".mgz", ".mgh")):
        assert isinstance(img, nib.MGHImage)
        assert img.get_data_dtype() == np.dtype(">f4")
        # The acquisition parameters of the footer are kept.
        assert float(img.header["tr"]) == float(load(src).header["tr"])


def test_nifti_to_mgh_and_back(tmp_path, rng):
    """A NIfTI in micrometres becomes an MGH in millimetres; the voxels stay where they were."""
    affine = np.array([[0, 0, 2.0, 10], [0, -0.5, 0, 20], [1.5, 0, 0, -5], [0, 0, 0, 1]])
    img = nib.Nifti1Image(rng.standard_normal((6, 5, 4)).astype(np.float32), affine)
    img.header.set_xyzt_units("micron")
    nib.save(img, tmp_path / "in.nii")
    # nibabel reads the NIfTI affine in its own units (micrometres); MGH holds millimetres.
    run_and_check(str(tmp_path / "in.nii"), str(tmp_path / "o.mgh"), 1, (3, 3, 3),
                  (1, 1, 1), "same", scale=1e-3)
    run_and_check(str(tmp_path / "o.mgh"), str(tmp_path / "o.nii"), 1, (1, 1, 1),
                  (1, 1, 1), "same")


def test_mgh_round_trip(tmp_path, rng):
    x = rng.standard_normal((4, 5, 6, 2)).astype(np.float32)
    affine = np.diag([-1.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [4, 5, 6]
    write_volume(tmp_path / "a.mgz", x, affine)
    y, back = read_volume(str(tmp_path / "a.mgz"))
    np.testing.assert_array_equal(y, x)
    np.testing.assert_allclose(back, affine, atol=1e-5)
    np.testing.assert_allclose(load(tmp_path / "a.mgz").affine, affine, atol=1e-5)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_mgh_float64_result_is_float32_with_a_note(tmp_path, rng):
    write_volume(tmp_path / "a.mgh", rng.standard_normal((4, 4, 4)).astype(np.float32),
                 np.eye(4))
    layer, _, _ = _layer(1, 1, (3, 3, 3), (1, 1, 1), "same")
    layer = Conv3D.from_config({**layer.get_config(), "dtype": "float64"})
    layer.build((None, 4, 4, 4, 1))
    report = apply_to_file(layer, str(tmp_path / "a.mgh"), str(tmp_path / "o.mgh"),
                           progress=False)
    assert load(tmp_path / "o.mgh").get_data_dtype() == np.dtype(">f4")
    assert report["output_dtype_note"] == ("MGH cannot store float64: the results are "
                                           "rounded to float32")


def _refusal(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def open_bytes(path):
    with open(path, "rb") as fh:
        return fh.read()


def _run(src, out=None):
    out = out or os.path.join(os.path.dirname(src), "out.npy")
    return ["run", str(src), str(out), "--filters", "1", "--kernel-size", "1"]


def test_mgh_refusals(tmp_path):
    src = nibabel_file("test.mgz")
    with gzip.open(src) as fh:
        raw = fh.read()
    (tmp_path / "short.mgh").write_bytes(raw[:300])
    assert "short.mgh: file is truncated" in _refusal(_run(tmp_path / "short.mgh"))
    (tmp_path / "junk.mgz").write_bytes(b"\x1f\x8b" + b"junk" * 50)
    assert "junk.mgz: not a valid MGH file" in _refusal(["info", str(tmp_path / "junk.mgz")])
    (tmp_path / "cut.mgz").write_bytes(open_bytes(src)[:200])
    message = _refusal(["run", str(tmp_path / "cut.mgz"), str(tmp_path / "o.mgz"),
                        "--filters", "1", "--kernel-size", "1"])
    assert "cut.mgz" in message
    assert not os.path.exists(tmp_path / "o.mgz")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


# --- Analyze and NIfTI-1 pairs ------------------------------------------------

def _pair(tmp_path, name, rng):
    """nibabel's header ``name`` (.hdr), cut to a small grid (its origin, scale factor and
    byte order kept), with an .img of random voxels beside it."""
    img = nib.load(nibabel_file(name))
    header = img.header.copy()
    shape = (9, 11, 7) + (1,) * (len(header.get_data_shape()) - 3)
    header.set_data_shape(shape)
    # nibabel moves the scaling into the data proxy on load: put it back.
    header.set_slope_inter(img.dataobj.slope if img.dataobj.slope != 1 else 0.5,
                           None if name == "analyze.hdr" else 2.0)
    hdr = str(tmp_path / name)
    with open(hdr, "wb") as fh:
        header.write_to(fh)
    values = rng.integers(0, 100, size=int(np.prod(shape)))
    np.asarray(values, dtype=header.get_data_dtype()).tofile(hdr[:-4] + ".img")
    return hdr


@pytest.mark.parametrize("name", ["analyze.hdr", "nifti1.hdr"])
@pytest.mark.parametrize("out", ["o.hdr", "o.nii"])
def test_analyze_pairs(tmp_path, rng, name, out):
    """SPM2 Analyze (origin, scale factor 1715.04) and a NIfTI-1 pair (sform, scaled), in
    and out."""
    src = _pair(tmp_path, name, rng)
    img = run_and_check(src, str(tmp_path / out), 2, (3, 3, 3), (2, 2, 2), "same")
    if out == "o.hdr":
        assert isinstance(img, nib.Nifti1Pair) and img.header["magic"] == b"ni1"
        assert os.path.exists(tmp_path / "o.img")
    # The input's scale factor is applied on read: the values are the scaled ones.
    slope = load(src).dataobj.slope
    assert slope == (1715.0445556640625 if name == "analyze.hdr" else 0.5)
    with open_volume(src) as vol:
        expected = load(src).get_fdata().reshape(vol.shape)
        np.testing.assert_allclose(vol[:, :, :], expected, rtol=1e-6)


def test_analyze_round_trip_by_img_name(tmp_path, rng):
    x = rng.standard_normal((5, 4, 3)).astype(np.float64)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    write_volume(tmp_path / "p.img", x, affine)
    img = nib.load(tmp_path / "p.hdr", mmap=False)
    np.testing.assert_array_equal(img.get_fdata(), x)
    np.testing.assert_allclose(img.affine, affine)
    y, back = read_volume(str(tmp_path / "p.hdr"))
    np.testing.assert_array_equal(y, x)


def test_analyze_refusals(tmp_path, rng):
    src = _pair(tmp_path, "analyze.hdr", rng)
    img = src[:-4] + ".img"
    with open(img, "r+b") as fh:
        fh.truncate(100)
    assert "analyze.img: file is truncated" in _refusal(_run(src))
    os.unlink(img)
    assert "analyze.img: no such file" in _refusal(_run(src))
    (tmp_path / "junk.hdr").write_bytes(b"\0" * 20)
    assert "junk.hdr: not a valid Analyze" in _refusal(["info", str(tmp_path / "junk.hdr")])
    # An output pair is refused whole when either file exists.
    (tmp_path / "o.img").write_bytes(b"keep")
    message = _refusal(["run", str(tmp_path / "nifti1.hdr"), str(tmp_path / "o.hdr"),
                        "--filters", "1", "--kernel-size", "1"])
    assert "o.img exists" in message
    assert (tmp_path / "o.img").read_bytes() == b"keep"
