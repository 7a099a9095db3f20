"""NaN and +-Inf: every path gives Keras's result.

Keras sums products, so a non-finite input voxel reaches exactly the outputs
whose window holds it (NaN where a NaN, ``inf * 0`` or ``inf - inf`` occurs),
and a non-finite weight is multiplied by every value in its window, the zeros
of padding and of transposed convolution's inserted zeros included. Checked
against real Keras 3 (tools/make_nonfinite_fixtures.py) and against the
float64 reference, for every path (stencil, GEMM, scatter-transposed,
Winograd, FFT), tiled so that non-finite voxels sit inside tiles, on tile
borders and in tiles' halos, with threads, processes and Dask's tile task.
"""

import importlib
import json
import os
from functools import lru_cache

import numpy as np
import pytest

from conftest import FIXTURES, FLOAT32_RTOL
from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.api import apply_to_file
from conv3d_cli.engine import plan_job
from conv3d_cli.engine.distributed import tile_task
from conv3d_cli.engine.task import TileTask
from conv3d_cli.layers import activations, from_config
from conv3d_cli.layout import CanonicalView, Layout
from reference import conv3d as ref_conv3d
from reference import conv3d_transpose as ref_conv3d_transpose

# No RuntimeWarning may escape: Keras's arithmetic on NaN and Inf is silent.
pytestmark = pytest.mark.filterwarnings("error")

stencil_mod = importlib.import_module("conv3d_cli.engine.stencil")
winograd_mod = importlib.import_module("conv3d_cli.engine.winograd")
task_mod = importlib.import_module("conv3d_cli.engine.task")
nonfinite_mod = importlib.import_module("conv3d_cli.engine.nonfinite")
FIX = np.load(os.path.join(FIXTURES, "keras3_nonfinite.npz"))
LAYER_CASES = sorted({k.split("/")[0] for k in FIX.files
                      if k.endswith("/config") and not k.startswith("act/")})
ACT_CASES = sorted({k.rsplit("/", 1)[0] for k in FIX.files if k.startswith("act/")})
NAN, INF = np.nan, np.inf

# (method, direct formulation used by the method or by its exact recompute)
PATHS = [("direct", "stencil"), ("direct", "gemm"), ("fft", "stencil"), ("fft", "gemm"),
         ("winograd", "stencil"), ("winograd", "gemm")]
# The formulations FFT and Winograd recompute with by default (few channels for
# FFT, many for Winograd), for the Keras fixtures.
KERAS_PATHS = [("direct", "stencil"), ("direct", "gemm"), ("fft", "stencil"),
               ("winograd", "gemm")]


def _path(request, monkeypatch):
    """The method to run; the direct formulation is forced through ``MAX_CG_FG``
    (without the stencil, strided transposed layers take the scatter form).

    FFT and Winograd recompute the outputs that non-finite input reaches, or
    the whole tile when that is cheaper, as it always is at these sizes: here
    they always recompute, in blocks of 3 outputs (which do not divide the
    tiles), so that the blocks' bounds are what is tested.
    """
    name, direct = request.param
    monkeypatch.setattr(stencil_mod, "MAX_CG_FG", 10 ** 9 if direct == "stencil" else 0)
    monkeypatch.setattr(task_mod, "exact_fixup_pays", lambda *args: True)
    monkeypatch.setattr(nonfinite_mod, "BLOCK", 3)
    return name


path = pytest.fixture(params=PATHS, ids=["-".join(p) for p in PATHS])(_path)
keras_path = pytest.fixture(params=KERAS_PATHS, ids=["-".join(p) for p in KERAS_PATHS])(_path)


