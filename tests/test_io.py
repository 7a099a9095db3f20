"""Volume formats: round trips, region reads, the NIfTI affine, refusals, atomic outputs."""

import gzip
import os
import pickle

import h5py
import nibabel as nib
import numpy as np
import pytest

from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.api import apply_to_file
from conv3d_cli.errors import OutputExistsError, VolumeError
from conv3d_cli.io import create_output, open_volume, read_volume, write_volume
from conv3d_cli.io.rawfile import RawArrayFile


def test_npy_round_trip_and_region_reads(tmp_path, rng):
    a = rng.standard_normal((5, 6, 7, 3)).astype(np.float32)
    write_volume(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a)
    vol = open_volume(str(tmp_path / "a.npy"))
    np.testing.assert_array_equal(vol.array[1:4, 2:5, :, 1], a[1:4, 2:5, :, 1])
    np.testing.assert_array_equal(vol.array[2, :, 3:6], a[2, :, 3:6])
    vol.close()
    np.save(tmp_path / "f.npy", np.asfortranarray(a))
    vol = open_volume(str(tmp_path / "f.npy"))
    np.testing.assert_array_equal(vol.array[1:4, 2:5, 0:6, 1:3], a[1:4, 2:5, 0:6, 1:3])


def test_raw_file_region_writes(tmp_path, rng):
    path = tmp_path / "r.bin"
    path.write_bytes(b"\0" * (16 + 4 * 4 * 5 * 6))
    f = RawArrayFile(path, 16, (4, 5, 6), np.float32, fortran_order=True, writable=True)
    ref = np.zeros((4, 5, 6), np.float32)
    block = rng.standard_normal((2, 3, 4)).astype(np.float32)
    f[1:3, 2:5, 1:5] = block
    ref[1:3, 2:5, 1:5] = block
    np.testing.assert_array_equal(f[:, :, :], ref)


def test_nifti_round_trip_keeps_affine(tmp_path, rng):
    a = rng.standard_normal((6, 7, 8)).astype(np.float32)
    affine = np.array([[0, -1.5, 0, 10], [2, 0, 0, -5], [0, 0, 1.2, 3], [0, 0, 0, 1]])
    for name in ("v.nii", "v.nii.gz"):
        write_volume(tmp_path / name, a, affine=affine)
        data, aff = read_volume(str(tmp_path / name))
        np.testing.assert_array_equal(data, a)
        np.testing.assert_allclose(aff, affine)
        np.testing.assert_array_equal(nib.load(tmp_path / name).get_fdata(dtype=np.float32), a)


def test_nifti_scaling_applied_on_read(tmp_path):
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header.set_slope_inter(0.5, 10)
    nib.save(img, tmp_path / "s.nii")
    data, _ = read_volume(str(tmp_path / "s.nii"))
    np.testing.assert_allclose(data, np.arange(24).reshape(2, 3, 4) * 0.5 + 10)


def test_hdf5_dataset_selection(tmp_path, rng):
    a = rng.standard_normal((4, 5, 6)).astype(np.float32)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["g/one"] = a
    data, _ = read_volume(str(path))  # the only dataset
    np.testing.assert_array_equal(data, a)
    with h5py.File(path, "a") as f:
        f["g/two"] = a
    with pytest.raises(VolumeError, match="holds 2 datasets: /g/one, /g/two"):
        open_volume(str(path))
    with pytest.raises(VolumeError, match="no dataset /g/three"):
        open_volume(f"{path}:/g/three")
    with pytest.raises(VolumeError, match="is a group"):
        open_volume(f"{path}:/g")
    np.testing.assert_array_equal(read_volume(f"{path}:/g/two")[0], a)


def test_hdf5_output_parent_groups_chunked_uncompressed(tmp_path, rng):
    a = rng.standard_normal((4, 5, 6)).astype(np.float32)
    write_volume(f"{tmp_path}/o.h5:/deep/er/vol", a)
    with h5py.File(tmp_path / "o.h5") as f:
        ds = f["deep/er/vol"]
        assert ds.chunks is not None and ds.compression is None
        np.testing.assert_array_equal(ds[...], a)
    write_volume(f"{tmp_path}/o.h5:/second", a)  # a new dataset in an existing file
    with pytest.raises(OutputExistsError):
        write_volume(f"{tmp_path}/o.h5:/second", a)
    with h5py.File(tmp_path / "o.h5") as f:
        assert set(f) == {"deep", "second"}


