"""NIfTI as written in the wild: nibabel's own example files, header hygiene, odd headers.

Values are checked against an independent path: nibabel's ``get_fdata()`` of
the input, the float64 loop reference of tests/reference.py, and nibabel
reading the output back. Affines are checked against the voxel map written
here from the layer's definition (and by hand for one case), not against
conv3d_cli.geometry.
"""

import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from nibabel.volumeutils import native_code

import reference
from conftest import assert_close
from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.api import apply_to_file
from conv3d_cli.cli.main import cli
from conv3d_cli.errors import VolumeError
from conv3d_cli.io import open_volume, read_volume

DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def nibabel_file(name):
    path = os.path.join(DATA, name)
    if not os.path.exists(path):
        pytest.skip(f"nibabel does not ship {name} here")
    return path


def assert_close_nan(actual, expected):
    """NaN where the reference has NaN (it spreads over each window), close elsewhere."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected))
    finite = ~np.isnan(expected)
    assert_close(actual[finite], expected[finite])


# --- the independent geometry ------------------------------------------------

def conv_map(shape, k, s, padding):
    """Output voxel -> input voxel for Conv3D: o * s + (k - 1) / 2 - pad_before."""
    m = np.eye(4)
    for a in range(3):
        if padding == "same":
            out = math.ceil(shape[a] / s[a])
            before = max((out - 1) * s[a] + k[a] - shape[a], 0) // 2
        else:
            before = 0
        m[a, a] = s[a]
        m[a, 3] = (k[a] - 1) / 2 - before
    return m


def transpose_map(k, s):
    """Output voxel -> input voxel for Conv3DTranspose, padding 'same':
    (o - c) / s with c = (k - 1) / 2 - crop_left, crop_left = max((k - s) // 2, 0)."""
    m = np.eye(4)
    for a in range(3):
        c = (k[a] - 1) / 2 - max((k[a] - s[a]) // 2, 0)
        m[a, a] = 1 / s[a]
        m[a, 3] = -c / s[a]
    return m


def _layer(kind, channels, filters, k, s, padding, seed):
    rng = np.random.default_rng(seed)
    cls = Conv3D if kind == "conv" else Conv3DTranspose
    layer = cls(filters, k, strides=s, padding=padding)
    shape = k + ((channels, filters) if kind == "conv" else (filters, channels))
    kernel = rng.standard_normal(shape).astype(np.float32)
    bias = rng.standard_normal(filters).astype(np.float32)
    layer.set_weights([kernel, bias])
    return layer, kernel, bias


def run_and_reference(src, dst, kind, filters, k, s, padding):
    """Run the layer over ``src`` into ``dst``; (expected values, output image, input image)."""
    img_in = nib.load(src)
    x = img_in.get_fdata()  # float64, scaling applied, any byte order
    channels = x.shape[3] if x.ndim == 4 else 1
    layer, kernel, bias = _layer(kind, channels, filters, k, s, padding, seed=len(src))
    apply_to_file(layer, src, dst, progress=False)
    xk = x.reshape(x.shape[:3] + (channels,))[None]
    if kind == "conv":
        y = reference.conv3d(xk, kernel.astype(np.float64), bias, strides=s, padding=padding)
    else:
        y = reference.conv3d_transpose(xk, kernel.astype(np.float64), bias, strides=s,
                                       padding=padding)
    y = y[0]
    if x.ndim == 3 and filters == 1:
        y = y[..., 0]
    return y, nib.load(dst), img_in


# file, layer kind, filters, kernel, strides, padding, output name
CASES = [
    # NIfTI-1 with two comment extensions, 4-D, oblique, int16, gzipped
    ("example4d.nii.gz", "conv", 2, (3, 3, 1), (4, 4, 2), "same", "o.nii.gz"),
    # NIfTI-2 with extensions, 4-D
    ("example_nifti2.nii.gz", "conv", 3, (3, 3, 3), (2, 2, 2), "same", "o.nii"),
    # big-endian int16, sform and qform code 2
    ("anatomical.nii", "conv", 1, (3, 3, 3), (3, 3, 3), "same", "o.nii"),
    # big-endian float32, upsampled
    ("resampled_anat_moved.nii", "transpose", 1, (3, 3, 3), (2, 2, 2), "same", "o.nii.gz"),
    # 20 time points become 20 channels
    ("functional.nii", "conv", 2, (3, 3, 1), (1, 1, 1), "valid", "o.nii"),
    # uint8, sform only (qform_code 0)
    ("standard.nii.gz", "conv", 1, (3, 3, 3), (1, 2, 1), "same", "o.nii.gz"),
]


@pytest.mark.parametrize("name,kind,filters,k,s,padding,out", CASES)
def test_nibabel_example_files(tmp_path, name, kind, filters, k, s, padding, out):
    src, dst = nibabel_file(name), str(tmp_path / out)
    expected, img, img_in = run_and_reference(src, dst, kind, filters, k, s, padding)
    assert_close_nan(img.get_fdata(), expected)
    hdr, hin = img.header, img_in.header
    assert type(hdr) is type(hin)

    m = conv_map(img_in.shape, k, s, padding) if kind == "conv" else transpose_map(k, s)
    np.testing.assert_allclose(img.affine, img_in.affine @ m, atol=1e-4)
    for form in ("sform", "qform"):
        code = int(hin[f"{form}_code"])
        assert int(hdr[f"{form}_code"]) == code  # 0 stays 0
        if code:
            np.testing.assert_allclose(getattr(hdr, f"get_{form}")(),
                                       getattr(hin, f"get_{form}")() @ m, atol=1e-4)
    np.testing.assert_allclose(hdr.get_zooms()[:3], np.array(hin.get_zooms()[:3]) * np.diag(m)[:3],
                               rtol=1e-6)

    # Extensions copied byte for byte, the data right after them.
    assert [(e.get_code(), e.get_content()) for e in hdr.extensions] == \
        [(e.get_code(), e.get_content()) for e in hin.extensions]
    size = hdr.single_vox_offset + sum(e.get_sizeondisk() for e in hdr.extensions)
    assert img.dataobj.offset == size and size % 16 == 0
    # Native byte order, no display window from the input, no time axis.
    assert hdr.endianness == native_code
    assert hdr.get_data_dtype() == np.dtype(np.float32).newbyteorder("=")
    assert hdr["cal_min"] == 0 and hdr["cal_max"] == 0
    assert hdr.get_xyzt_units()[1] == "unknown"
    if img.ndim == 4:
        assert hdr["pixdim"][4] == 1
    assert hdr["descrip"].tobytes().startswith(b"conv3d Conv3D")


def test_example4d_expected_affine_by_hand(tmp_path):
    """Conv3DTranspose k3 s2 'same': output voxel o sits at input voxel (o - 1) / 2."""
    src = nibabel_file("example4d.nii.gz")
    layer, _, _ = _layer("transpose", 2, 1, (3, 3, 3), (2, 2, 2), "same", seed=0)
    apply_to_file(layer, src, str(tmp_path / "up.nii"), progress=False)
    a = nib.load(src).affine
    m = np.array([[0.5, 0, 0, -0.5], [0, 0.5, 0, -0.5], [0, 0, 0.5, -0.5], [0, 0, 0, 1]])
    np.testing.assert_allclose(transpose_map((3, 3, 3), (2, 2, 2)), m)
    img = nib.load(tmp_path / "up.nii")
    assert img.shape == (256, 192, 48, 1)
    np.testing.assert_allclose(img.affine, a @ m, atol=1e-4)
    # Column norms are the voxel sizes: halved.
    np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0),
                               np.linalg.norm(a[:3, :3], axis=0) / 2, rtol=1e-5)


