"""conv3d info across formats: dtype as read, units, scaling, TR, what a format cannot
hold, and --stats streamed region by region."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from test_nifti_files import nibabel_file

from conv3d_cli.cli.main import cli
from conv3d_cli.io import open_volume, write_volume
from conv3d_cli.io.stats import volume_stats


def info(*args):
    result = CliRunner().invoke(cli, ["info", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _scaled(tmp_path, name):
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    img.header.set_slope_inter(0.5, 3.0)
    nib.save(img, tmp_path / name)
    return tmp_path / name


def test_same_dtype_compressed_or_not(tmp_path):
    """Scaled int16 reads as float32, whether the file is gzipped or not."""
    plain, packed = info(_scaled(tmp_path, "s.nii")), info(_scaled(tmp_path, "s.nii.gz"))
    assert plain["dtype"] == packed["dtype"] == "float32"
    assert plain["scaling"] == packed["scaling"] == {"slope": 0.5, "intercept": 3.0}


def test_units_tr_extensions_and_stable_keys(tmp_path):
    data = info(nibabel_file("example4d.nii.gz"))
    # The keys info printed before stay, with the same meaning.
    for key in ("path", "format", "shape", "dtype", "affine", "voxel_size", "sform_code",
                "qform_code", "extensions"):
        assert key in data
    assert data["units"] == ["millimeter"] * 3
    assert data["tr"] == 2000.0 and data["tr_unit"] == "sec"  # as the file says
    assert "scaling" not in data
    text = CliRunner().invoke(cli, ["info", nibabel_file("example4d.nii.gz")]).output
    assert "tr         2000.0 sec" in text and "units      millimeter" in text


def test_formats_without_geometry_say_so(tmp_path, rng):
    write_volume(tmp_path / "a.npy", rng.standard_normal((3, 4, 5)).astype(np.float32))
    data = info(tmp_path / "a.npy")
    assert "affine" not in data
    assert data["geometry"] == ("none: this .npy volume holds no voxel size or origin "
                                "(outputs lie on its voxel grid)")


@pytest.mark.parametrize("name", ["v.nii.gz", "v.npy", "v.h5", "v.mgz"])
def test_stats_match_numpy(tmp_path, rng, name):
    x = rng.standard_normal((7, 6, 5)).astype(np.float32) * 10
    x[2, 3, 1] = x[5, 0, 4] = np.nan
    write_volume(tmp_path / name, x, np.eye(4) if name.endswith((".nii.gz", ".mgz")) else None)
    stats = info(tmp_path / name, "--stats")["stats"]
    assert stats["nan_count"] == 2 and stats["voxels"] == x.size
    assert stats["min"] == float(np.nanmin(x)) and stats["max"] == float(np.nanmax(x))
    assert stats["mean"] == pytest.approx(float(np.nanmean(x.astype(np.float64))), rel=1e-12)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


class CountingArray:
    """Records the size of every region read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, idx):
        block = self.array[idx]
        self.reads.append(block.nbytes)
        return block


def test_stats_read_bounded_regions(tmp_path, rng):
    x = rng.integers(-50, 50, size=(4, 5, 30)).astype(np.int16)
    write_volume(tmp_path / "v.nii", x, np.eye(4))
    with open_volume(str(tmp_path / "v.nii")) as vol:
        vol.array = counting = CountingArray(vol.array)
        stats = volume_stats(vol, block_bytes=4 * 5 * 2 * 3)  # three Z slices at a time
    assert stats == {"min": int(x.min()), "max": int(x.max()), "mean": float(x.mean()),
                     "nan_count": 0, "voxels": x.size}
    assert len(counting.reads) == 10 and max(counting.reads) == 4 * 5 * 2 * 3


def test_a_run_into_npy_says_the_geometry_is_dropped(tmp_path, rng):
    write_volume(tmp_path / "a.nii", rng.standard_normal((4, 4, 4)).astype(np.float32),
                 np.diag([2.0, 2.0, 2.0, 1.0]))
    args = ["run", str(tmp_path / "a.nii"), str(tmp_path / "o.npy"), "--filters", "1",
            "--kernel-size", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert ("note: a .npy holds no geometry: the input's voxel size and origin are not kept "
            "in OUTPUT") in result.output
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "o.npy"), str(tmp_path / "p.npy"),
                                      "--filters", "1", "--kernel-size", "1"])
    assert "holds no geometry" not in result.output


def test_dtype_by_name_whatever_the_byte_order(tmp_path):
    """nibabel's anatomical.nii is big-endian int16, as every MGH file is big-endian."""
    data = info(nibabel_file("anatomical.nii"))
    assert data["dtype"] == "int16" and data["byte_order"] == "big-endian"
    data = info(nibabel_file("test.mgz"))
    assert data["dtype"] == "float32" and data["byte_order"] == "big-endian"
    assert data["tr"] == 2.0 and data["tr_unit"] == "msec" and data["units"] == ["millimeter"] * 3


def test_voxel_sizes_only_formats_say_so(tmp_path, rng):
    import h5py
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("/raw", data=np.zeros((2, 3, 4), np.float32))
        f["/raw"].attrs["element_size_um"] = [2.0, 1.0, 1.0]
    data = info(tmp_path / "a.h5")
    assert data["voxel_size"] == [2.0, 1.0, 1.0]
    assert data["geometry"] == "voxel sizes only (element_size_um: no origin or orientation)"


def test_no_tr_for_a_fourth_axis_of_filters(tmp_path):
    """A 4-D output of several filters has no time unit: info shows no TR for it."""
    from conv3d_cli.io import read_volume, write_volume
    a, affine = read_volume(nibabel_file("example4d.nii.gz"))
    r = CliRunner().invoke(cli, ["run", nibabel_file("example4d.nii.gz"), str(tmp_path / "o.nii"),
                                 "--filters", "3", "--kernel-size", "1", "--seed", "0", "-q"])
    assert r.exit_code == 0, r.output
    data = info(str(tmp_path / "o.nii"))
    assert data["shape"][3] == 3 and "tr" not in data and "tr_unit" not in data
    write_volume(str(tmp_path / "plain.nii"), a[..., 0], affine)
    assert "tr" not in info(str(tmp_path / "plain.nii"))