def test_refusals(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(VolumeError, match="object arrays are refused"):
        open_volume(str(tmp_path / "obj.npy"))
    (tmp_path / "p.npy").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(VolumeError, match="not a valid .npy"):
        open_volume(str(tmp_path / "p.npy"))
    np.save(tmp_path / "c.npy", np.zeros((3, 3, 3), np.complex64))
    with pytest.raises(VolumeError, match="expected real numbers"):
        open_volume(str(tmp_path / "c.npy"))
    np.save(tmp_path / "t.npy", np.zeros((30, 30, 30), np.float32))
    data = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="truncated"):
        open_volume(str(tmp_path / "t.npy"))
    with pytest.raises(VolumeError, match="no such file"):
        open_volume(str(tmp_path / "missing.nii.gz"))
    (tmp_path / "bad.nii.gz").write_bytes(gzip.compress(b"not a header" * 10))
    with pytest.raises(VolumeError, match="not a valid NIfTI"):
        open_volume(str(tmp_path / "bad.nii.gz"))
    (tmp_path / "bad.h5").write_bytes(b"nope")
    with pytest.raises(VolumeError, match="not a valid HDF5"):
        open_volume(str(tmp_path / "bad.h5"))
    with pytest.raises(VolumeError, match="unknown volume format '.xyz'"):
        open_volume(str(tmp_path / "x.xyz"))


def test_output_target_is_atomic(tmp_path):
    out = tmp_path / "o.npy"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        create_output(str(out), shape=(3, 3, 3), dtype=np.float32)
    target = create_output(str(out), shape=(3, 3, 3), dtype=np.float32, overwrite=True)
    target.abort()
    assert out.read_bytes() == b"precious" and os.listdir(tmp_path) == ["o.npy"]


def _world(affine, ijk):
    return affine[:3, :3] @ np.asarray(ijk, float) + affine[:3, 3]


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, strides=2, padding="same"),
    dict(kernel_size=(3, 5, 1), strides=(1, 2, 3), padding="valid"),
    dict(kernel_size=5, padding="same", dilation_rate=2),
    dict(kernel_size=(5, 3, 3), strides=(3, 1, 2), padding="same"),
])
def test_conv_affine_places_voxels_where_they_lie(tmp_path, rng, kw):
    a = rng.standard_normal((13, 12, 11)).astype(np.float32)
    affine = np.array([[0.9, 0.3, 0, -4], [-0.2, 1.1, 0.1, 7], [0, 0.2, 2.0, 1], [0, 0, 0, 1]])
    write_volume(tmp_path / "in.nii", a, affine=affine)
    layer = Conv3D(1, use_bias=False, **kw)
    k = np.zeros(layer.kernel_size + (1, 1), np.float32)
    centre = tuple(n // 2 for n in layer.kernel_size)
    k[centre] = 1  # output voxel = the input voxel under the kernel's centre
    layer.set_weights([k])
    apply_to_file(layer, str(tmp_path / "in.nii"), str(tmp_path / "out.nii"), progress=False)
    img = nib.load(tmp_path / "out.nii")
    out, out_aff = img.get_fdata(dtype=np.float32), img.affine
    assert img.header["sform_code"] > 0 and img.header["qform_code"] > 0
    assert b"Conv3D" in img.header["descrip"].tobytes()
    hits = 0
    for o in np.ndindex(*out.shape):
        src = np.linalg.solve(affine[:3, :3], _world(out_aff, o) - affine[:3, 3])
        src = np.rint(src).astype(int)
        if np.all(src >= 0) and np.all(src < a.shape):
            assert out[o] == a[tuple(src)]
            hits += 1
    assert hits > 0


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, strides=2, padding="same"),
    dict(kernel_size=3, strides=(2, 3, 1), padding="valid", output_padding=(1, 2, 0)),
    dict(kernel_size=(5, 3, 1), strides=2, padding="same", output_padding=1),
])
def test_transpose_affine_places_voxels_where_they_lie(tmp_path, rng, kw):
    a = rng.standard_normal((5, 4, 6)).astype(np.float32)
    affine = np.array([[1.5, 0, 0, 2], [0, 0.8, 0.2, -3], [0, 0, 1.1, 4], [0, 0, 0, 1]])
    write_volume(tmp_path / "in.nii.gz", a, affine=affine)
    layer = Conv3DTranspose(1, use_bias=False, **kw)
    k = np.zeros(layer.kernel_size + (1, 1), np.float32)
    k[tuple(n // 2 for n in layer.kernel_size)] = 1
    layer.set_weights([k])
    apply_to_file(layer, str(tmp_path / "in.nii.gz"), str(tmp_path / "out.nii.gz"), progress=False)
    img = nib.load(tmp_path / "out.nii.gz")
    out, out_aff = img.get_fdata(dtype=np.float32), img.affine
    for i in np.ndindex(*a.shape):  # every input voxel lands at the same world position
        o = np.linalg.solve(out_aff[:3, :3], _world(affine, i) - out_aff[:3, 3])
        o_int = np.rint(o).astype(int)
        np.testing.assert_allclose(o, o_int, atol=1e-6)
        if np.all(o_int >= 0) and np.all(o_int < out.shape):
            assert out[tuple(o_int)] == a[i]
