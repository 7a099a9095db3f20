"""Hostile, corrupt and unlucky inputs (issue 8, item 4): links out of HDF5 files,
sizes declared far beyond the memory limit, OME-Zarr axes, complex data, a
scheduler that never answers, and the one-line message every bad input gets."""

import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FIXTURES, assert_close
from conv3d_cli import Conv3D
from conv3d_cli.api import apply_to_file, build_layer
from conv3d_cli.cli.main import cli
from conv3d_cli.engine.plan import make_plan, parse_memory
from conv3d_cli.errors import ArgumentError, Conv3DError, EngineError, VolumeError, WeightsError
from conv3d_cli.io import open_volume, read_volume
from conv3d_cli.io.keras_files import ModelFile
from conv3d_cli.layers import activations
from conv3d_cli.weights import load_weights
from reference import conv3d as ref_conv3d

MODELS = os.path.join(FIXTURES, "models")
executors_mod = importlib.import_module("conv3d_cli.engine.executors")
# Python exception class names must never reach the user.
EXCEPTION_NAME = re.compile(r"\b(\w+Error|\w*Exception|StopIteration|Traceback)\b")


def cli_run(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def one_line_error(result, *needles):
    """The CLI failed with one line naming ``needles`` and no Python exception name."""
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert not EXCEPTION_NAME.search(lines[0][len("Error: "):]), lines[0]
    assert "conv3d-keras-" not in lines[0], lines[0]  # an internal temporary path
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def vol(tmp_path):
    a = np.random.default_rng(0).standard_normal((6, 7, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", a)
    return tmp_path, a


# ----------------------------------------------------------------- HDF5 links
@pytest.fixture
def linked(tmp_path):
    """other.h5 holds data; the files around it reach it through links."""
    a = np.random.default_rng(1).standard_normal((4, 5, 6)).astype(np.float32)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["secret"] = a
        f["grp/data"] = a
    with h5py.File(tmp_path / "soft_to_ext.h5", "w") as f:
        f["ext"] = h5py.ExternalLink("other.h5", "/secret")
        f["vol"] = h5py.SoftLink("/ext")
    with h5py.File(tmp_path / "under_ext.h5", "w") as f:
        f["g"] = h5py.ExternalLink("other.h5", "/grp")
    with h5py.File(tmp_path / "soft_under.h5", "w") as f:  # a soft link to a path through one
        f["g"] = h5py.ExternalLink("other.h5", "/grp")
        f["s"] = h5py.SoftLink("/g/data")
    with h5py.File(tmp_path / "dangling.h5", "w") as f:
        f["vol"] = h5py.SoftLink("/nothing")
    with h5py.File(tmp_path / "loop.h5", "w") as f:
        f["a"] = h5py.SoftLink("/b")
        f["b"] = h5py.SoftLink("/a")
    with h5py.File(tmp_path / "inner.h5", "w") as f:
        f["deep/real"] = a
        f["alias"] = h5py.SoftLink("deep")  # relative: a group inside the file
    return tmp_path, a


@pytest.mark.parametrize("spec,needle", [
    ("soft_to_ext.h5:/vol", "/ext is an external link"),
    ("under_ext.h5:/g/data", "/g is an external link"),
    ("soft_under.h5:/s", "/g is an external link"),
])
def test_external_links_anywhere_on_the_path_are_refused(linked, spec, needle):
    tmp, _ = linked
    with pytest.raises(VolumeError, match=needle):
        open_volume(str(tmp / spec))
    for command in (["info"], ["shape", "--filters", "1", "--kernel-size", "1"]):
        one_line_error(cli_run(*command, tmp / spec), spec.split(":")[0], "external link")


def test_dangling_and_looping_soft_links_are_named(linked):
    tmp, _ = linked
    one_line_error(cli_run("info", f"{tmp}/dangling.h5:/vol"), "dangling.h5",
                   "soft link /vol points to /nothing", "dangling")
    one_line_error(cli_run("info", f"{tmp}/loop.h5:/a"), "loop.h5", "soft links")


def test_soft_links_inside_the_file_are_followed(linked):
    tmp, a = linked
    np.testing.assert_array_equal(read_volume(f"{tmp}/inner.h5:/alias/real")[0], a)


def _keras_with_external_vars(tmp_path, target):
    """keras3.keras whose layer 'head' has its vars group as an external link."""
    src = os.path.join(MODELS, "keras3.keras")
    with zipfile.ZipFile(src) as z:
        weights = z.read("model.weights.h5")
    (tmp_path / "w.h5").write_bytes(weights)
    with h5py.File(tmp_path / "w.h5", "a") as f:
        del f["layers/conv3d/vars"]
        f["layers/conv3d/vars"] = h5py.ExternalLink(str(target), "/v")
    out = tmp_path / "extvars.keras"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w") as o:
        for info in z.infolist():
            if info.filename == "model.weights.h5":
                o.write(tmp_path / "w.h5", "model.weights.h5")
            else:
                o.writestr(info, z.read(info))
    return out


def test_keras_vars_group_as_external_link_is_refused(tmp_path):
    with h5py.File(tmp_path / "anywhere.h5", "w") as f:
        f["v/0"] = np.ones((1, 1, 1, 4, 2), np.float32)
    model = _keras_with_external_vars(tmp_path, tmp_path / "anywhere.h5")
    with pytest.raises(WeightsError, match="external link") as info:
        build_layer(weights=str(model), layer_name="head")
    assert str(model) in str(info.value) and "conv3d-keras-" not in str(info.value)
    one_line_error(cli_run("layers", model), "extvars.keras", "external link")
    # the other layers of the file are still usable
    assert build_layer(weights=str(model), layer_name="up").filters == 3


def test_weights_file_with_soft_link_to_external_link(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["k"] = np.ones((3, 3, 3, 1, 1), np.float32)
    with h5py.File(tmp_path / "m.weights.h5", "w") as f:
        f.create_group("layers/conv3d/vars")
        f["layers/conv3d/vars/0"] = np.zeros((3, 3, 3, 1, 1), np.float32)
        f["ext"] = h5py.ExternalLink("other.h5", "/k")
        f["layers/conv3d/vars/1"] = h5py.SoftLink("/ext")
    with pytest.raises(WeightsError, match="/ext is an external link"):
        ModelFile(tmp_path / "m.weights.h5").layers[0].load_weights()


def test_messages_name_the_users_keras_not_a_temporary_file(tmp_path):
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "Conv3D", "config": {"name": "c", "filters": 1, "kernel_size": 3}}]}}
    with h5py.File(tmp_path / "w.h5", "w"):
        pass
    with zipfile.ZipFile(tmp_path / "noweights.keras", "w") as z:
        z.writestr("config.json", json.dumps(config))
        z.write(tmp_path / "w.h5", "model.weights.h5")
    with pytest.raises(WeightsError) as info:
        build_layer(weights=str(tmp_path / "noweights.keras"))
    assert str(tmp_path / "noweights.keras") in str(info.value)
    assert "conv3d-keras-" not in str(info.value)