def assert_same_result(actual, expected):
    """The same NaN, +Inf and -Inf voxels, and finite values at FLOAT32_RTOL of scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    for what, test in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        a, e = test(actual), test(expected)
        assert np.array_equal(a, e), (
            f"{what} at {int((a & ~e).sum())} voxels too many, {int((e & ~a).sum())} missing")
    fin = np.isfinite(expected)
    scale = max(float(np.abs(expected[fin]).max()) if fin.any() else 0.0, 1e-6)
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=FLOAT32_RTOL,
                               atol=FLOAT32_RTOL * scale)


def _suits(layer, x, method):
    return method != "winograd" or winograd_mod.winograd_suits(layer.job(x.shape))


# ----------------------------------------------------------------- Keras fixtures
def keras_case(name):
    layer = from_config(json.loads(str(FIX[f"{name}/config"])))
    layer.set_weights([FIX[f"{name}/w0"], FIX[f"{name}/w1"]])
    return layer, FIX[f"{name}/x"], FIX[f"{name}/y"]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_matches_keras(case, keras_path):
    method = keras_path
    layer, x, expected = keras_case(case)
    if not _suits(layer, x, method):
        pytest.skip("winograd needs 3x3x3 stride-1 layers with 8+ channels")
    assert_same_result(layer(x, method=method), expected)
    assert_same_result(layer(x, method=method, chunk_shape=(2, 3, 2)), expected)


def test_keras_fixture_covers_the_cases():
    configs = [json.loads(str(FIX[f"{n}/config"])) for n in LAYER_CASES]
    kinds = {c["class_name"] for c in configs}
    assert kinds == {"Conv3D", "Conv3DTranspose"}
    weights = [FIX[f"{n}/w0"] for n in LAYER_CASES]
    assert any(np.isposinf(w).any() for w in weights) and any(np.isnan(w).any() for w in weights)
    assert any(not np.isfinite(FIX[f"{n}/w1"]).all() for n in LAYER_CASES)
    for test in (np.isnan, np.isposinf, np.isneginf):
        assert any(test(FIX[f"{n}/x"]).any() for n in LAYER_CASES)
    winograd = {c["class_name"] for n, c in zip(LAYER_CASES, configs)
                if _suits(*keras_case(n)[:2], "winograd")}
    assert winograd == kinds


@pytest.mark.parametrize("case", ACT_CASES)
def test_activation_matches_keras(case):
    name = case.split("_", 1)[1]
    act = activations.get({"class_name": name, "config": json.loads(str(FIX[f"{case}/args"]))})
    assert_same_result(act(FIX[f"{case}/x"].copy(), -1), FIX[f"{case}/y"])


def test_activation_fixture_covers_every_name():
    assert set(activations.NAMES) <= {c.split("_", 1)[1] for c in ACT_CASES}


# ----------------------------------------------------- the reference, tiled volumes
# Spatial points (d, h, w, channel) with tiles of 4: inside a tile, on both sides
# of tile borders (4, 8), in a tile's halo (the input row just past its output
# box), at the volume's corners, and +Inf next to -Inf across a border.
POINTS = [((1, 2, 1, 0), NAN), ((3, 3, 3, 1), INF), ((4, 4, 4, 2), -INF),
          ((5, 8, 0, 3), NAN), ((7, 7, 7, 4), INF), ((7, 7, 8, 4), -INF),
          ((0, 0, 0, 5), INF), ((11, 10, 9, 6), -INF), ((9, 1, 4, 7), NAN)]


def _volume(shape, points, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    for (d, h, w, c), v in points:
        if d < shape[1] and h < shape[2] and w < shape[3] and c < shape[4]:
            x[0, d, h, w, c] = v
    return x


def _weights(layer, x, seed=1, edit=None):
    layer.build(x.shape)
    rng = np.random.default_rng(seed)
    kernel, bias = (rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights())
    kernel[rng.random(kernel.shape) < 0.2] = 0  # zero taps: inf * 0 = NaN
    if edit is not None:
        edit(kernel)
    layer.set_weights([kernel, bias])
    return layer


def _reference(layer, x):
    with np.errstate(all="ignore"):
        if isinstance(layer, Conv3DTranspose):
            return ref_conv3d_transpose(x, layer.kernel, layer.bias, layer.strides, layer.padding,
                                        layer.output_padding, layer.dilation_rate)
        return ref_conv3d(x, layer.kernel, layer.bias, layer.strides, layer.padding,
                          layer.dilation_rate, layer.groups)


def _inf_weights(k):
    k[0, 1, 2, 3, 1] = INF
    k[2, 2, 0, 0, 5] = -INF


LAYERS = {  # name -> (layer, input shape, kernel edit)
    "conv_same": (lambda: Conv3D(8, 3, padding="same"), (1, 12, 11, 10, 8), None),
    "conv_valid": (lambda: Conv3D(8, 3), (1, 12, 11, 10, 8), None),
    "conv_k5_same": (lambda: Conv3D(2, 5, padding="same"), (1, 10, 11, 9, 8), None),
    "tconv_s2_same": (lambda: Conv3DTranspose(8, 3, strides=2, padding="same"), (1, 6, 5, 6, 8),
                      None),
    "tconv_s1": (lambda: Conv3DTranspose(8, 3), (1, 8, 7, 6, 8), None),
    "conv_same_inf_weights": (lambda: Conv3D(8, 3, padding="same"), (1, 9, 10, 8, 8),
                              _inf_weights),
    "tconv_s1_inf_weights": (lambda: Conv3DTranspose(8, 3, padding="same"), (1, 7, 6, 5, 8),
                             _inf_weights),
    "tconv_s2_inf_weights": (lambda: Conv3DTranspose(8, 3, strides=2), (1, 4, 5, 3, 8),
                             _inf_weights),
}


@lru_cache(maxsize=None)
def reference_case(name):
    make, shape, edit = LAYERS[name]
    x = _volume(shape, POINTS)
    layer = _weights(make(), x, edit=edit)
    return layer, x, _reference(layer, x)


@pytest.mark.parametrize("name", list(LAYERS))
def test_tiled_matches_reference(name, path):
    method = path
    layer, x, expected = reference_case(name)
    if not _suits(layer, x, method):
        pytest.skip("winograd needs 3x3x3 stride-1 layers with 8+ channels")
    for chunk in (None, (4, 4, 4), (3, 5, 2)):
        assert_same_result(layer(x, method=method, chunk_shape=chunk), expected)


@pytest.mark.parametrize("method", ["direct", "fft", "winograd"])
def test_channels_first(method):
    layer, x, expected = reference_case("conv_same")
    first = Conv3D(8, 3, padding="same", data_format="channels_first")
    first.build(np.moveaxis(x, -1, 1).shape)
    first.set_weights(layer.get_weights())
    y = first(np.moveaxis(x, -1, 1), method=method, chunk_shape=(4, 4, 4))
    assert_same_result(y, np.moveaxis(expected, -1, 1))


@pytest.mark.parametrize("method", ["direct", "fft", "winograd"])
def test_threads_match_reference(method):
    layer, x, expected = reference_case("conv_same")
    y = layer(x, method=method, workers=2, chunk_shape=(4, 4, 4))
    assert layer.last_stats.workers == 2
    assert_same_result(y, expected)


@pytest.mark.parametrize("name,method", [("conv_same", "fft"), ("tconv_s2_same", "direct"),
                                         ("tconv_s1_inf_weights", "winograd")])
def test_processes_match_reference(tmp_path, name, method):
    layer, x, expected = reference_case(name)
    np.save(tmp_path / "in.npy", x)
    report = apply_to_file(layer, str(tmp_path / "in.npy"), str(tmp_path / "out.npy"),
                           method=method, workers=2, chunk_shape=(4, 4, 4), progress=False)
    assert report["tiles"] > 2
    assert_same_result(np.load(tmp_path / "out.npy"), expected)


@pytest.mark.parametrize("name,method", [("conv_same", "winograd"),
                                         ("tconv_s2_inf_weights", "fft")])
def test_dask_tasks_match_reference(name, method):
    """The task each Dask worker runs, called here for every tile (a cluster's
    start-up would cost seconds; test_distributed runs real ones)."""
    layer, x, expected = reference_case(name)
    job = layer.job(x.shape)
    plan = plan_job(job, method, chunk_shape=(4, 4, 4), workers=1)
    y = np.empty(expected.shape, np.float32)
    source = CanonicalView(x, Layout(x.shape, job.data_format))
    sink = CanonicalView(y, Layout(y.shape, job.data_format))
    task = TileTask(job, plan.method, source, sink)
    for index in range(len(plan.tiles)):
        assert tile_task(task, plan, index) == (index, None)
    assert_same_result(y, expected)


@pytest.fixture
def route(monkeypatch):
    """How FFT/Winograd tiles went: ``transforms`` run, output ``boxes``
    recomputed by the direct path."""
    seen = {"transforms": 0, "boxes": []}
    transform, direct_box = task_mod._by_transform, task_mod._direct_box

    def spy_transform(*args):
        seen["transforms"] += 1
        return transform(*args)

    def spy_box(job, tile, origin, x, box, acc, bias):
        seen["boxes"].append(box)
        return direct_box(job, tile, origin, x, box, acc, bias)

    monkeypatch.setattr(task_mod, "_by_transform", spy_transform)
    monkeypatch.setattr(task_mod, "_direct_box", spy_box)
    return seen


@pytest.mark.parametrize("value", [NAN, INF])
def test_one_nonfinite_voxel_reaches_only_its_window(route, value):
    """The issue's example at a small size: one NaN (or Inf) and a 7x7x7 kernel
    change 343 outputs by FFT as by the direct path. FFT sets the NaN without
    computing them; around the Inf it recomputes one block of outputs."""
    x = np.random.default_rng(3).standard_normal((1, 40, 40, 40, 1)).astype(np.float32)
    x[0, 20, 21, 22, 0] = value
    layer = Conv3D(1, 7, padding="same")
    direct = layer(x, method="direct")
    assert (~np.isfinite(direct)).sum() == 343
    assert not np.isfinite(direct[0, 17:24, 18:25, 19:26]).any()
    assert_same_result(layer(x, method="fft"), direct)
    assert route["transforms"] == 1
    assert route["boxes"] == ([] if np.isnan(value) else [((16, 32), (16, 32), (16, 32))])
    # The window meets all 8 tiles.
    assert_same_result(layer(x, method="fft", chunk_shape=(20, 20, 20)), direct)


@pytest.mark.parametrize("method,layer,shape", [
    ("fft", Conv3D(2, 7, padding="same"), (1, 16, 15, 17, 2)),
    ("winograd", Conv3D(8, 3, padding="same"), (1, 12, 11, 10, 8))])
def test_masked_map_by_transform(route, method, layer, shape):
    """A statistical map that is NaN outside a mask: FFT and Winograd compute it
    with zeros there and set the NaN the mask reaches, nothing more."""
    x = _volume(shape, [], seed=4)
    x[:, :, :, :4] = NAN
    x[:, 6:, 8:, :, 1] = NAN
    _weights(layer, x)
    assert_same_result(layer(x, method=method), layer(x, method="direct"))
    assert route["transforms"] == 1 and route["boxes"] == []


def test_many_infs_take_the_direct_path_whole(route):
    """Inf over much of a tile (the log of a masked map): the outputs it reaches
    need the direct path, and the whole tile is cheaper that way."""
    layer, x, _ = reference_case("conv_k5_same")
    x = x.copy()
    x[:, :, :, :4] = -INF
    assert_same_result(layer(x, method="fft"), _reference(layer, x))
    assert route["transforms"] == 0


def test_kernels_do_not_assume_finite_values():
    """The numba kernels may contract to FMAs, but not assume that no NaN or Inf
    exists (nnan, ninf) nor cancel ``x - x`` (reassoc with nsz)."""
    kernels = [stencil_mod._kernel, stencil_mod.col2im, winograd_mod._input_transform,
               winograd_mod._output_transform]
    for kernel in kernels:
        flags = kernel.targetoptions["fastmath"]
        assert flags is not True and not {"fast", "nnan", "ninf"} & set(flags), kernel
        assert not {"reassoc", "nsz"} <= set(flags), kernel