def test_scaled_int16(tmp_path):
    """scl_slope / scl_inter applied as nibabel does, NIfTI-1 and NIfTI-2."""
    data = np.asanyarray(nib.load(nibabel_file("example4d.nii.gz")).dataobj)[50:70, 30:46, 5:15, 0]
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        h = klass()
        h.set_sform(np.diag([2.0, 2.0, 2.2, 1]), code=1)
        h.set_slope_inter(0.37, -12.5)
        path = str(tmp_path / "s.nii")
        _save_raw(path, h, data.astype(np.int16))
        assert nib.load(path).dataobj.slope == np.float32(0.37)
        got, _ = read_volume(path)
        assert got.dtype == np.float32
        assert_close(got, nib.load(path).get_fdata())
        expected, out, _ = run_and_reference(path, str(tmp_path / "o.nii"),
                                             "conv", 1, (3, 3, 3), (2, 2, 1), "same")
        assert_close(out.get_fdata(), expected)
        assert type(out.header) is klass
        assert out.header.get_slope_inter() == (None, None)  # float data, unscaled
        os.unlink(tmp_path / "o.nii")


# --- sform / qform codes ------------------------------------------------------

OBLIQUE = np.array([[1.9, 0.4, 0.0, -30.0], [-0.35, 2.1, 0.3, 12.0],
                    [0.1, -0.25, 2.5, 4.0], [0, 0, 0, 1]])