def test_a_file_libhdf5_loops_on_is_refused_after_a_timeout(tmp_path, monkeypatch):
    """One flipped byte in a root attribute's heap makes libhdf5 loop forever
    (found by tests/test_fuzz_readers.py); the structure is read in a child first."""
    data = bytearray(Path(os.path.join(MODELS, "keras2_weights.h5")).read_bytes())
    data[2145] = 10
    (tmp_path / "loops.h5").write_bytes(bytes(data))
    monkeypatch.setenv("CONV3D_HDF5_TIMEOUT", "1")
    start = time.monotonic()
    one_line_error(cli_run("layers", tmp_path / "loops.h5"), "loops.h5",
                   "did not finish within 1 s", "CONV3D_HDF5_TIMEOUT")
    assert time.monotonic() - start < 30
    from conv3d_cli.io.hdf5 import probe
    with pytest.raises(VolumeError, match="x.h5: libhdf5 crashed reading the file .SIGSEGV"):
        probe(lambda: os.kill(os.getpid(), signal.SIGSEGV), "x.h5", VolumeError)
    probe(lambda: 1 / 0, "x.h5", VolumeError)  # errors are the caller's to report


def test_huge_hdf5_chunks_are_refused(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("d", shape=(2048, 2048, 1024), dtype="f4", chunks=(1024, 1024, 512),
                         compression="gzip")  # 2 GiB chunks, nothing stored
    with pytest.raises(VolumeError, match="chunks of .1024, 1024, 512. take more than 1024 MiB"):
        open_volume(str(tmp_path / "c.h5"))


# ------------------------------------------------- sizes checked before allocating
def _npz_declaring(path, shape, dtype="<f4"):
    """A .npz whose kernel declares ``shape`` (zeros: compresses to almost nothing)."""
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("kernel.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": dtype, "fortran_order": False, "shape": shape})
            block = bytes(1 << 20)
            for start in range(0, count, len(block)):
                fh.write(block[:min(len(block), count - start)])


