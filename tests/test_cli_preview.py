"""``conv3d preview``: slices land where the volumes' geometry puts them.

A bright voxel at a known world position goes through a stride-2 Conv3D and a
stride-2 Conv3DTranspose (delta kernels keep it); the preview of the input and
both outputs, decoded from the PNG, must show it at the pixel its world
position maps to in every panel of every row. Where a panel lies in the PNG
and which world range it spans come from ``--json``; the orientation
(x to the right, y and z upwards) is the documented convention, checked here
independently of the rendering.
"""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conv3d_cli import viz
from conv3d_cli.cli.main import cli

pytest.importorskip("matplotlib", reason="matplotlib is part of the test extra")
from matplotlib.image import imread  # noqa: E402

BRIGHT = (7, 9, 5)  # odd indices: kept by a stride-2 'same' Conv3D on even sizes


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def oblique_affine():
    """Anisotropic voxels (1.5, 1, 2), rotated 20 degrees about z, offset."""
    t = np.deg2rad(20)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([1.5, 1.0, 2.0])
    a[:3, 3] = (-12.0, 4.5, -20.0)
    return a


@pytest.fixture
def scan(tmp_path):
    data = np.zeros((20, 18, 16), np.float32)
    data[BRIGHT] = 100
    affine = oblique_affine()
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "in.nii"))
    kernel = np.zeros((3, 3, 3, 1, 1), np.float32)
    kernel[1, 1, 1] = 1
    np.savez(tmp_path / "delta.npz", kernel=kernel)
    world = affine[:3, :3] @ np.array(BRIGHT, float) + affine[:3, 3]
    return tmp_path, world


def bright_centroid(png, box):
    """Centroid (column, row) of the white pixels inside box (left, top, right, bottom)."""
    left, top, right, bottom = (int(round(v)) for v in box)
    crop = png[top:bottom, left:right, :3]
    white = crop.min(axis=-1) > 0.9  # the crosshair is red, the outside dark blue
    assert white.any(), "no bright pixel in the panel"
    rows, cols = np.nonzero(white)
    return left + cols.mean() + 0.5, top + rows.mean() + 0.5


def expected_pixel(panel, point):
    """Where point lies in the panel: horizontal axis to the right, vertical upwards."""
    left, top, right, bottom = panel["box"]
    h, v = panel["horizontal"], panel["vertical"]
    (h0, h1), (v0, v1) = h["range"], v["range"]
    assert h0 < h1 and v0 < v1
    x = point["xyz".index(h["axis"])]
    y = point["xyz".index(v["axis"])]
    return left + (x - h0) / (h1 - h0) * (right - left), top + (v1 - y) / (v1 - v0) * (bottom - top)


def check_bright_spot(tmp, layout, world, rows):
    png = imread(str(tmp / "p.png"))
    assert png.shape[:2] == (layout["height"], layout["width"])
    planes = {"axial": ("x", "y"), "coronal": ("x", "z"), "sagittal": ("y", "z")}
    for r in rows:
        row = layout["rows"][r]
        for name, (h, v) in planes.items():
            panel = row["panels"][name]
            assert (panel["horizontal"]["axis"], panel["vertical"]["axis"]) == (h, v)
            got = np.array(bright_centroid(png, panel["box"]))
            want = np.array(expected_pixel(panel, world))
            # one sample of the preview's grid, plus a pixel of antialiasing
            px_per_unit = (panel["box"][2] - panel["box"][0]) / np.ptp(panel["horizontal"]["range"])
            tol = layout["grid_spacing"] * px_per_unit + 1
            assert np.abs(got - want).max() <= tol, (row["name"], name, got, want, tol)


