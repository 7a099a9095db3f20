"""Files through every executor, in many tiles, against the reference; the memory
model's worker count; OUTPUT never written over INPUT."""

import contextlib
import importlib
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_close
from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.api import apply_to_file
from conv3d_cli.cli.main import cli
from conv3d_cli.engine import plan_job
from conv3d_cli.errors import VolumeError
from conv3d_cli.io import write_volume
from reference import conv3d as ref_conv3d
from reference import conv3d_transpose as ref_conv3d_transpose

plan_mod = importlib.import_module("conv3d_cli.engine.plan")
CHUNK = (3, 4, 5)  # 4 x 3 x 3 = 36 tiles of the (10, 11, 12) volume below


def _layer(cls=Conv3D, **kwargs):
    layer = cls(2, 3, padding="same", **kwargs)
    layer.build((1, 10, 11, 12, 1))
    rng = np.random.default_rng(3)
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    return layer


def _expected(layer, a):
    ref = ref_conv3d if isinstance(layer, Conv3D) else ref_conv3d_transpose
    return ref(a[None, ..., None], layer.kernel, layer.bias, layer.strides, "same")[0]


@pytest.fixture
def volume(tmp_path):
    a = np.random.default_rng(2).standard_normal((10, 11, 12)).astype(np.float32)
    np.save(tmp_path / "in.npy", a)
    return tmp_path, a


def _read(path):
    if path.endswith(".h5:/out"):
        with h5py.File(path[:-len(":/out")], "r") as f:
            return f["out"][...]
    if ".zarr" in path:
        import zarr
        return zarr.open_array(store=path, path="data", mode="r")[...]
    return np.asarray(nib.load(path).dataobj)


def test_hdf5_output_from_two_worker_processes_in_many_tiles(volume):
    tmp, a = volume
    layer = _layer()
    report = apply_to_file(layer, str(tmp / "in.npy"), f"{tmp}/o.h5:/out", workers=2,
                           chunk_shape=CHUNK, progress=False)
    assert report["tiles"] == 36 and report["workers"] == 2
    assert_close(_read(f"{tmp}/o.h5:/out"), _expected(layer, a))
    assert sorted(os.listdir(tmp)) == ["in.npy", "o.h5"]


@pytest.fixture(scope="module")
def dask_address():
    """One local Dask cluster (two worker processes) for the module: starting one is slow."""
    distributed = pytest.importorskip("distributed",
                                      reason="dask.distributed is part of the test extra")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster:
        yield cluster.scheduler_address


@pytest.mark.parametrize("executor", ["serial", "processes", "dask"])
@pytest.mark.parametrize("output", ["o.zarr", "o.nii", "o.nii.gz"])
def test_zarr_and_nifti_outputs_in_many_tiles_on_every_executor(volume, executor, output,
                                                               request):
    if output.endswith(".zarr"):
        pytest.importorskip("zarr", reason="zarr is part of the test extra")
    tmp, a = volume
    layer = _layer(Conv3DTranspose, strides=(1, 2, 1)) if output == "o.nii" else _layer()
    scheduler = request.getfixturevalue("dask_address") if executor == "dask" else None
    report = apply_to_file(layer, str(tmp / "in.npy"), str(tmp / output), progress=False,
                           workers=1 if executor == "serial" else 2, chunk_shape=CHUNK,
                           scheduler=scheduler)
    assert report["tiles"] >= 36
    assert report["workers"] == (1 if executor == "serial" else 2)
    assert_close(_read(str(tmp / output)), _expected(layer, a))
    assert sorted(os.listdir(tmp)) == sorted(["in.npy", output])


# ----------------------------------------------------------- the memory model
@pytest.mark.parametrize("processes,limit_mib", [(True, 450), (False, 400)])
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_plan_fits_every_worker_under_the_limit(monkeypatch, workers, processes, limit_mib):
    """The limit holds for all workers together: the tiles' estimated peaks, one
    per worker, plus the processes' own memory. The limits are tight for this
    volume, so a model sized for one worker goes over."""
    monkeypatch.setattr(plan_mod, "process_baseline", lambda: 150 << 20)
    # Forked workers (a conv3d run's; threads in this process would make them forkserver's).
    monkeypatch.setenv("CONV3D_START_METHOD", "fork")
    job = Conv3D(8, 3, padding="same").job((1, 160, 160, 160, 4))
    limit = limit_mib << 20
    plan = plan_job(job, "direct", memory_limit=limit, workers=workers, processes=processes)
    assert plan.workers == workers
    est = max(plan_mod.tile_bytes(job, t.b1 - t.b0, t.shape, "direct") for t in plan.tiles)
    # Forked workers each add their private pages to the processes' memory.
    forked = workers if processes and workers > 1 else 0
    assert plan.process_bytes >= (150 << 20) + forked * plan_mod.WORKER_PRIVATE
    assert plan.process_bytes + workers * est <= limit
    assert plan.peak_bytes >= plan.process_bytes + workers * est  # the report counts them all
    assert plan.peak_bytes <= limit


