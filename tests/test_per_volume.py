"""``conv3d run --per-volume``: a 4-D series, one 3-D frame at a time (issue 11, part 2)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from conftest import assert_close
from conv3d_cli.cli.main import cli
from conv3d_cli.series import AxesView
from reference import conv3d as ref_conv3d

EXAMPLE4D = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "example4d.nii.gz")


def run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def test_example4d_each_frame_is_smoothed_on_its_own(tmp_path, rng):
    """nibabel's fMRI example (128, 96, 24, T=2, TR 2000 in pixdim[4]): each output
    frame is SciPy's correlation of that frame; the series axis, TR, units and
    affine are kept."""
    k = rng.random((3, 3, 3, 1, 1)).astype(np.float32)
    np.savez(tmp_path / "w.npz", kernel=k)
    out = tmp_path / "out.nii.gz"
    r = run(EXAMPLE4D, out, "--weights", tmp_path / "w.npz", "--no-use-bias", "--padding",
            "same", "--per-volume", "--chunk-shape", "64,48,24", "--workers", "2",
            "--report", tmp_path / "rep.json")
    assert r.exit_code == 0, r.output
    assert "--per-volume (not Keras)" in r.output
    src, img = nib.load(EXAMPLE4D), nib.load(out)
    assert img.shape == src.shape
    x, y = src.get_fdata(), img.get_fdata()
    for t in range(src.shape[3]):
        ref = ndimage.correlate(x[..., t], k[..., 0, 0].astype(np.float64), mode="constant")
        assert_close(y[..., t], ref)
    assert img.header["pixdim"][4] == src.header["pixdim"][4] == 2000
    assert img.header.get_xyzt_units() == src.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(img.affine, src.affine)
    report = json.loads((tmp_path / "rep.json").read_text())
    assert report["per_volume"] is True and report["tiles"] > 1
    assert report["input_shape"] == [2, 128, 96, 24, 1]


@pytest.mark.parametrize("fmt", ["channels_last", "channels_first"])
def test_synthetic_series_several_filters_strides_tiles(tmp_path, rng, fmt):
    """A 4-D .npy (D, H, W, T) (channels first: (T, D, H, W)): each frame equals the
    reference on that frame, with strides, 2 filters and a bias, over tiles that
    split frames and space; the output keeps T in its place and adds F."""
    t_first = fmt == "channels_first"
    x = rng.standard_normal((5, 9, 8, 7) if t_first else (9, 8, 7, 5)).astype(np.float32)
    k = rng.standard_normal((3, 2, 3, 1, 2)).astype(np.float32)
    b = np.array([0.25, -1.0], np.float32)
    np.save(tmp_path / "in.npy", x)
    np.savez(tmp_path / "w.npz", kernel=k, bias=b)
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--weights", tmp_path / "w.npz",
            "--strides", "2,1,2", "--padding", "same", "--data-format", fmt, "--per-volume",
            "--chunk-shape", "3,4,4", "--workers", "2", "-q")
    assert r.exit_code == 0, r.output
    y = np.load(tmp_path / "out.npy")
    frames = np.moveaxis(x, 0, -1) if t_first else x
    assert y.shape == ((5, 2, 5, 8, 4) if t_first else (5, 8, 4, 5, 2))
    for t in range(5):
        ref = ref_conv3d(frames[None, ..., t, None], k, b, strides=(2, 1, 2), padding="same")[0]
        got = y[t] if t_first else y[:, :, :, t, :]
        assert_close(np.moveaxis(got, 0, -1) if t_first else got, ref)


def test_one_filter_nifti_series_is_4d(tmp_path, rng):
    x = rng.standard_normal((6, 5, 4, 3)).astype(np.float32)
    hdr = nib.Nifti1Header()
    hdr.set_xyzt_units("mm", "msec")
    hdr["pixdim"][4] = 750
    nib.save(nib.Nifti1Image(x, np.diag([2, 2, 3, 1]), hdr), tmp_path / "in.nii")
    r = run(tmp_path / "in.nii", tmp_path / "out.nii", "--filters", "1", "--kernel-size", "2",
            "--strides", "2", "--per-volume", "--seed", "1", "--save-weights",
            tmp_path / "w.npz", "-q")
    assert r.exit_code == 0, r.output
    img = nib.load(tmp_path / "out.nii")
    assert img.shape == (3, 2, 2, 3)
    assert img.header["pixdim"][4] == 750 and img.header.get_xyzt_units()[1] == "msec"
    with np.load(tmp_path / "w.npz") as w:
        kernel, bias = w["kernel"], w["bias"]
    for t in range(3):
        ref = ref_conv3d(x[None, ..., t, None], kernel, bias, strides=(2, 2, 2))[0]
        assert_close(img.get_fdata()[..., t], ref[..., 0])


def test_series_axis_mismatch_names_the_axis_and_suggests_per_volume(tmp_path, rng):
    x = rng.standard_normal((6, 5, 4, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(x, np.eye(4)), tmp_path / "in.nii")
    np.savez(tmp_path / "w.npz", kernel=np.ones((3, 3, 3, 1, 1), np.float32))
    r = run(tmp_path / "in.nii", tmp_path / "out.nii", "--weights", tmp_path / "w.npz")
    assert r.exit_code != 0
    line = r.output.strip()
    assert "\n" not in line
    assert "its last axis (axis 3, size 3: T of a 4-D series)" in line
    assert "the layer takes 1" in line and "--per-volume" in line
    assert "Input 0 of layer" not in line
    assert not (tmp_path / "out.nii").exists()


def test_per_volume_needs_a_4d_file(tmp_path, rng):
    np.save(tmp_path / "in.npy", rng.standard_normal((4, 5, 6)).astype(np.float32))
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--filters", "1", "--kernel-size", "3",
            "--per-volume")
    assert r.exit_code != 0
    assert "--per-volume needs a 4-D file" in r.output and "has 3 axes" in r.output


def test_named_kernel_per_volume_is_one_channel(tmp_path, rng):
    """--kernel sizes its layer for one-channel frames, not for T channels."""
    x = rng.standard_normal((7, 6, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(x, np.eye(4)), tmp_path / "in.nii")
    r = run(tmp_path / "in.nii", tmp_path / "out.nii", "--kernel", "box:3", "--per-volume", "-q")
    assert r.exit_code == 0, r.output
    y = nib.load(tmp_path / "out.nii").get_fdata()
    for t in range(4):
        assert_close(y[..., t], ndimage.uniform_filter(x[..., t].astype(np.float64), 3,
                                                       mode="constant"))


def test_axes_view_reads_and_writes_regions():
    a = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    v = AxesView(a, (3, 0, 1, 2, None))
    assert v.shape == (5, 2, 3, 4, 1)
    np.testing.assert_array_equal(v[1:3, :, 1:, :, :], np.moveaxis(a, 3, 0)[1:3, :, 1:, :, None])
    np.testing.assert_array_equal(v[2, :, :, 1:3, :], a[:, :, 1:3, 2][..., None])
    b = np.zeros_like(a)
    w = AxesView(b, (3, 0, 1, 2, None))
    w[1:4, :, :, :, :] = v[1:4]
    w[0, :, :, :, :] = v[0]
    np.testing.assert_array_equal(b[..., :4], a[..., :4])