def test_bright_voxel_lands_at_its_world_position_in_strided_outputs(scan):
    tmp, world = scan
    for layer, out in (("Conv3D", "down.nii"), ("Conv3DTranspose", "up.nii")):
        r = invoke("run", tmp / "in.nii", tmp / out, "--layer", layer, "--weights",
                   tmp / "delta.npz", "--strides", 2, "--padding", "same", "--workers", 1, "-q")
        assert r.exit_code == 0, r.output
    # The bright voxel's index differs in each file; only the affine agrees.
    assert np.argwhere(nib.load(str(tmp / "down.nii")).get_fdata() == 100).tolist() == [[3, 4, 2]]
    assert np.argwhere(nib.load(str(tmp / "up.nii")).get_fdata() == 100).tolist() == [[15, 19, 11]]
    at = ",".join(f"{v:.6f}" for v in world)
    r = invoke("preview", tmp / "in.nii", tmp / "down.nii", tmp / "up.nii", "--at", at,
               "-o", tmp / "p.png", "--json", tmp / "p.json")
    assert r.exit_code == 0, r.output
    layout = json.loads((tmp / "p.json").read_text())
    assert [row["name"] for row in layout["rows"]] == ["in.nii", "down.nii", "up.nii"]
    np.testing.assert_allclose(layout["rows"][1]["point_voxel"], [3, 4, 2], atol=1e-6)
    np.testing.assert_allclose(layout["rows"][2]["point_voxel"], [15, 19, 11], atol=1e-6)
    check_bright_spot(tmp, layout, world, rows=[0, 1, 2])


def test_at_voxel_and_default_centre(scan):
    tmp, world = scan
    r = invoke("preview", tmp / "in.nii", "--at-voxel", ",".join(map(str, BRIGHT)),
               "-o", tmp / "p.png", "--json", "-", "-q")
    assert r.exit_code == 0, r.output
    layout = json.loads(r.output)
    np.testing.assert_allclose(layout["point"], world, atol=1e-9)
    check_bright_spot(tmp, layout, world, rows=[0])
    src = viz.SliceSource("in.nii", (20, 18, 16), (0, 1, 2), {}, oblique_affine(), "affine")
    np.testing.assert_allclose(src.voxel(src.centre()), [9.5, 8.5, 7.5])


def test_four_d_nifti_shows_the_chosen_frame(tmp_path):
    data = np.zeros((8, 9, 10, 3), np.float32)
    data[2, 3, 4, 1] = 5
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), str(tmp_path / "t.nii.gz"))
    for option in ("--frame", "--channel"):
        r = invoke("preview", tmp_path / "t.nii.gz", option, 1, "--at-voxel", "2,3,4",
                   "-o", tmp_path / "p.png", "--json", tmp_path / "p.json", "--overwrite", "-q")
        assert r.exit_code == 0, r.output
        layout = json.loads((tmp_path / "p.json").read_text())
        assert layout["rows"][0]["fixed_indices"] == {"3": 1}
        check_bright_spot(tmp_path, layout, [4.0, 6.0, 12.0], rows=[0])
    r = invoke("preview", tmp_path / "t.nii.gz", "--channel", 3, "-o", tmp_path / "q.png")
    assert r.exit_code != 0
    assert "--channel 3: t.nii.gz has 3 channel(s)" in r.output


def test_npy_has_no_geometry_and_says_so(tmp_path):
    a = np.zeros((6, 7, 8), np.float32)
    a[1, 5, 2] = 3
    np.save(tmp_path / "v.npy", a)
    r = invoke("preview", tmp_path / "v.npy", "--at", "1,5,2", "-o", tmp_path / "p.png",
               "--json", tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    assert "v.npy has no geometry" in r.output and "voxel (i, j, k) = world (x, y, z)" in r.output
    check_bright_spot(tmp_path, json.loads((tmp_path / "p.json").read_text()), [1, 5, 2], [0])


def test_hdf5_dataset_channels_first(tmp_path):
    import h5py
    a = np.zeros((3, 6, 7, 8), np.float32)  # C, D, H, W
    a[2, 4, 1, 6] = 1
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["grp/vol"] = a
    r = invoke("preview", f"{tmp_path}/f.h5:/grp/vol", "--data-format", "channels_first",
               "--channel", 2, "--at", "4,1,6", "-o", tmp_path / "p.png",
               "--json", tmp_path / "p.json", "-q")
    assert r.exit_code == 0, r.output
    layout = json.loads((tmp_path / "p.json").read_text())
    assert layout["rows"][0]["name"] == "f.h5:/grp/vol"
    assert layout["rows"][0]["fixed_indices"] == {"0": 2}
    check_bright_spot(tmp_path, layout, [4, 1, 6], [0])


def test_ome_zarr_uses_scale_and_translation(tmp_path):
    zarr = pytest.importorskip("zarr")
    a = np.zeros((2, 6, 8, 10), np.float32)  # c, z, y, x
    a[1, 4, 2, 7] = 9
    root = zarr.open_group(store=str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=a.shape, chunks=(1, 3, 4, 5), dtype="f4")[:] = a
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space",
                                                  "unit": "micrometer"} for n in "zyx"]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [1, 2.0, 0.5, 0.25]},
            {"type": "translation", "translation": [0, 10, 20, 30]}]}]}]
    world = [30 + 0.25 * 7, 20 + 0.5 * 2, 10 + 2.0 * 4]  # x, y, z
    r = invoke("preview", tmp_path / "img.zarr", "--channel", 1, "--at", ",".join(map(str, world)),
               "-o", tmp_path / "p.png", "--json", tmp_path / "p.json", "-q")
    assert r.exit_code == 0, r.output
    layout = json.loads((tmp_path / "p.json").read_text())
    assert layout["rows"][0]["geometry"] == "ome"
    assert layout["rows"][0]["point_voxel"] == [4, 2, 7]
    check_bright_spot(tmp_path, layout, world, [0])