def test_tight_limit_keeps_w_whole_for_softmax_under_channels_first(monkeypatch):
    """softmax acts along Keras's axis -1, W under channels_first: however small the
    limit makes the tiles, each must span W."""
    monkeypatch.setattr(plan_mod, "process_baseline", lambda: 0)
    layer = Conv3D(3, 3, padding="same", activation="softmax", data_format="channels_first",
                   bias_initializer="random_normal")
    x = np.random.default_rng(4).standard_normal((1, 2, 12, 10, 14)).astype(np.float32)
    layer.build(x.shape)
    limit = 40_000  # bytes: a few rows of this volume per tile
    plan = plan_job(layer.job(x.shape), "direct", memory_limit=limit, workers=2,
                    processes=False)
    assert len(plan.tiles) > 4 and all(t.out[2] == (0, 14) for t in plan.tiles)
    z = ref_conv3d(x, layer.kernel, layer.bias, padding="same", data_format="channels_first")
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    assert_close(layer(x, workers=2, memory_limit=limit), e / e.sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("cls,kwargs", [
    (Conv3D, dict(kernel_size=(3, 4, 1), strides=(1, 2, 3), padding="same")),
    (Conv3D, dict(kernel_size=(5, 2, 3), dilation_rate=(2, 3, 1), padding="valid")),
    (Conv3DTranspose, dict(kernel_size=(3, 4, 5), strides=(2, 3, 1), padding="same")),
    (Conv3DTranspose, dict(kernel_size=(2, 3, 4), strides=(3, 2, 2), padding="valid",
                           output_padding=(2, 1, 0))),
    (Conv3DTranspose, dict(kernel_size=3, dilation_rate=(2, 1, 3), padding="same")),
])
def test_memory_model_counts_the_halo_every_tile_reads(cls, kwargs):
    """The planner's input extent per tile covers the region the tile really reads
    (output range plus halo, from the layer's geometry); for Conv3D it is exact."""
    job = cls(1, **kwargs).job((1, 11, 10, 9, 1))
    for chunk in [(1, 2, 3), (4, 3, 5), job.out_spatial]:
        plan = plan_job(job, "direct", workers=1, chunk_shape=chunk)
        for tile in plan.tiles:
            modelled = job.input_extent(tile.shape)
            for g, (o0, o1), m in zip(job.geoms, tile.out, modelled):
                i0, i1, _ = g.terms(o0, o1)
                assert m >= i1 - i0 and (cls is not Conv3D or m == i1 - i0), (tile, g)


# ------------------------------------------------------- OUTPUT is not INPUT
def _same_file_specs(tmp):
    a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    write_volume(tmp / "v.npy", a)
    write_volume(tmp / "v.nii.gz", a, affine=np.diag([2.0, 2.0, 2.0, 1.0]))
    write_volume(f"{tmp}/v.h5:/in", a)
    os.symlink(tmp / "v.npy", tmp / "alias.npy")
    specs = [("v.npy", "v.npy"), ("v.nii.gz", "v.nii.gz"), ("v.h5:/in", "v.h5:/in"),
             ("v.h5:/in", "v.h5:/other"), ("v.npy", "alias.npy")]
    if importlib.util.find_spec("zarr") is not None:
        write_volume(f"{tmp}/v.zarr", a)
        specs.append(("v.zarr", "v.zarr"))
    return specs


def _snapshot(tmp):
    files = {}
    for root, _, names in os.walk(tmp):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                with open(path, "rb") as fh:
                    files[os.path.relpath(path, tmp)] = fh.read()
    return files


@contextlib.contextmanager
def _naming(src, dst):
    """Say which pair failed."""
    try:
        yield
    except BaseException as exc:
        exc.add_note(f"INPUT {src}, OUTPUT {dst}")
        raise


def test_output_over_input_is_refused_even_with_overwrite(tmp_path):
    specs = _same_file_specs(tmp_path)
    before = _snapshot(tmp_path)
    for src, dst in specs:
        with _naming(src, dst), \
                pytest.raises(VolumeError, match="is (the input file|or holds the input)"):
            apply_to_file(Conv3D(1, 3, padding="same"), f"{tmp_path}/{src}", f"{tmp_path}/{dst}",
                          overwrite=True, progress=False)
        assert _snapshot(tmp_path) == before, (src, dst)


def test_cli_refuses_output_over_input(tmp_path):
    _same_file_specs(tmp_path)
    before = _snapshot(tmp_path)
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "v.npy"), str(tmp_path / "alias.npy"),
                                 "--filters", "1", "--kernel-size", "3", "--overwrite"])
    assert r.exit_code != 0 and "is the input file" in r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert _snapshot(tmp_path) == before