def _peak_allocated(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_npz_declaring_more_than_the_limit_is_refused_unread(tmp_path):
    _npz_declaring(tmp_path / "big.npz", (4, 4, 4, 256, 512))  # 32 MiB, ~30 KB on disk
    assert os.path.getsize(tmp_path / "big.npz") < 1 << 20

    def load():
        with pytest.raises(WeightsError, match=r"take 32 MiB, more than the memory limit of 8 MiB"):
            load_weights(tmp_path / "big.npz", max_bytes=8 << 20)
    assert _peak_allocated(load) < 4 << 20
    k = load_weights(tmp_path / "big.npz", max_bytes=64 << 20)["kernel"]
    assert k.shape == (4, 4, 4, 256, 512) and not k.any()


def test_compressed_hdf5_weights_declaring_more_than_the_limit_are_refused(tmp_path):
    with h5py.File(tmp_path / "big.weights.h5", "w") as f:
        g = f.create_group("layers/conv3d/vars")
        g.create_dataset("0", shape=(3, 3, 3, 512, 1024), dtype="f4", chunks=(1, 1, 1, 512, 1024),
                         compression="gzip")  # 54 MiB declared, a few KB stored
        g.create_dataset("1", shape=(1024,), dtype="f4")
    assert os.path.getsize(tmp_path / "big.weights.h5") < 1 << 20

    def load():
        with pytest.raises(WeightsError, match="more than the memory limit of 16 MiB"):
            build_layer(weights=str(tmp_path / "big.weights.h5"), memory_limit="16M")
    assert _peak_allocated(load) < 4 << 20
    r = cli_run("layers", tmp_path / "big.weights.h5", "--json")  # headers only
    assert r.exit_code == 0 and json.loads(r.output)[0]["kernel_shape"] == [3, 3, 3, 512, 1024]


@pytest.mark.parametrize("args", [
    ["--filters", "300000", "--kernel-size", "3"],
    ["--filters", "1", "--kernel-size", "300", "--padding", "same"],
])
def test_kernel_larger_than_the_limit_is_refused_before_it_is_built(vol, args):
    tmp, _ = vol
    for command in (["shape", tmp / "v.npy"], ["shape", "--input-shape", "1,8,8,8,1"],
                    ["run", tmp / "v.npy", tmp / "o.npy"]):
        r = cli_run(*command, *args, "--memory-limit", "64M")
        one_line_error(r, "--memory-limit", "to initialize")
    assert not (tmp / "o.npy").exists()
    from conv3d_cli.api import check_kernel_fits
    with pytest.raises(ArgumentError, match="to initialize"):
        check_kernel_fits(Conv3D(300000, 3), 4, "64M")


def test_forced_chunk_shape_over_the_limit(monkeypatch):
    # this process's resident size depends on the tests run before: fix it
    monkeypatch.setattr("conv3d_cli.engine.plan.process_baseline", lambda: 150 << 20)
    layer = Conv3D(1, 3, use_bias=False)
    job = layer.job((1, 64, 256, 256, 1))
    with pytest.raises(ArgumentError, match=r"--chunk-shape 64,256,256: a 62x254x254 tile needs"):
        make_plan(job, "direct", memory_limit="200M", workers=1, chunk_shape=(64, 256, 256))
    # fits once, not twice: fewer tiles at once, and the plan says so
    plan = make_plan(job, "direct", memory_limit="300M", workers=2, chunk_shape=(32, 254, 254))
    assert plan.workers == 1
    assert any("1 of the 2 workers run at once" in n for n in plan.summary(job)["notes"])
    assert plan.peak_bytes <= plan.memory_limit
    with pytest.raises(ArgumentError, match="Expected 3 positive integers"):
        make_plan(job, "direct", workers=1, chunk_shape=(4, 4))


def test_parent_holds_few_blocks_for_a_single_writer(tmp_path, monkeypatch, rng):
    """Tiles in flight are bounded: an HDF5 output (written by the parent) must
    not collect every finished block in the parent before writing it."""
    a = rng.standard_normal((24, 20, 20)).astype(np.float32)
    np.save(tmp_path / "in.npy", a)
    submitted, written, worst = [0], [0], [0]
    real_submit = executors_mod.ProcessPoolExecutor.submit

    def submit(self, fn, *args):
        submitted[0] += 1
        return real_submit(self, fn, *args)

    def track(write):
        def wrapped(*args):
            worst[0] = max(worst[0], submitted[0] - written[0])
            written[0] += 1
            return write(*args)
        return wrapped

    monkeypatch.setattr(executors_mod.ProcessPoolExecutor, "submit", submit)
    from conv3d_cli.layout import CanonicalView
    monkeypatch.setattr(CanonicalView, "write", track(CanonicalView.write))
    layer = Conv3D(2, 3, padding="same")
    layer.build((1, 24, 20, 20, 1))
    apply_to_file(layer, str(tmp_path / "in.npy"), f"{tmp_path}/o.h5:/y", workers=2,
                  chunk_shape=(2, 20, 20), progress=False)
    assert written[0] == 12 and worst[0] <= executors_mod.IN_FLIGHT * 2, worst
    with h5py.File(tmp_path / "o.h5") as f:
        expected = ref_conv3d(a[None, ..., None], layer.kernel, layer.bias, padding="same")[0]
        assert_close(f["y"][...], expected)


def _tree_pss(pid):
    """PSS of ``pid`` and its descendants (pages shared after a fork counted once)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                total += sum(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss:"))
        except OSError:
            pass
    return total


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc")
def test_hdf5_output_with_two_workers_stays_under_the_limit(tmp_path):
    """Measured: the process tree's peak PSS, sampled, with an HDF5 output (blocks come
    back to the parent) and 2 workers. Finished blocks piled up in the parent before
    (449 MiB against a 384 MiB limit on this volume)."""
    shape = (160, 512, 512)  # 160 MiB of float32
    src = np.lib.format.open_memmap(tmp_path / "in.npy", mode="w+", dtype=np.float32,
                                    shape=shape)
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], 32):
        src[z:z + 32] = rng.standard_normal((32,) + shape[1:], dtype=np.float32)
    src.flush()
    del src
    limit = 384 << 20
    proc = subprocess.Popen(
        [sys.executable, "-c", "from conv3d_cli.cli.main import main; main()", "run",
         str(tmp_path / "in.npy"), f"{tmp_path}/out.h5:/y", "--filters", "1",
         "--kernel-size", "3", "--workers", "2", "--memory-limit", str(limit), "-q"],
        stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_pss(proc.pid))
        time.sleep(0.02)
    err = proc.communicate()[1]  # and close the pipe
    assert proc.returncode == 0, err
    assert peak <= limit, f"peak PSS {peak >> 20} MiB over the {limit >> 20} MiB limit"
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["y"].shape == (158, 510, 510)


def test_memory_limit_values():
    for text in ("9" * 400, "1e999", "inf", "-5M", "0", "12 parsecs"):
        with pytest.raises(ArgumentError, match="memory_limit"):
            parse_memory(text)
    for value in (float("inf"), float("nan"), True):
        with pytest.raises(ArgumentError):
            parse_memory(value)
    assert parse_memory("1.5G") == 3 << 29
    r = cli_run("shape", "--input-shape", "1,8,8,8,1", "--filters", "1", "--kernel-size", "3",
                "--memory-limit", "9" * 400)
    line = one_line_error(r, "--memory-limit")
    assert len(line) < 200


# ------------------------------------------------------- OME-Zarr axes, complex data
zarr = pytest.importorskip("zarr", reason="zarr is part of the test extra")


def _ome(path, a, axes, version="0.4", fmt=2, scale=None):
    root = zarr.open_group(store=str(path), mode="w", zarr_format=fmt)
    root.create_array("0", shape=a.shape, chunks=a.shape, dtype=a.dtype)[...] = a
    level = {"path": "0"}
    if scale is not None:
        level["coordinateTransformations"] = [{"type": "scale", "scale": scale}]
    ms = [{"version": version, "axes": axes, "datasets": [level]}]
    if fmt == 3:
        root.attrs["ome"] = {"version": "0.5", "multiscales": [{k: v for k, v in ms[0].items()
                                                                if k != "version"}]}
    else:
        root.attrs["multiscales"] = ms
    return str(path)


def _axes(names):
    kinds = {"t": "time", "c": "channel"}
    return [{"name": n, "type": kinds.get(n, "space")} for n in names]


@pytest.mark.parametrize("fmt", [2, 3])
def test_ome_channels_first_is_read_as_channels_whatever_the_data_format(tmp_path, rng, fmt):
    a = rng.standard_normal((2, 7, 6, 5)).astype(np.float32)  # c, z, y, x
    store = _ome(tmp_path / "img.zarr", a, _axes("czyx"), fmt=fmt, scale=[1, 2.0, 1, 1])
    layer = Conv3D(3, 3, padding="same")  # channels_last: the file's c is still channels
    layer.build((1, 7, 6, 5, 2))
    apply_to_file(layer, store, str(tmp_path / "out.npy"), progress=False)
    expected = ref_conv3d(a[None], layer.kernel, layer.bias, padding="same",
                          data_format="channels_first")[0]
    assert_close(np.load(tmp_path / "out.npy"), expected)  # (f, z, y, x), like the file


def test_ome_time_axis_is_a_batch(tmp_path, rng):
    a = rng.standard_normal((3, 6, 5, 4)).astype(np.float32)  # t, z, y, x
    store = _ome(tmp_path / "t.zarr", a, _axes("tzyx"))
    vol = open_volume(store)
    assert vol.shape == (3, 1, 6, 5, 4)
    np.testing.assert_array_equal(vol.array[1, :, 2:4], a[1, None, 2:4])
    layer = Conv3D(2, 3, padding="same")
    layer.build((1, 6, 5, 4, 1))
    apply_to_file(layer, store, str(tmp_path / "o.zarr"), progress=False)
    out_root = zarr.open_group(store=str(tmp_path / "o.zarr"), mode="r")
    assert [ax["name"] for ax in out_root.attrs["multiscales"][0]["axes"]] == list("tczyx")
    got = zarr.open_array(store=str(tmp_path / "o.zarr"), path="data", mode="r")[...]
    expected = ref_conv3d(a[:, None], layer.kernel, layer.bias, padding="same",
                          data_format="channels_first")
    assert_close(got, expected)
    b = rng.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)  # t, c, z, y, x
    store = _ome(tmp_path / "tc.zarr", b, _axes("tczyx"))
    layer = Conv3D(1, 3, use_bias=False)
    layer.build((1, 4, 4, 4, 2))
    apply_to_file(layer, store, str(tmp_path / "tc.npy"), progress=False)
    assert_close(np.load(tmp_path / "tc.npy"),
                 ref_conv3d(b, layer.kernel, data_format="channels_first"))


@pytest.mark.parametrize("axes,shape,needle", [
    (_axes("yx"), (5, 6), "expected [t,] [c,] z, y, x"),
    (_axes("zyxc"), (4, 5, 6, 2), "expected [t,] [c,] z, y, x"),
    (_axes("ctzyx"), (2, 2, 4, 5, 6), "expected [t,] [c,] z, y, x"),
    ([{"name": "z", "type": "space"}, {"name": "y", "type": "space"},
      {"name": "q", "type": "wavelength"}], (4, 5, 6), "axis 'q'"),
    (_axes("zyx"), (2, 4, 5, 6), "3 axes for an array of rank 4"),
    ("zyx", (4, 5, 6), "'axes' is not a list"),
    ([{"type": "space"}] * 3, (4, 5, 6), "has no name"),
])
def test_ome_axes_that_cannot_be_mapped_are_refused(tmp_path, axes, shape, needle):
    store = _ome(tmp_path / "bad.zarr", np.zeros(shape, np.float32), axes)
    with pytest.raises(VolumeError, match=re.escape(needle)):
        open_volume(store)
    one_line_error(cli_run("info", store), "bad.zarr")


@pytest.mark.parametrize("multiscales,needle", [
    ("junk", "not a list of images"),
    ([], "not a list of images"),
    ([{"version": "0.4", "datasets": [{"nopath": 1}]}], "no 'datasets' with a 'path'"),
    ([{"version": "0.4", "datasets": [{"path": "nothere"}]}], "not a readable Zarr array"),
    ([{"version": "0.4", "axes": _axes("zyx"), "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, "x", 1]}]}]}],
     "the scale of level 0 is not 3 finite numbers"),
    ([{"version": "0.4", "axes": _axes("zyx"), "datasets": [
        {"path": "0", "coordinateTransformations": "oops"}]}], "coordinateTransformations"),
])
def test_bad_ome_metadata_is_one_line_naming_the_store(tmp_path, multiscales, needle):
    root = zarr.open_group(store=str(tmp_path / "m.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=(4, 4, 4), chunks=(4, 4, 4), dtype="f4")
    root.attrs["multiscales"] = multiscales
    with pytest.raises(VolumeError, match=re.escape(needle)):
        open_volume(str(tmp_path / "m.zarr"))
    one_line_error(cli_run("shape", tmp_path / "m.zarr", "--filters", "1", "--kernel-size", "1"),
                   "m.zarr")


def test_complex_and_corrupt_zarr(tmp_path):
    z = zarr.create_array(store=str(tmp_path / "c.zarr"), shape=(4, 4, 4), chunks=(4, 4, 4),
                          dtype="c8")
    z[...] = 1 + 2j
    with pytest.raises(VolumeError, match="expected real numbers.*complex64"):
        open_volume(str(tmp_path / "c.zarr"))
    one_line_error(cli_run("run", tmp_path / "c.zarr", tmp_path / "o.npy", "--filters", "1",
                           "--kernel-size", "1"), "c.zarr", "complex")
    z = zarr.create_array(store=str(tmp_path / "k.zarr"), shape=(8, 8, 8), chunks=(4, 4, 4),
                          dtype="f4")
    z[...] = 1
    for root, _, files in os.walk(tmp_path / "k.zarr" / "c"):
        for name in files:
            p = os.path.join(root, name)
            data = bytearray(Path(p).read_bytes())
            data[len(data) // 2] ^= 0xFF
            data[-1] ^= 0xFF
            Path(p).write_bytes(bytes(data))
    one_line_error(cli_run("run", tmp_path / "k.zarr", tmp_path / "k.npy", "--filters", "1",
                           "--kernel-size", "1", "--workers", "1"), "k.zarr", "cannot read")
    assert not (tmp_path / "k.npy").exists()


def test_zarr_chunk_linked_out_of_the_store_is_refused(tmp_path):
    secret = np.arange(64, dtype=np.float32)
    (tmp_path / "secret.bin").write_bytes(secret.tobytes())
    z = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=(4, 4, 4), chunks=(4, 4, 4),
                          dtype="f4", compressors=None, zarr_format=2)
    z[...] = 1  # not the fill value: the chunk is written
    os.unlink(tmp_path / "l.zarr" / "0.0.0")
    os.symlink(tmp_path / "secret.bin", tmp_path / "l.zarr" / "0.0.0")
    assert zarr.open_array(str(tmp_path / "l.zarr"), mode="r")[...].sum() == secret.sum()
    with pytest.raises(VolumeError, match="0.0.0 is a link to .*secret.bin, outside the store"):
        open_volume(str(tmp_path / "l.zarr"))
    os.unlink(tmp_path / "l.zarr" / "0.0.0")
    shutil.copy(tmp_path / "secret.bin", tmp_path / "l.zarr" / "data.bin")
    os.symlink("data.bin", tmp_path / "l.zarr" / "0.0.0")  # inside the store: fine
    np.testing.assert_array_equal(read_volume(str(tmp_path / "l.zarr"))[0].ravel(), secret)


def test_huge_zarr_chunks_are_refused(tmp_path):
    zarr.create_array(store=str(tmp_path / "c.zarr"), shape=(4096, 4096, 64),
                      chunks=(4096, 4096, 32), dtype="f4")  # 2 GiB chunks, nothing stored
    with pytest.raises(VolumeError, match="c.zarr: chunks of .4096, 4096, 32. take more than"):
        open_volume(str(tmp_path / "c.zarr"))


def test_junk_resume_record(vol):
    tmp, _ = vol
    done = tmp / "r.zarr.partial" / ".conv3d" / "done"
    done.mkdir(parents=True)
    for record in ("junk{", "[1]", '{"tiles": 5}'):
        (done.parent / "plan.json").write_text(record)
        one_line_error(cli_run("run", tmp / "v.npy", tmp / "r.zarr", "--filters", "1",
                               "--kernel-size", "1", "--resume"), "--resume", "plan.json")


# ------------------------------------------------------------------ the scheduler
@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted, stop = [], threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_scheduler_that_never_answers_times_out(vol, silent_server, monkeypatch):
    pytest.importorskip("distributed")
    tmp, _ = vol
    monkeypatch.setenv("CONV3D_SCHEDULER_TIMEOUT", "1")
    start = time.monotonic()
    r = cli_run("run", tmp / "v.npy", tmp / "o.npy", "--filters", "1", "--kernel-size", "1",
                "--scheduler", f"tcp://127.0.0.1:{silent_server}")
    one_line_error(r, f"--scheduler tcp://127.0.0.1:{silent_server}", "no answer within 1 s",
                   "CONV3D_SCHEDULER_TIMEOUT")
    assert time.monotonic() - start < 20
    assert not (tmp / "o.npy").exists()
    monkeypatch.setenv("CONV3D_SCHEDULER_TIMEOUT", "soon")
    one_line_error(cli_run("run", tmp / "v.npy", tmp / "o.npy", "--filters", "1",
                           "--kernel-size", "1", "--scheduler", "tcp://127.0.0.1:1"),
                   "CONV3D_SCHEDULER_TIMEOUT")


@pytest.mark.slow
def test_a_failing_task_on_a_local_cluster_is_one_line(tmp_path):
    """The worker processes of a LocalCluster log a failed task's traceback on the
    same stderr; only the tool's line must show."""
    pytest.importorskip("distributed")
    z = zarr.create_array(store=str(tmp_path / "k.zarr"), shape=(8, 8, 8), chunks=(4, 4, 4),
                          dtype="f4")
    z[...] = 1
    chunk = tmp_path / "k.zarr" / "c" / "0" / "0" / "0"
    chunk.write_bytes(b"\xff" * len(chunk.read_bytes()))
    env = {**os.environ, "CONV3D_DEBUG": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", "from conv3d_cli.cli.main import main; main()", "run",
         str(tmp_path / "k.zarr"), str(tmp_path / "o.npy"), "--filters", "1", "--kernel-size",
         "1", "--scheduler", "local", "--workers", "2", "-q"],
        capture_output=True, text=True, timeout=300, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert "k.zarr" in lines[0] and not EXCEPTION_NAME.search(lines[0][7:]), lines[0]