def test_oblique_plane_read_in_pieces_equals_one_read():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 13, 14)).astype(np.float32)
    t = np.deg2rad(35)
    affine = np.eye(4)
    affine[:3, :3] = [[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]]
    src = viz.SliceSource("a", a.shape, (0, 1, 2), {}, affine, "affine")
    grid = viz.world_grid([src])
    point = src.centre()
    for plane in viz.PLANES:
        whole = viz.sample_plane(a, src, grid, plane, point)
        pieces = viz.sample_plane(a, src, grid, plane, point, budget=20)
        np.testing.assert_array_equal(whole, pieces)
        index, inside = viz.plane_voxels(src, grid, plane, point)
        assert inside.sum() > 50
        np.testing.assert_array_equal(whole[inside], a[tuple(index[inside].T)])
        assert np.isnan(whole[~inside]).all()


def test_intensity_window():
    planes = [np.arange(101, dtype=np.float32).reshape(1, -1), np.full((2, 2), np.nan)]
    assert viz.intensity_window(planes, (1, 99)) == (1.0, 99.0)
    assert viz.intensity_window(planes, (1, 99), vmax=50) == (1.0, 50.0)
    spike = np.zeros((20, 20), np.float32)
    spike[3, 3] = 7
    assert viz.intensity_window([spike], (1, 99)) == (0.0, 7.0)  # collapsed: full range
    assert viz.intensity_window([np.full((2, 2), np.nan)]) == (0.0, 1.0)


def test_errors_are_one_line(tmp_path):
    a = np.zeros((4, 4, 4), np.float32)
    np.save(tmp_path / "v.npy", a)
    (tmp_path / "old.png").write_bytes(b"keep")
    cases = [
        (["--at", "1,2"], "expected three comma-separated numbers"),
        (["--at", "100,0,0"], "lies outside every volume"),
        (["--at", "1,1,1", "--at-voxel", "1,1,1"], "give --at or --at-voxel, not both"),
        (["--window", "99,1"], "expected two percentiles"),
        (["--cmap", "nope"], "--cmap nope: not a matplotlib colormap"),
        (["-o", tmp_path / "p.jpg"], "expected a .png file"),
        (["-o", tmp_path / "old.png"], "exists; pass --overwrite"),
    ]
    for args, message in cases:
        if "-o" not in args:
            args = args + ["-o", tmp_path / "p.png"]
        r = invoke("preview", tmp_path / "v.npy", *args)
        assert r.exit_code != 0 and message in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert (tmp_path / "old.png").read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["old.png", "v.npy"]


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    np.save(tmp_path / "v.npy", np.zeros((4, 4, 4), np.float32))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    r = invoke("preview", tmp_path / "v.npy", "-o", tmp_path / "p.png")
    assert r.exit_code == 1
    assert 'needs matplotlib: pip install matplotlib (or pip install ".[preview]"' in r.output


def test_cli_start_up_does_not_import_matplotlib():
    code = ("import sys; from conv3d_cli.cli.main import cli; "
            "assert 'matplotlib' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