ROTATED = np.array([[0.0, -2.0, 0.0, 50.0], [2.0, 0.0, 0.0, -20.0],
                    [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])


def _save_raw(path, header, data):
    """Write ``header`` exactly as given (no nibabel image-level fixes) and ``data``."""
    header = header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["vox_offset"] = 0
    with open(path, "wb") as fh:
        header.write_to(fh)
        fh.write(np.asfortranarray(data).tobytes(order="F"))


def _header(sform=None, scode=0, qform=None, qcode=0, zooms=(2.0, 3.0, 2.5)):
    h = nib.Nifti1Header()
    h.set_data_shape((9, 8, 7))
    h.set_zooms(zooms)
    h.set_sform(sform if sform is not None else np.eye(4), code=scode)
    if qcode:
        h.set_qform(qform, code=qcode)  # pixdim[1:4] become the qform's voxel sizes
    h["qform_code"] = qcode
    return h


@pytest.mark.parametrize("scode,qcode", [(2, 0), (0, 1), (4, 1), (0, 0)])
def test_codes_kept_and_best_affine(tmp_path, rng, scode, qcode):
    """What nibabel (sform if coded, else qform if coded, else pixdim) reads back."""
    data = rng.standard_normal((9, 8, 7)).astype(np.float32)
    _save_raw(tmp_path / "in.nii", _header(OBLIQUE, scode, ROTATED, qcode), data)
    layer, _, _ = _layer("conv", 1, 1, (3, 3, 3), (2, 2, 1), "same", seed=1)
    apply_to_file(layer, str(tmp_path / "in.nii"), str(tmp_path / "out.nii"), progress=False)
    img = nib.load(tmp_path / "out.nii")
    hdr = img.header
    m = conv_map((9, 8, 7), (3, 3, 3), (2, 2, 1), "same")
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (scode, qcode)
    if scode:
        np.testing.assert_allclose(hdr.get_sform(), OBLIQUE @ m, atol=1e-5)
        np.testing.assert_allclose(img.affine, OBLIQUE @ m, atol=1e-5)
    if qcode:
        np.testing.assert_allclose(hdr.get_qform(), ROTATED @ m, atol=1e-5)
        np.testing.assert_allclose(hdr.get_zooms(), (4.0, 4.0, 2.5), rtol=1e-6)
    if qcode and not scode:
        np.testing.assert_allclose(img.affine, ROTATED @ m, atol=1e-5)
    if not scode and not qcode:
        # No world coordinates: the pixdims, scaled by the strides, are all there is.
        np.testing.assert_allclose(hdr.get_zooms(), (4.0, 6.0, 2.5))
        np.testing.assert_allclose(img.affine, np.array([[-4.0, 0, 0, 8], [0, 6, 0, -9],
                                                         [0, 0, 2.5, -7.5], [0, 0, 0, 1]]))
    elif not qcode:
        np.testing.assert_allclose(hdr.get_zooms(), (4.0, 6.0, 2.5), rtol=1e-6)


def test_value_and_time_fields_reset(tmp_path, rng):
    """What described the input's values or time axis is not carried to the output."""
    h = _header(OBLIQUE, 1, ROTATED, 1)
    h.set_intent("z score")
    h.set_xyzt_units("mm", "sec")
    h["toffset"], h["slice_code"], h["slice_end"], h["slice_duration"] = 1.5, 1, 6, 0.1
    h["cal_min"], h["cal_max"] = -3, 3
    h["aux_file"] = b"kept.txt"
    h.set_data_shape((9, 8, 7, 3))
    h["pixdim"][4] = 2.5  # TR
    _save_raw(tmp_path / "in.nii", h, rng.standard_normal((9, 8, 7, 3)).astype(np.float32))
    layer, _, _ = _layer("conv", 3, 2, (3, 3, 3), (1, 1, 1), "same", seed=3)
    apply_to_file(layer, str(tmp_path / "in.nii"), str(tmp_path / "out.nii"), progress=False)
    hdr = nib.load(tmp_path / "out.nii").header
    assert hdr.get_intent()[0] == "none"
    assert hdr.get_xyzt_units() == ("mm", "unknown")
    assert hdr.get_zooms()[3] == 1
    for field in ("toffset", "slice_code", "slice_end", "slice_duration", "cal_min", "cal_max"):
        assert hdr[field] == 0, field
    assert hdr["aux_file"].tobytes().rstrip(b"\0") == b"kept.txt"


def test_nan_sform_falls_back_to_the_qform(tmp_path, rng):
    bad = OBLIQUE.copy()
    bad[0, 0] = np.nan
    data = rng.standard_normal((9, 8, 7)).astype(np.float32)
    _save_raw(tmp_path / "in.nii", _header(bad, 1, ROTATED, 1), data)
    vol = open_volume(str(tmp_path / "in.nii"))
    np.testing.assert_allclose(vol.affine, nib.load(tmp_path / "in.nii").header.get_qform())
    vol.close()
    layer, _, _ = _layer("conv", 1, 1, (3, 3, 3), (2, 2, 1), "same", seed=1)
    apply_to_file(layer, str(tmp_path / "in.nii"), str(tmp_path / "out.nii"), progress=False)
    hdr = nib.load(tmp_path / "out.nii").header
    m = conv_map((9, 8, 7), (3, 3, 3), (2, 2, 1), "same")
    # The unusable sform is not passed on: readers get the qform.
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (0, 1)
    assert np.all(np.isfinite(hdr.get_sform()))
    np.testing.assert_allclose(nib.load(tmp_path / "out.nii").affine, ROTATED @ m, atol=1e-5)


def _degenerate(tmp_path, name, header, shape=(9, 8, 7)):
    path = tmp_path / name
    _save_raw(path, header, np.zeros(shape, np.float32))
    return str(path)


def test_unusable_orientation_is_a_one_line_error(tmp_path):
    nan = OBLIQUE.copy()
    nan[1, 3] = np.inf
    singular = OBLIQUE.copy()
    singular[:3, 2] = 0
    nan_q = _header(None, 0, ROTATED, 1)
    nan_q["quatern_c"] = np.nan
    nan_zoom = _header()
    nan_zoom["pixdim"][2] = np.nan
    cases = {
        "inf_sform.nii": (_header(nan, 1), r"sform \(sform_code 1\) .*not usable"),
        "singular_sform.nii": (_header(singular, 2), r"sform \(sform_code 2\) .*not usable"),
        "nan_qform.nii": (nan_q, r"qform \(qform_code 1\) .*not usable"),
        "nan_pixdim.nii": (nan_zoom, r"voxel sizes"),
    }
    for name, (header, message) in cases.items():
        path = _degenerate(tmp_path, name, header)
        with pytest.raises(VolumeError, match=message) as info:
            open_volume(path)
        assert str(info.value).startswith(path)
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "inf_sform.nii"),
                                      str(tmp_path / "o.nii"), "--filters", "1",
                                      "--kernel-size", "3"])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "inf_sform.nii" in result.output
    assert "Error" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.nii").exists()


