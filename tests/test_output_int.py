"""``conv3d run --output-dtype int16|...|input``: rounded, clipped, NaN as 0 (issue 11, 4)."""

import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from conv3d_cli.cli.main import cli
from conv3d_cli.io import read_volume
from conv3d_cli.io.dtypes import to_integer

EXAMPLE4D = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "example4d.nii.gz")


def run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


def test_to_integer_rounds_half_to_even_clips_and_zeroes_nan():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, 300.0, -3.0, np.nan, np.inf, -np.inf],
                 np.float32)
    assert to_integer(x, np.uint8).tolist() == [0, 2, 2, 0, 0, 2, 255, 0, 0, 255, 0]
    assert to_integer(x, np.int8).tolist() == [0, 2, 2, 0, -2, 2, 127, -3, 0, 127, -128]
    # float32 cannot hold 2**31 - 1: the bound must not round up and wrap.
    big = np.array([2.0 ** 31, -2.0 ** 32, 2147483520.0], np.float32)
    assert to_integer(big, np.int32).tolist() == [2 ** 31 - 1, -2 ** 31, 2147483520]


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16", "int32"])
def test_run_rounds_and_clips_every_tile(tmp_path, dtype):
    """Half-way results (x * 0.5 of integers) round to even; out-of-range ones clip;
    a NaN voxel's neighbourhood is 0; over several tiles (int16: in 2 worker processes)."""
    rng = np.random.default_rng(1)
    x = rng.integers(-400, 400, (8, 9, 10)).astype(np.float32)
    x[4, 4, 4] = np.nan
    k = np.zeros((3, 3, 3, 1, 1), np.float32)
    k[1, 1, 1] = 0.5
    k[0, 1, 1] = 1.0
    np.save(tmp_path / "in.npy", x)
    np.savez(tmp_path / "w.npz", kernel=k)
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--weights", tmp_path / "w.npz",
            "--no-use-bias", "--padding", "same", "--output-dtype", dtype, "--chunk-shape",
            "3,4,5", "--workers", "2" if dtype == "int16" else "1", "--report",
            tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "rounded half to even" in r.output and "NaN written as 0" in r.output
    ref = ndimage.correlate(np.nan_to_num(x, nan=0.0).astype(np.float64), k[..., 0, 0],
                            mode="constant")
    # As in Keras, NaN * 0 is NaN: every output whose 3x3x3 window holds the NaN is NaN.
    ref[ndimage.maximum_filter(np.isnan(x), size=3, mode="constant")] = np.nan
    info = np.iinfo(dtype)
    want = np.clip(np.rint(np.nan_to_num(ref, nan=0.0)), info.min, info.max).astype(dtype)
    y = np.load(tmp_path / "out.npy")
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(y, want)
    assert y[4, 4, 4] == 0 and y[3, 3, 3] == 0  # NaN reached them
    assert np.any(np.abs(ref - np.round(ref)) == 0.5)  # the half-way cases are there
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output_dtype"] == dtype and "not Keras" in report["output_dtype_note"]


def test_nifti_int16_has_no_scaling_and_reads_back(tmp_path, rng):
    x = (rng.standard_normal((6, 7, 8)) * 1000).astype(np.float32)
    nib.save(nib.Nifti1Image(x, np.diag([1.5, 1.5, 2, 1])), tmp_path / "in.nii")
    r = run(tmp_path / "in.nii", tmp_path / "out.nii.gz", "--kernel", "box:3",
            "--output-dtype", "int16", "-q")
    assert r.exit_code == 0, r.output
    img = nib.load(tmp_path / "out.nii.gz")
    assert img.get_data_dtype() == np.int16
    assert img.header.get_slope_inter() == (None, None)
    ref = ndimage.uniform_filter(x.astype(np.float64), 3, mode="constant")
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.rint(ref).astype(np.int16))


def test_output_dtype_input_keeps_an_integer_series(tmp_path):
    """nibabel's int16 fMRI example, smoothed per volume, written as int16 like its input."""
    r = run(EXAMPLE4D, tmp_path / "out.nii", "--kernel", "box:3", "--per-volume",
            "--output-dtype", "input", "-q")
    assert r.exit_code == 0, r.output
    src, img = nib.load(EXAMPLE4D), nib.load(tmp_path / "out.nii")
    assert img.get_data_dtype() == np.int16 and img.shape == src.shape
    x = src.get_fdata()
    for t in range(2):
        ref = ndimage.uniform_filter(x[..., t], 3, mode="constant")
        np.testing.assert_array_equal(np.asarray(img.dataobj)[..., t],
                                      np.clip(np.rint(ref), -32768, 32767).astype(np.int16))


def test_hdf5_uint8(tmp_path, rng):
    x = (rng.random((5, 6, 7)) * 300).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    r = run(tmp_path / "in.npy", tmp_path / "out.h5", "--kernel", "mean:3", "--output-dtype",
            "uint8", "-q")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "out.h5", "r") as f:
        y = f["data"][...]
    assert y.dtype == np.uint8
    ref = ndimage.uniform_filter(x.astype(np.float64), 3, mode="constant")
    np.testing.assert_array_equal(y, np.clip(np.rint(ref), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name,dtype,stores", [("o.mgz", "int8", "uint8, int16 or int32"),
                                                ("o.mgz", "uint16", "uint8, int16 or int32"),
                                                ("o.tif", "int8", "uint8, uint16 or int16"),
                                                ("o.tif", "int32", "uint8, uint16 or int16")])
def test_integer_dtypes_a_format_cannot_store_are_refused_before_any_work(tmp_path, name, dtype,
                                                                          stores):
    np.save(tmp_path / "in.npy", np.ones((6, 6, 6), np.float32))
    r = run(tmp_path / "in.npy", tmp_path / name, "--kernel", "mean:3", "--output-dtype", dtype)
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"Error: --output-dtype {dtype}: {'MGH' if 'mgz' in name else 'TIFF'} cannot store "
        f"{dtype}; use {stores}" + r.output.split(stores, 1)[1].rstrip()]
    assert sorted(os.listdir(tmp_path)) == ["in.npy"]


@pytest.mark.parametrize("name,dtype", [("o.mgz", "int16"), ("o.tif", "uint16")])
def test_integer_outputs_in_formats_with_few_integer_types(tmp_path, name, dtype):
    x = np.linspace(-5, 900, 6 * 6 * 6, dtype=np.float32).reshape(6, 6, 6)
    np.save(tmp_path / "in.npy", x)
    r = run(tmp_path / "in.npy", tmp_path / name, "--kernel", "mean:3", "--output-dtype", dtype,
            "-q")
    assert r.exit_code == 0, r.output
    y, _ = read_volume(str(tmp_path / name))
    ref = ndimage.uniform_filter(x.astype(np.float64), 3, mode="constant")
    info = np.iinfo(dtype)
    np.testing.assert_array_equal(np.asarray(y).reshape(ref.shape),
                                  np.clip(np.rint(ref), info.min, info.max))
