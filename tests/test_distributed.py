"""Zarr volumes (v2, v3, OME-Zarr), tiles on Dask (LocalCluster and a real scheduler with
two workers on loopback), and resuming an interrupted run."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_close
from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.api import apply_to_file
from conv3d_cli.errors import ArgumentError
from reference import conv3d as ref_conv3d

zarr = pytest.importorskip("zarr", reason="zarr is part of the test extra")
distributed = pytest.importorskip("distributed",
                                  reason="dask.distributed is part of the test extra")
task_mod = importlib.import_module("conv3d_cli.engine.task")


def _layer(seed=0, **kw):
    layer = Conv3D(2, 3, padding="same", **kw)
    layer.build((1, 8, 8, 8, 1))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    return layer


@pytest.fixture
def volume(tmp_path):
    a = np.random.default_rng(1).standard_normal((14, 17, 19)).astype(np.float32)
    for fmt in (2, 3):
        z = zarr.create_array(store=str(tmp_path / f"v{fmt}.zarr"), shape=a.shape,
                              chunks=(8, 8, 8), dtype="f4", zarr_format=fmt)
        z[:] = a
    return tmp_path, a


def _read(path, array="data"):
    return zarr.open_array(store=str(path), path=array, mode="r")


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_in_and_out_chunked_like_tiles(volume, fmt):
    tmp, a = volume
    layer = _layer()
    report = apply_to_file(layer, str(tmp / f"v{fmt}.zarr"), f"{tmp}/o.zarr:/grp/out", workers=2,
                           chunk_shape=(5, 6, 7), progress=False)
    out = _read(tmp / "o.zarr", "grp/out")
    assert out.metadata.zarr_format == fmt and out.chunks == (5, 6, 7, 2)
    assert report["tiles"] == 3 * 3 * 3
    assert_close(out[...], ref_conv3d(a[None, ..., None], layer.kernel, layer.bias,
                                      padding="same")[0])
    assert not os.path.exists(f"{tmp}/o.zarr.partial")


def test_ome_zarr_level0_and_transforms(tmp_path):
    a = np.random.default_rng(2).standard_normal((2, 12, 10, 9)).astype(np.float32)  # c, z, y, x
    root = zarr.open_group(store=str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=a.shape, chunks=(1, 6, 5, 9), dtype="f4")[:] = a
    root.create_array("1", shape=(2, 6, 5, 4), chunks=(1, 6, 5, 4), dtype="f4")
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    level0 = [{"type": "scale", "scale": [1, 2.0, 0.5, 0.5]},
              {"type": "translation", "translation": [0, 10, 20, 30]}]
    level1 = [{"type": "scale", "scale": [1, 4.0, 1.0, 1.0]}]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": level0},
        {"path": "1", "coordinateTransformations": level1}]}]
    layer = Conv3D(3, 3, strides=2, padding="same", data_format="channels_first")
    layer.build((1, 2, 12, 10, 9))
    apply_to_file(layer, str(tmp_path / "img.zarr"), str(tmp_path / "out.zarr"), progress=False)
    out_root = zarr.open_group(store=str(tmp_path / "out.zarr"), mode="r")
    ms = out_root.attrs["multiscales"][0]
    assert ms["axes"] == axes
    transforms = {t["type"]: t[t["type"]] for t in ms["datasets"][0]["coordinateTransformations"]}
    # stride 2: voxel size doubles; output voxel 0 sits at input voxel (ke-1)/2 - pad_before
    pad = [max((-(-n // 2) - 1) * 2 + 3 - n, 0) // 2 for n in (12, 10, 9)]
    assert transforms["scale"] == [1, 4.0, 1.0, 1.0]
    assert transforms["translation"] == [0] + [t + s * (1 - p) for t, s, p in
                                               zip((10, 20, 30), (2.0, 0.5, 0.5), pad)]
    got = zarr.open_array(store=str(tmp_path / "out.zarr"), path=ms["datasets"][0]["path"],
                          mode="r")
    expected = ref_conv3d(a[None], layer.kernel, layer.bias, strides=(2, 2, 2), padding="same",
                          data_format="channels_first")[0]
    assert_close(got[...], expected)


def test_local_cluster_equals_local_engine(volume):
    tmp, a = volume
    layer = _layer(activation="tanh")
    apply_to_file(layer, str(tmp / "v3.zarr"), str(tmp / "local.zarr"), progress=False)
    # 100 small tiles: Dask tasks of several tiles each (engine.distributed.task_batches).
    report = apply_to_file(layer, str(tmp / "v3.zarr"), str(tmp / "dask.zarr"), workers=2,
                           chunk_shape=(3, 4, 5), scheduler="local", progress=False)
    assert report["scheduler"] == "local" and report["tiles"] == 5 * 5 * 4
    np.testing.assert_allclose(_read(tmp / "dask.zarr")[...], _read(tmp / "local.zarr")[...],
                               rtol=1e-6, atol=1e-6)


def test_real_scheduler_and_two_workers_on_loopback(volume):
    tmp, a = volume
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    sched_file = tmp / "scheduler.json"
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(200):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(2):
            procs.append(subprocess.Popen(
                [dask, "worker", address, "--nthreads", "1", "--no-dashboard",
                 "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        layer = _layer(seed=3)
        report = apply_to_file(layer, str(tmp / "v2.zarr"), str(tmp / "remote.zarr"),
                               chunk_shape=(7, 6, 10), scheduler=address, progress=False)
        assert report["workers"] == 2 and report["tiles"] == 2 * 3 * 2
        expected = ref_conv3d(a[None, ..., None], layer.kernel, layer.bias, padding="same")[0]
        assert_close(_read(tmp / "remote.zarr")[...], expected)
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_interrupted_run_resumes(volume, monkeypatch):
    tmp, a = volume
    layer = _layer(seed=4)
    real = task_mod.compute_tile
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(task_mod, "compute_tile", failing)
    with pytest.raises(KeyboardInterrupt):
        apply_to_file(layer, str(tmp / "v3.zarr"), str(tmp / "out.zarr"), workers=1,
                      chunk_shape=(5, 6, 7), progress=False)
    assert not (tmp / "out.zarr").exists()
    assert len(os.listdir(tmp / "out.zarr.partial" / ".conv3d" / "done")) == 5
    with pytest.raises(ArgumentError, match="--resume needs a Zarr OUTPUT"):
        apply_to_file(layer, str(tmp / "v3.zarr"), str(tmp / "out.npy"), resume=True)
    other = _layer(seed=5)
    with pytest.raises(ArgumentError, match="written by another job"):
        apply_to_file(other, str(tmp / "v3.zarr"), str(tmp / "out.zarr"), resume=True,
                      progress=False)
    monkeypatch.setattr(task_mod, "compute_tile", real)
    # Resumed with other workers: the recorded tiling is kept.
    report = apply_to_file(layer, str(tmp / "v3.zarr"), str(tmp / "out.zarr"), workers=2,
                           resume=True, progress=False)
    assert report["skipped_tiles"] == 5 and report["tiles"] == 27
    expected = ref_conv3d(a[None, ..., None], layer.kernel, layer.bias, padding="same")[0]
    assert_close(_read(tmp / "out.zarr")[...], expected)
    assert not (tmp / "out.zarr.partial").exists()


def test_resumed_run_computes_only_the_tiles_left(volume, monkeypatch):
    """Resuming computes the tiles the interrupted run did not write, each once,
    and none of those it wrote (their output is the same either way: only the
    count of computed tiles shows a resume that starts over)."""
    tmp, a = volume
    layer = _layer(seed=4)
    real = task_mod.compute_tile
    tiles = []

    def counting(job, tile, *args, **kwargs):
        tiles.append(tile)
        if stop_after and len(tiles) > stop_after:
            raise KeyboardInterrupt("simulated interruption")
        return real(job, tile, *args, **kwargs)

    monkeypatch.setattr(task_mod, "compute_tile", counting)
    stop_after = 5
    with pytest.raises(KeyboardInterrupt):
        apply_to_file(layer, str(tmp / "v3.zarr"), str(tmp / "out.zarr"), workers=1,
                      chunk_shape=(5, 6, 7), progress=False)
    written, tiles, stop_after = tiles[:5], [], 0
    report = apply_to_file(layer, str(tmp / "v3.zarr"), str(tmp / "out.zarr"), workers=1,
                           resume=True, progress=False)
    assert report["skipped_tiles"] == 5 and len(tiles) == len(set(tiles)) == 27 - 5
    assert not set(tiles) & set(written)
    expected = ref_conv3d(a[None, ..., None], layer.kernel, layer.bias, padding="same")[0]
    assert_close(_read(tmp / "out.zarr")[...], expected)


def test_transposed_on_local_cluster_to_npy(volume):
    tmp, a = volume
    layer = Conv3DTranspose(1, 3, strides=2, padding="same")
    layer.build((1, 8, 8, 8, 1))
    apply_to_file(layer, str(tmp / "v3.zarr"), str(tmp / "up.npy"), workers=2,
                  chunk_shape=(9, 9, 9), scheduler="local", progress=False)
    assert_close(np.load(tmp / "up.npy"), layer(a[None, ..., None])[0, ..., 0])


def test_missing_extras_say_what_to_install(volume, monkeypatch):
    tmp, _ = volume
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ArgumentError, match=r'pip install "\.\[distributed\]" in the conv3d clone'):
        apply_to_file(_layer(), str(tmp / "v3.zarr"), str(tmp / "o.npy"), scheduler="local",
                      progress=False)
    assert not (tmp / "o.npy").exists()
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ArgumentError, match=r'pip install "\.\[distributed\]" in the conv3d clone'):
        apply_to_file(_layer(), str(tmp / "v3.zarr"), str(tmp / "o.npy"), progress=False)


def test_write_and_read_volume_zarr(tmp_path):
    from conv3d_cli.io import read_volume, write_volume
    a = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    write_volume(f"{tmp_path}/w.zarr", a)
    np.testing.assert_array_equal(read_volume(f"{tmp_path}/w.zarr")[0], a)