def test_empty_or_low_rank_dims(tmp_path):
    h = nib.Nifti1Header()
    for shape, message in [((12,), r"1 dimension"), ((6, 7), r"2 dimensions"),
                           ((6, 0, 4), r"empty"), ((6, 7, 8, 2, 3), r"5 dimensions")]:
        path = tmp_path / f"d{len(shape)}{0 in shape}.nii"
        _save_raw(path, h, np.zeros(shape, np.float32))
        with pytest.raises(VolumeError, match=message):
            open_volume(str(path))
    # dim[0] = 0: no dimensions at all
    h.set_data_shape((5, 5, 5))
    path = tmp_path / "d0.nii"
    _save_raw(path, h, np.zeros((5, 5, 5), np.float32))
    raw = bytearray(path.read_bytes())
    raw[40:42] = np.int16(0).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(VolumeError, match=r"d0\.nii: .*this one has no dimensions"):
        open_volume(str(path))


# --- header extensions --------------------------------------------------------

AFNI_XML = (b"<?xml version='1.0' ?>\n<AFNI_attributes\n  self_idcode=\"XYZ_test\"\n"
            b"  NIfTI_nums=\"9,8,7,1,1,4\"\n  ni_form=\"ni_group\" >\n</AFNI_attributes>\n")


def _with_extensions(tmp_path, rng):
    img = nib.Nifti1Image(rng.standard_normal((9, 8, 7)).astype(np.float32), OBLIQUE)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"acquired on a Tuesday"))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(4, AFNI_XML))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"x" * 37))
    nib.save(img, tmp_path / "ext.nii.gz")
    return str(tmp_path / "ext.nii.gz")