@pytest.mark.parametrize("address", ["not a url", "tcp://host-without-port", ""])
def test_scheduler_address_is_checked(vol, address):
    pytest.importorskip("distributed")
    tmp, _ = vol
    r = cli_run("run", tmp / "v.npy", tmp / "o.npy", "--filters", "1", "--kernel-size", "1",
                "--scheduler", address)
    one_line_error(r, "--scheduler", "not a scheduler address")


# ------------------------------------------------------------- option parsing
def test_activation_as_keras_serialized_json(vol):
    tmp, a = vol
    relu = activations.get("relu")
    for text in ('{"class_name": "relu", "config": {}}',
                 '{"module": "keras.activations", "class_name": "function", "config": "relu", '
                 '"registered_name": "function"}',
                 '{"module": "builtins", "class_name": "function", "config": "relu", '
                 '"registered_name": "function"}'):
        act = activations.get(text)
        assert act.name == relu.name and act.kwargs == {}
        r = cli_run("run", tmp / "v.npy", tmp / "o.npy", "--filters", "1", "--kernel-size", "1",
                    "--activation", text, "--kernel-initializer", "ones", "--overwrite", "-q")
        assert r.exit_code == 0, r.output
        np.testing.assert_allclose(np.load(tmp / "o.npy"), np.maximum(a, 0), rtol=1e-6)
    act = activations.get('{"class_name": "leaky_relu", "config": {"negative_slope": 0.5}}')
    np.testing.assert_allclose(act(np.array([-2.0, 2.0])), [-1.0, 2.0])
    for bad in ('{"class_name": "relu", "config": [1]}', "[1, 2]", '{"class_name": 5}',
                'relu:{"max_value": [1, 2, 3]}', "{" * 5000):
        with pytest.raises(ArgumentError):
            activations.get(bad)


