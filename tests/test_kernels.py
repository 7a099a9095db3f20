"""Named kernels (``--kernel``) and kernel images (``--weights k.npy / k.nii.gz``) against SciPy.

Each named kernel, run over a NIfTI of anisotropic voxels (1.0, 0.8, 2.5) mm
stored with an oblique affine (the voxel sizes are its column lengths), must
equal the ``scipy.ndimage`` filter it names with ``mode="constant"``, sigma,
sizes and radii converted to voxels per axis.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from conftest import assert_close
from conv3d_cli import kernels
from conv3d_cli.api import build_layer
from conv3d_cli.cli.main import cli
from conv3d_cli.errors import ArgumentError, WeightsError

VOXEL = (1.0, 0.8, 2.5)  # mm along X, Y, Z


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


def _oblique_affine(voxel):
    """A rotation about z then x, times the voxel sizes, plus an offset."""
    a, b = np.deg2rad(30), np.deg2rad(-20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rx @ rz @ np.diag(voxel)
    affine[:3, 3] = (-10, 5, 3)
    return affine


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kernels")
    x = np.random.default_rng(0).standard_normal((15, 17, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(x, _oblique_affine(VOXEL)), str(tmp / "scan.nii.gz"))
    # The voxel sizes as the file holds them (float32), for the references.
    voxel = tuple(float(z) for z in nib.load(str(tmp / "scan.nii.gz")).header.get_zooms())
    return tmp, x.astype(np.float64), voxel


def _sphere_mask(radius_mm, voxel):
    """Voxels whose centres lie within the radius, built by hand. A centre on the
    sphere counts: with 2.6 mm on (1, 0.8, 2.5) mm voxels, (1, 3, 0) lies at
    1 + 9 * 0.64 = 6.76 mm^2 exactly, a little beyond with 0.8 in float32."""
    ext = [int(radius_mm / v + 1e-6) for v in voxel]
    mask = np.zeros([2 * e + 1 for e in ext])
    for idx in np.ndindex(mask.shape):
        d2 = sum(((i - e) * v) ** 2 for i, e, v in zip(idx, ext, voxel))
        mask[idx] = d2 <= radius_mm ** 2 * (1 + 1e-6)
    return mask / mask.sum()


def _gauss(sigma_mm, **kw):
    return lambda x, v: ndimage.gaussian_filter(x, [sigma_mm / s for s in v], mode="constant", **kw)


# (spec, reference(x, voxel) -> (X, Y, Z[, filters]))
CASES = [
    ("gauss:sigma=2mm", _gauss(2.0)),
    ("gauss:1.5mm,truncate=3", _gauss(1.5, truncate=3.0)),
    ("gauss:sigma=1200um", _gauss(1.2)),
    ("gauss:2vox", lambda x, v: ndimage.gaussian_filter(x, 2.0, mode="constant")),
    ("gauss:sigma=1x1.5x0vox", lambda x, v: ndimage.gaussian_filter(x, (1, 1.5, 0),
                                                                     mode="constant")),
    ("box:3", lambda x, v: ndimage.uniform_filter(x, 3, mode="constant")),
    ("mean:5", lambda x, v: ndimage.uniform_filter(x, 5, mode="constant")),
    # 6 mm: voxel centres within 3 mm of the centre: 7 x 7 x 3 voxels (fslmaths's box)
    ("box:6mm", lambda x, v: ndimage.uniform_filter(x, (7, 7, 3), mode="constant")),
    ("box:3x5x1", lambda x, v: ndimage.uniform_filter(x, (3, 5, 1), mode="constant")),
    ("sphere:2.6mm", lambda x, v: ndimage.correlate(x, _sphere_mask(2.6, v), mode="constant")),
    ("sobel", lambda x, v: np.stack([ndimage.sobel(x, axis=a, mode="constant")
                                     for a in range(3)], axis=-1)),
    ("laplace", lambda x, v: ndimage.laplace(x, mode="constant")),
]


@pytest.mark.parametrize("spec,reference", CASES, ids=[c[0] for c in CASES])
def test_cli_named_kernel_equals_scipy(scan, spec, reference):
    tmp, x, voxel = scan
    out = tmp / f"out_{spec.replace(':', '_').replace(',', '_')}.nii.gz"
    r = invoke("run", tmp / "scan.nii.gz", out, "--kernel", spec, "--workers", 1, "-q",
               "--overwrite")
    assert r.exit_code == 0, r.output
    img = nib.load(str(out))
    assert_close(np.asarray(img.dataobj), reference(x, voxel))
    np.testing.assert_allclose(img.affine, _oblique_affine(VOXEL), atol=1e-6)  # 'same': one grid


@pytest.mark.parametrize("spec,reference", CASES, ids=[c[0] for c in CASES])
def test_python_named_kernel_equals_scipy(scan, spec, reference):
    _, x, voxel = scan
    layer = build_layer(kernel=spec, voxel_size=voxel)
    y = layer(x[None, ..., None].astype(np.float32))[0]
    expected = reference(x, voxel)
    assert_close(y if expected.ndim == 4 else y[..., 0], expected)
    assert layer.padding == "same" and not layer.use_bias and layer.groups == 1


def test_sphere_is_an_ellipsoid_in_voxels():
    # radius 2 mm on (1, 0.8, 2.5) mm voxels: 2, 2.5 and 0.8 voxels along the axes
    k = kernels.named_kernel("sphere:2mm", VOXEL).filters[0]
    assert k.shape == (5, 5, 1)
    mask = k > 0
    assert mask[0, 2, 0] and mask[2, 0, 0] and not mask[0, 1, 0] and mask.sum() == 17
    np.testing.assert_allclose(k[mask], 1 / 17)


def test_transposed_layer_applies_the_same_filter(scan):
    # Conv3DTranspose mirrors its kernel; the named kernel is stored mirrored for it.
    _, x, _ = scan
    layer = build_layer(layer="Conv3DTranspose", kernel="sobel")
    y = layer(x[None, ..., None].astype(np.float32))[0]
    for axis in range(3):
        assert_close(y[..., axis], ndimage.sobel(x, axis=axis, mode="constant"))
    assert layer.kernel.shape == (3, 3, 3, 3, 1)


def test_each_channel_filtered_on_its_own(tmp_path, rng):
    x = rng.standard_normal((9, 8, 7, 2))
    nib.save(nib.Nifti1Image(x.astype(np.float32), np.diag(VOXEL + (1,))),
             str(tmp_path / "two.nii"))
    r = invoke("run", tmp_path / "two.nii", tmp_path / "edges.nii", "--kernel", "sobel",
               "--workers", 1, "-q", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    y = np.asarray(nib.load(str(tmp_path / "edges.nii")).dataobj)
    assert y.shape == (9, 8, 7, 6)
    for c in range(2):  # filters c*3 .. c*3+2: channel c's d/dX, d/dY, d/dZ
        for axis in range(3):
            assert_close(y[..., 3 * c + axis], ndimage.sobel(x[..., c], axis=axis, mode="constant"))
    config = json.loads((tmp_path / "r.json").read_text())["layer"]["config"]
    assert (config["filters"], config["groups"], config["padding"]) == (6, 2, "same")
    layer = build_layer(layer="Conv3DTranspose", kernel="gauss:1vox", input_channels=2)
    y = layer(x[None].astype(np.float32))[0]
    for c in range(2):
        assert_close(y[..., c], ndimage.gaussian_filter(x[..., c], 1.0, mode="constant"))


def test_ome_zarr_scale_and_units_give_the_voxel_size(tmp_path, rng):
    zarr = pytest.importorskip("zarr")
    a = rng.standard_normal((2, 6, 8, 10)).astype(np.float32)  # c, z, y, x
    root = zarr.open_group(store=str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=a.shape, chunks=(1, 6, 8, 10), dtype="f4")[:] = a
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 2.0, 0.5, 0.25]}]}]}]
    r = invoke("run", tmp_path / "img.zarr", tmp_path / "out.npy", "--kernel", "gauss:sigma=1um",
               "--data-format", "channels_first", "--workers", 1, "-q")
    assert r.exit_code == 0, r.output
    y = np.load(tmp_path / "out.npy")
    for c in range(2):
        assert_close(y[c], ndimage.gaussian_filter(a[c].astype(np.float64), (0.5, 2, 4),
                                                   mode="constant"))


def test_nifti_units_and_voxel_size_option(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([200.0, 100.0, 400.0, 1]))
    img.header.set_xyzt_units("micron")
    nib.save(img, str(tmp_path / "um.nii"))
    ctx = kernels.input_context(str(tmp_path / "um.nii"))
    np.testing.assert_allclose(ctx["voxel_size"], (0.2, 0.1, 0.4))
    assert kernels.input_context(str(tmp_path / "um.nii"), voxel_size="1")["voxel_size"] == "1"
    assert kernels.parse_voxel_size("1,0.8,2.5") == (1.0, 0.8, 2.5)
    assert kernels.parse_voxel_size("2") == (2.0, 2.0, 2.0)
    np.testing.assert_allclose(kernels.parse_voxel_size("200,100,400um"), (0.2, 0.1, 0.4))
    assert kernels.parse_voxel_size((1, 2, 3)) == (1.0, 2.0, 3.0)
    for bad in ("1,2", "1,0,1", "a,b,c", "1,2,3cm"):
        with pytest.raises(ArgumentError, match="--voxel-size"):
            kernels.parse_voxel_size(bad)


def test_save_weights_holds_the_kernel_used(scan):
    tmp, x, voxel = scan
    r = invoke("run", tmp / "scan.nii.gz", tmp / "g.nii.gz", "--kernel", "gauss:sigma=2mm",
               "--save-weights", tmp / "g.npz", "--use-bias", "--workers", 1, "-q", "--overwrite")
    assert r.exit_code == 0, r.output
    with np.load(tmp / "g.npz") as saved:
        w = dict(saved)
    assert set(w) == {"kernel", "bias"} and w["bias"].tolist() == [0.0]
    k = w["kernel"]
    # per axis sigma 2, 2.5, 0.8 voxels: radius int(4 * sigma + 0.5) = 8, 10, 3
    assert k.shape == (17, 21, 7, 1, 1) and k.dtype == np.float32
    assert abs(float(k.sum(dtype=np.float64)) - 1) < 1e-6
    impulse = np.zeros(k.shape[:3])
    impulse[8, 10, 3] = 1
    np.testing.assert_allclose(k[..., 0, 0], ndimage.gaussian_filter(
        impulse, [2.0 / v for v in voxel], mode="constant"), rtol=1e-6, atol=1e-9)
    # the saved kernel as --weights gives the same result (with Keras's default padding)
    r = invoke("run", tmp / "scan.nii.gz", tmp / "g2.nii.gz", "--weights", tmp / "g.npz",
               "--padding", "same", "--workers", 1, "-q", "--overwrite")
    assert r.exit_code == 0, r.output
    assert_close(nib.load(str(tmp / "g2.nii.gz")).get_fdata(),
                 nib.load(str(tmp / "g.nii.gz")).get_fdata())


def test_shape_and_export(scan, tmp_path):
    tmp, _, _ = scan
    r = invoke("shape", tmp / "scan.nii.gz", "--kernel", "gauss:sigma=2mm", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["file_output_shape"] == [15, 17, 8] and info["params"] == 17 * 21 * 7
    r = invoke("shape", "--input-shape", "2,10,10,10,3", "--kernel", "sobel", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["output_shape"] == [2, 10, 10, 10, 9]
    r = invoke("export", tmp_path / "b.keras", "--kernel", "box:3x3x1", "--input-channels", 2)
    assert r.exit_code == 0, r.output
    again = build_layer(weights=str(tmp_path / "b.keras"))
    assert again.groups == 2 and again.kernel.shape == (3, 3, 1, 1, 2)
    np.testing.assert_allclose(again.kernel, 1 / 9)
    r = invoke("export", tmp_path / "g.keras", "--kernel", "gauss:2mm")
    assert r.exit_code == 1 and "--voxel-size" in r.output
    r = invoke("export", tmp_path / "g.keras", "--kernel", "gauss:2mm", "--voxel-size", "1,1,2")
    assert r.exit_code == 0, r.output
    assert build_layer(weights=str(tmp_path / "g.keras")).kernel_size == (17, 17, 9)


@pytest.mark.parametrize("args,message", [
    (["--kernel", "blur:2"], "unknown kernel 'blur'; expected one of gauss, box, mean, sphere, "
                             "sobel, laplace"),
    (["--kernel", "gauss"], "gauss needs its sigma"),
    (["--kernel", "gauss:2"], "give sigma a unit: 2mm or 2vox"),
    (["--kernel", "gauss:sigma=two"], "expected sigma as a non-negative length"),
    (["--kernel", "gauss:-1vox"], "expected sigma as a non-negative length"),
    (["--kernel", "gauss:1vox,truncate=0"], "truncate must be a positive number"),
    (["--kernel", "gauss:1vox,radius=3"], "gauss has no argument 'radius'"),
    (["--kernel", "sphere:2"], "give the radius a unit"),
    (["--kernel", "box:4"], "a box in voxels must be an odd whole number"),
    (["--kernel", "box:2.5vox"], "a box in voxels must be an odd whole number"),
    (["--kernel", "sobel:3"], "sobel takes no arguments"),
    (["--kernel", "gauss:2mm"], "2mm needs the input's voxel size, and none is known"),
    (["--kernel", "sobel", "--filters", 2], "sets filters=3; drop --filters"),
    (["--kernel", "box:3", "--kernel-size", 5], "sets kernel_size=(3, 3, 3)"),
    (["--kernel", "box:3", "--weights", "w.npz"], "--kernel and --weights both give the kernel"),
    (["--voxel-size", "1"], "--voxel-size is for --kernel"),
])
def test_errors_are_one_line(tmp_path, rng, monkeypatch, args, message):
    np.save(tmp_path / "in.npy", rng.standard_normal((6, 6, 6)).astype(np.float32))
    np.savez(tmp_path / "w.npz", kernel=np.ones((3, 3, 3, 1, 1), np.float32))
    monkeypatch.chdir(tmp_path)
    r = invoke("run", "in.npy", "out.npy", *args)
    assert r.exit_code == 1, r.output
    assert message in r.output and r.output.count("\n") == 1, r.output
    assert not os.path.exists(tmp_path / "out.npy")


def _kernel_image_reference(x):
    # An asymmetric kernel: applying it mirrored (a convolution) would differ.
    k = np.arange(2 * 3 * 5, dtype=np.float64).reshape(3, 2, 5) - 7
    return k, ndimage.correlate(x, k, mode="constant", origin=(0, -1, 0))


def test_kernel_images_are_applied_as_stored(scan):
    tmp, x, _ = scan
    k, expected = _kernel_image_reference(x)
    # Keras's 'same' puts the extra tap of an even size after the centre: origin -1 in SciPy.
    assert np.abs(expected - ndimage.convolve(x, k, mode="constant", origin=(0, -1, 0))).max() > 1
    np.save(tmp / "k.npy", k.astype(np.float32))
    kimg = nib.Nifti1Image(k.astype(np.float32) / 2, np.diag((2.0, 2.0, 2.0, 1)))
    kimg.header.set_slope_inter(2.0, 0.0)  # the scaling is applied
    nib.save(kimg, str(tmp / "k.nii.gz"))
    for name in ("k.npy", "k.nii.gz"):
        r = invoke("run", tmp / "scan.nii.gz", tmp / "ki.nii.gz", "--weights", tmp / name,
                   "--padding", "same", "--workers", 1, "-q", "--overwrite")
        assert r.exit_code == 0, r.output
        assert_close(nib.load(str(tmp / "ki.nii.gz")).get_fdata(), expected)
    layer = build_layer(weights=str(tmp / "k.nii.gz"))
    assert (layer.filters, layer.kernel.shape, layer.use_bias) == (1, (3, 2, 5, 1, 1), False)


def test_kernel_image_errors(tmp_path):
    np.save(tmp_path / "k4.npy", np.ones((3, 3, 3, 2), np.float32))
    with pytest.raises(WeightsError, match=r"5-D Keras kernel .* or a 3-D kernel image"):
        build_layer(weights=str(tmp_path / "k4.npy"))
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3, 2), np.float32), np.eye(4)),
             str(tmp_path / "k4.nii"))
    with pytest.raises(WeightsError, match=r"must be 3-D \(X, Y, Z\); got shape \(3, 3, 3, 2\)"):
        build_layer(weights=str(tmp_path / "k4.nii"))
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(WeightsError, match="not a valid NIfTI file"):
        build_layer(weights=str(tmp_path / "bad.nii.gz"))