def test_afni_extension_dropped_others_kept(tmp_path, rng):
    src = _with_extensions(tmp_path, rng)
    layer, _, _ = _layer("conv", 1, 1, (3, 3, 3), (2, 2, 2), "same", seed=2)
    apply_to_file(layer, src, str(tmp_path / "out.nii"), progress=False)
    hdr = nib.load(tmp_path / "out.nii").header
    assert [(e.get_code(), e.get_content()) for e in hdr.extensions] == \
        [(6, b"acquired on a Tuesday"), (6, b"x" * 37)]
    assert nib.load(tmp_path / "out.nii").dataobj.offset == 352 + 32 + 48
    assert b"AFNI extension dropped" in hdr["descrip"].tobytes()


def test_info_lists_codes_and_extensions(tmp_path, rng):
    src = _with_extensions(tmp_path, rng)
    result = CliRunner().invoke(cli, ["info", src, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["sform_code"] == 2 and data["qform_code"] == 0
    afni = len(AFNI_XML) + 8 + (-(len(AFNI_XML) + 8)) % 16
    assert data["extensions"] == [
        {"code": 6, "name": "comment", "bytes": 32, "copied_to_outputs": True},
        {"code": 4, "name": "afni", "bytes": afni, "copied_to_outputs": False},
        {"code": 6, "name": "comment", "bytes": 48, "copied_to_outputs": True}]
    text = CliRunner().invoke(cli, ["info", nibabel_file("example4d.nii.gz")]).output
    assert "sform_code 1 (scanner)" in text and "qform_code 1 (scanner)" in text
    assert "comment (code 6, 32 bytes), comment (code 6, 32 bytes)" in text
    text = CliRunner().invoke(cli, ["info", nibabel_file("anatomical.nii")]).output
    assert "extensions none" in text