def test_seed_must_be_non_negative(vol):
    tmp, _ = vol
    one_line_error(cli_run("run", tmp / "v.npy", tmp / "o.npy", "--filters", "1",
                           "--kernel-size", "1", "--seed", "-1"), "--seed")
    with pytest.raises(ArgumentError, match="seed"):
        build_layer(overrides={"filters": 1, "kernel_size": 1}, seed=-1)
    config = {"filters": 1, "kernel_size": 1,
              "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": -3}}}
    with pytest.raises(ArgumentError, match="seed"):
        build_layer(config=config)


def test_chunk_shape_needs_three_sizes(vol):
    tmp, _ = vol
    one_line_error(cli_run("run", tmp / "v.npy", tmp / "o.npy", "--filters", "1",
                           "--kernel-size", "1", "--chunk-shape", "4,4"),
                   "--chunk-shape", "expected 3 sizes D,H,W")
    r = cli_run("shape", tmp / "v.npy", "--filters", "1", "--kernel-size", "1",
                "--chunk-shape", "4", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["plan"]["tile_shape"] == [4, 4, 4]


# ------------------------------------------------------ every message: one line
def _write_cases(tmp):
    """(name, CLI arguments, what the message must name) for bad inputs of every kind."""
    np.save(tmp / "v.npy", np.zeros((6, 7, 8), np.float32))
    np.save(tmp / "empty.npy", np.zeros((0, 5, 5), np.float32))
    np.save(tmp / "r1.npy", np.zeros(5, np.float32))
    np.save(tmp / "r2.npy", np.zeros((5, 5), np.float32))
    (tmp / "list.json").write_text("[1, 2]")
    (tmp / "num.json").write_text("5")
    (tmp / "deep.json").write_text("[" * 5000 + "]" * 5000)
    (tmp / "deepobj.json").write_text('{"a":' * 5000 + "1" + "}" * 5000)
    (tmp / "cfglist.json").write_text('{"class_name": "Conv3D", "config": [1]}')
    (tmp / "badinit.json").write_text(json.dumps(
        {"filters": 1, "kernel_size": 1, "kernel_initializer": {"class_name": 5}}))
    (tmp / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp / "notzip.npz").write_bytes(b"hello, not a zip")
    np.savez(tmp / "k.npz", kernel=np.ones((1, 1, 1, 1, 1), np.float32))
    np.save(tmp / "obj.npy", np.array([{}], dtype=object), allow_pickle=True)
    np.savez(tmp / "objs.npz", kernel=np.array([{}], dtype=object))
    np.savez(tmp / "names.npz", weights=np.ones(3))
    _encrypt(tmp / "k.npz", tmp / "enc.npz")
    _encrypt(os.path.join(MODELS, "keras3.keras"), tmp / "enc.keras")
    h5 = Path(os.path.join(MODELS, "keras3.weights.h5")).read_bytes()
    for name, config in (("cfglist", "[1, 2]"), ("cfgnum", "5"),
                         ("cfgdeep", "[" * 5000 + "]" * 5000),
                         ("cfglayer", json.dumps({"class_name": "Sequential", "config": {
                             "layers": [{"class_name": "Conv3D", "config": [1]}]}})),
                         ("cfgnest", _nested_models(200))):
        with zipfile.ZipFile(tmp / f"{name}.keras", "w") as z:
            z.writestr("config.json", config)
            z.writestr("model.weights.h5", h5)
    with h5py.File(tmp / "badcfg.h5", "w") as f:
        f.attrs["model_config"] = "{not json"
    with h5py.File(tmp / "rank1.h5", "w") as f:
        f["d"] = np.zeros(5)
    with h5py.File(tmp / "null.h5", "w") as f:
        f["d"] = h5py.Empty("f4")
    with h5py.File(tmp / "corrupt.h5", "w") as f:
        f.create_dataset("d", data=np.random.default_rng(0).standard_normal((16, 16, 16)),
                         chunks=(8, 8, 8), compression="gzip")
    data = bytearray((tmp / "corrupt.h5").read_bytes())
    for k in range(len(data) // 2, len(data) - 200, 97):
        data[k] ^= 0xFF
    (tmp / "corrupt.h5").write_bytes(bytes(data))
    os.mkfifo(tmp / "fifo.npy")
    os.mkdir(tmp / "dir.npy")
    one = ["--filters", "1", "--kernel-size", "1"]
    return [
        ("empty", ["run", "empty.npy", "o1.npy", *one], ["empty.npy"]),
        ("rank1", ["run", "r1.npy", "o2.npy", *one], ["r1.npy"]),
        ("rank2", ["shape", "r2.npy", *one], ["r2.npy"]),
        ("h5 rank1", ["run", "rank1.h5", "o3.npy", *one], ["rank1.h5"]),
        ("h5 null", ["info", "null.h5:/d"], ["null.h5"]),
        ("h5 corrupt", ["run", "corrupt.h5", "o4.npy", *one, "--workers", "1"], ["corrupt.h5"]),
        ("config list", ["run", "v.npy", "o5.npy", "--config", "list.json"],
         ["--config list.json"]),
        ("config number", ["run", "v.npy", "o6.npy", "--config", "num.json"],
         ["--config num.json"]),
        ("config deep", ["run", "v.npy", "o7.npy", "--config", "deep.json"],
         ["--config deep.json"]),
        ("config deep obj", ["shape", "v.npy", "--config", "deepobj.json"], ["--config"]),
        ("config config", ["shape", "v.npy", "--config", "cfglist.json"], ["--config"]),
        ("config binary", ["shape", "v.npy", "--config", "binary.json"], ["--config"]),
        ("config missing", ["shape", "v.npy", "--config", "nope.json"], ["nope.json"]),
        ("config init", ["shape", "v.npy", "--config", "badinit.json"], ["kernel_initializer"]),
        ("npz not zip", ["run", "v.npy", "o8.npy", "--weights", "notzip.npz"],
         ["notzip.npz", "not a zip archive"]),
        ("npz encrypted", ["run", "v.npy", "o9.npy", "--weights", "enc.npz"],
         ["enc.npz", "encrypted"]),
        ("npz objects", ["shape", "v.npy", "--weights", "objs.npz"], ["objs.npz", "pickled"]),
        ("npy objects", ["shape", "v.npy", "--weights", "obj.npy"], ["obj.npy", "pickled"]),
        ("npz names", ["shape", "v.npy", "--weights", "names.npz"], ["names.npz"]),
        ("weights fifo", ["shape", "v.npy", "--weights", "fifo.npy"], ["fifo.npy"]),
        ("input fifo", ["info", "fifo.npy"], ["fifo.npy"]),
        ("input dir", ["info", "dir.npy"], ["dir.npy"]),
        ("keras encrypted", ["layers", "enc.keras"], ["enc.keras", "encrypted"]),
        ("keras config list", ["layers", "cfglist.keras"], ["cfglist.keras"]),
        ("keras config number", ["layers", "cfgnum.keras"], ["cfgnum.keras"]),
        ("keras config deep", ["layers", "cfgdeep.keras"], ["cfgdeep.keras"]),
        ("keras layer config", ["layers", "cfglayer.keras"], ["cfglayer.keras"]),
        ("keras nested models", ["layers", "cfgnest.keras"], ["cfgnest.keras"]),
        ("legacy config", ["layers", "badcfg.h5"], ["badcfg.h5"]),
        ("chunk shape", ["run", "v.npy", "o10.npy", *one, "--chunk-shape", "4,4"],
         ["--chunk-shape"]),
        ("memory limit", ["run", "v.npy", "o11.npy", *one, "--memory-limit", "9" * 400],
         ["--memory-limit"]),
        ("seed", ["run", "v.npy", "o12.npy", *one, "--seed", "-1"], ["--seed"]),
        ("input shape", ["shape", "--input-shape", "4,4", *one], ["--input-shape"]),
        ("activation", ["shape", "v.npy", *one, "--activation", '{"class_name": 5}'],
         ["activation"]),
    ]


def _encrypt(src, dst):
    """A copy of the zip ``src`` whose members are flagged as encrypted."""
    data = bytearray(Path(src).read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.find(signature)
        while i >= 0:
            data[i + offset] |= 1
            i = data.find(signature, i + 4)
    Path(dst).write_bytes(bytes(data))


def _nested_models(depth):
    config = {"class_name": "Conv3D", "config": {"name": "c", "filters": 1, "kernel_size": 1}}
    for i in range(depth):
        config = {"class_name": "Sequential", "config": {"name": f"s{i}", "layers": [config]}}
    return json.dumps(config)


def test_every_bad_input_gets_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, args, needles in _write_cases(tmp_path):
        result = cli_run(*args)
        try:
            one_line_error(result, *needles)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None
    assert not [p for p in os.listdir(tmp_path) if re.fullmatch(r"o\d+\.npy", p)]


def test_errors_are_conv3d_errors_in_the_api(tmp_path):
    """The library raises the tool's errors, never a library's, for the same inputs."""
    cases = _write_cases(tmp_path)
    assert cases
    for spec in ("empty.npy", "r1.npy", "null.h5:/d", "fifo.npy", "dir.npy"):
        with pytest.raises(Conv3DError):
            vol = open_volume(str(tmp_path / spec))
            try:
                apply_to_file(Conv3D(1, 1), vol.spec, str(tmp_path / "api.npy"), progress=False)
            finally:
                vol.close()
    for weights in ("notzip.npz", "enc.npz", "objs.npz", "enc.keras", "cfgdeep.keras"):
        with pytest.raises(Conv3DError):
            build_layer(weights=str(tmp_path / weights))
    with pytest.raises(EngineError):
        from conv3d_cli.engine.distributed import _probe
        _probe("tcp://127.0.0.1:1", 0.5)
