"""HDF5 element_size_um (ilastik, Fiji, BigDataViewer): read as voxel sizes in
micrometres, written scaled by the strides, converted from NIfTI millimetres."""

import json
import os

import h5py
import numpy as np
from click.testing import CliRunner

import reference
from conftest import assert_close
from conv3d_cli import Conv3D
from conv3d_cli.api import apply_to_file
from conv3d_cli.cli.main import cli
from conv3d_cli.io import write_volume


def _layer(k=(3, 3, 3), s=(1, 2, 2), padding="same", filters=1, seed=0):
    rng = np.random.default_rng(seed)
    layer = Conv3D(filters, k, strides=s, padding=padding)
    kernel = rng.standard_normal(k + (1, filters)).astype(np.float32)
    layer.set_weights([kernel, np.zeros(filters, np.float32)])
    return layer, kernel.astype(np.float64)


def _calibrated(path, x, sizes):
    with h5py.File(path, "w") as f:
        f.create_dataset("/raw", data=x).attrs["element_size_um"] = sizes


def test_element_size_read_and_scaled_by_strides(tmp_path, rng):
    x = rng.standard_normal((6, 8, 10)).astype(np.float32)
    _calibrated(tmp_path / "a.h5", x, [2.0, 0.5, 0.25])
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "a.h5"), "--json"])
    data = json.loads(result.output)
    assert data["voxel_size"] == [2.0, 0.5, 0.25] and data["units"] == ["micrometer"] * 3
    layer, kernel = _layer()
    report = apply_to_file(layer, str(tmp_path / "a.h5"), str(tmp_path / "o.h5:/out"),
                           progress=False)
    with h5py.File(tmp_path / "o.h5", "r") as f:
        out, sizes = f["/out"][...], f["/out"].attrs["element_size_um"]
    np.testing.assert_allclose(sizes, [2.0, 1.0, 0.5])
    expected = reference.conv3d(x[None, ..., None].astype(np.float64), kernel, None,
                                strides=(1, 2, 2), padding="same")[0, ..., 0]
    assert_close(out, expected)
    # 'same' k3 s2 over 8 and 10 moves the first voxel: no origin in HDF5 to say so.
    assert report["output_notes"] == ["HDF5 keeps voxel sizes only (element_size_um): the "
                                      "input's origin and orientation are not kept in OUTPUT"]


def test_kept_when_committed_into_an_existing_file(tmp_path, rng):
    _calibrated(tmp_path / "a.h5", rng.standard_normal((4, 4, 4)).astype(np.float32),
                [1.0, 1.0, 3.0])
    layer, _ = _layer(k=(1, 1, 1), s=(1, 1, 1))
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f["/other"] = np.zeros(3)
    apply_to_file(layer, str(tmp_path / "a.h5:/raw"), str(tmp_path / "b.h5:/smooth"),
                  progress=False)
    with h5py.File(tmp_path / "b.h5", "r") as f:
        np.testing.assert_allclose(f["/smooth"].attrs["element_size_um"], [1.0, 1.0, 3.0])


def test_nifti_millimetres_become_micrometres(tmp_path, rng):
    write_volume(tmp_path / "a.nii", rng.standard_normal((4, 5, 6)).astype(np.float32),
                 np.diag([0.5, 0.8, 2.5, 1.0]))
    layer, _ = _layer(k=(1, 1, 1), s=(2, 1, 1), padding="valid")
    apply_to_file(layer, str(tmp_path / "a.nii"), str(tmp_path / "o.h5"), progress=False)
    with h5py.File(tmp_path / "o.h5", "r") as f:
        np.testing.assert_allclose(f["/data"].attrs["element_size_um"], [1000, 800, 2500],
                                   rtol=1e-6)


def test_four_d_outputs_and_bad_attributes(tmp_path, rng):
    _calibrated(tmp_path / "a.h5", rng.standard_normal((4, 4, 4)).astype(np.float32),
                [1.0, 1.0, 3.0])
    layer, _ = _layer(k=(1, 1, 1), s=(1, 1, 1), filters=2)
    report = apply_to_file(layer, str(tmp_path / "a.h5"), str(tmp_path / "o.h5"),
                           progress=False)
    assert report["output_notes"] == ["HDF5 keeps voxel sizes (element_size_um) of 3-D "
                                      "datasets only: OUTPUT holds no geometry"]
    with h5py.File(tmp_path / "o.h5", "r") as f:
        assert "element_size_um" not in f["/data"].attrs
    _calibrated(tmp_path / "bad.h5", np.zeros((2, 2, 2), np.float32), [1.0, -1.0, 2.0])
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "bad.h5")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path}/bad.h5:/raw: element_size_um = [1.0, -1.0, 2.0]: expected three "
        "positive voxel sizes (Z, Y, X) in micrometres")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
