"""The method choice: the cost model's counts and picks, ``--method measure``, and
the fitting script (tools/fit_cost_model.py). Nothing here depends on timing:
counts are checked against the work they describe, picks on cases far from
any crossover, and measured timings are replaced by fixed ones."""

import ast
import importlib.util
import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_close
from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.cli.main import cli
from conv3d_cli.engine import choose, measure, plan_job
from conv3d_cli.engine.plan import Tile
from conv3d_cli.errors import ArgumentError

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _job(layer, shape):
    layer.build(shape)
    return layer.job(shape)


def _plan_counts(job, method, chunk):
    """Counts summed over the tiles of a plan with tiles of ``chunk``."""
    plan = plan_job(job, method, workers=1, chunk_shape=chunk)
    total = {}
    for tile in plan.tiles:
        for k, v in choose.tile_counts(job, choose.path_of(job, method), tile).items():
            total[k] = total.get(k, 0) + v
    return total


# ------------------------------------------------------------------ the counts
@pytest.mark.parametrize("layer,shape,path", [
    (Conv3D(2, 3), (1, 13, 11, 12, 3), "stencil"),
    (Conv3D(1, 5, strides=2, padding="same"), (2, 13, 11, 12, 1), "stencil"),
    (Conv3D(8, 3), (1, 13, 11, 12, 4), "gemm"),
    (Conv3D(8, (3, 1, 2), strides=(2, 1, 2)), (1, 13, 11, 12, 8), "gemm"),
    (Conv3D(16, 3, groups=2, dilation_rate=2), (1, 13, 11, 12, 8), "gemm"),
])
def test_direct_counts_one_multiply_add_per_tap_channel_and_filter(layer, shape, path):
    """Conv3D: the direct paths' multiply-adds over every tile of any tiling are
    the layer's, out x taps x C/G x F (no halo counted twice, strides gathered)."""
    job = _job(layer, shape)
    assert choose.direct_path(job) == path
    macs = job.flops() / 2
    for chunk in (None, (5, 4, 7), (3, 11, 2)):
        counts = _plan_counts(job, "direct", chunk)
        assert counts.get("mac", 0) + counts.get("mac_strided", 0) == pytest.approx(macs)


@pytest.mark.parametrize("layer,path", [
    (Conv3DTranspose(2, 3, strides=2), "stencil"),
    (Conv3DTranspose(1, 5, strides=(2, 3, 1), padding="same"), "stencil"),
    (Conv3DTranspose(8, 3, strides=2), "scatter"),
    (Conv3DTranspose(8, 4, strides=(2, 2, 3), padding="same"), "scatter"),
    (Conv3DTranspose(8, 3), "gemm"),
])
def test_transposed_counts_every_tap_of_each_outputs_phase(layer, path):
    """Conv3DTranspose: output ``o`` sums the taps ``j`` with ``o + crop - j*d`` a
    multiple of ``s`` (its phase's taps; the zeros past the input's edges are
    read from the padded tile and multiplied too), per channel and filter."""
    shape = (1, 7, 6, 5, 4)
    job = _job(layer, shape)
    assert choose.direct_path(job) == path

    def pairs(g, o0, o1):
        return sum(sum((o + g.offset - j * g.d) % g.s == 0 for j in range(g.k))
                   for o in range(o0, o1))

    for chunk in (None, (5, 4, 7), (3, 6, 2)):
        plan = plan_job(job, "direct", workers=1, chunk_shape=chunk)
        expected = sum(math.prod(pairs(g, *box) for g, box in zip(job.geoms, t.out))
                       for t in plan.tiles) * job.in_channels * layer.filters
        counts = _plan_counts(job, "direct", chunk)
        if path == "scatter":  # col2im adds each landing product, summed over channels
            assert counts["col2im"] * job.in_channels == expected
        else:
            assert counts.get("mac", 0) + counts.get("mac_strided", 0) == expected


def test_winograd_counts_6_or_8_products_per_output_and_channel_pair():
    job = _job(Conv3D(16, 3), (1, 10, 12, 14, 8))  # 8 x 10 x 12 outputs: whole 2x2x4 blocks
    counts = choose.tile_counts(job, "winograd", Tile(0, 1, ((0, 8), (0, 10), (0, 12))))
    assert counts["mac"] == 6 * 8 * 10 * 12 * 8 * 16  # F(4, 3) along W: 96 points per 16
    odd = choose.tile_counts(job, "winograd", Tile(0, 1, ((0, 7), (0, 10), (0, 11))))
    assert odd["mac"] == counts["mac"]  # an odd edge still computes whole blocks
    short = choose.tile_counts(job, "winograd", Tile(0, 1, ((0, 8), (0, 10), (0, 6))))
    assert short["mac"] == 8 * 8 * 10 * 6 * 8 * 16  # under 8 along W: 2x2x2 blocks, 64 points


def test_fft_counts_follow_the_transforms_the_code_computes():
    x = (1, 33, 33, 33, 2)
    strided, dense = _job(Conv3D(3, 3, strides=2), x), _job(Conv3D(3, 3), x)
    whole = [Tile(0, 1, tuple((0, n) for n in j.out_spatial)) for j in (strided, dense)]
    s, d = (choose.tile_counts(j, "fft", t) for j, t in zip((strided, dense), whole))
    # Strided Conv3D transforms its whole input and keeps every s-th output.
    assert s["fft"] == d["fft"] and s["cmac"] == d["cmac"] and s["out"] < d["out"]
    # Transposed: one transform of the input and the output per output phase.
    t = _job(Conv3DTranspose(3, 3, strides=2), (1, 10, 10, 10, 2))
    counts = choose.tile_counts(t, "fft", Tile(0, 1, tuple((0, n) for n in t.out_spatial)))
    assert counts["call"] == 8 and counts["unfused"] == counts["out"]
    assert d["call"] == 1 and d["unfused"] == 0
    # Each tile reads (and transforms) its own halo: two halves read more than the whole.
    halves = [Tile(0, 1, ((0, 16), (0, 31), (0, 31))), Tile(0, 1, ((16, 31), (0, 31), (0, 31)))]
    assert sum(choose.tile_counts(dense, "fft", h)["read"] for h in halves) == 35 * 33 * 33 * 2


# ------------------------------------------------------------------- the picks
@pytest.mark.parametrize("workers", [1, 2])
def test_auto_picks_the_clear_winner(workers):
    cases = [(Conv3D(1, 15), (1, 96, 96, 96, 1), "fft"),
             (Conv3DTranspose(1, 15), (1, 64, 64, 64, 1), "fft"),
             (Conv3D(8, 1), (1, 64, 64, 64, 8), "direct"),
             (Conv3D(1, 3), (1, 64, 64, 64, 1), "direct"),
             (Conv3D(16, 3, strides=2), (1, 32, 32, 32, 16), "direct"),
             (Conv3D(128, 3), (1, 66, 66, 66, 128), "winograd")]
    for layer, shape, expected in cases:
        job = _job(layer, shape)
        plan = plan_job(job, "auto", workers=workers, processes=False)
        assert plan.method == expected, (layer, shape, plan.choice)
        estimates = plan.choice["method_estimates"]
        assert set(estimates) == set(choose.candidates(job))
        assert choose.pick(estimates) == expected
        assert choose.choose_method(job) == expected


def test_near_ties_stay_direct():
    """FFT and Winograd round differently from Keras's sums: they must be
    estimated more than 10% faster to be picked."""
    assert choose.pick({"direct": 1.0, "fft": 0.95}) == "direct"
    assert choose.pick({"direct": 1.0, "fft": 0.85}) == "fft"
    assert choose.pick({"direct": 1.0, "fft": 0.8, "winograd": 0.75}) == "winograd"


def test_plan_summary_records_the_estimates():
    job = _job(Conv3D(4, 5), (1, 20, 20, 20, 2))
    summary = plan_job(job, "auto", workers=1).summary(job)
    assert set(summary["method_estimates"]) == {"direct", "fft"}
    assert all(s > 0 for s in summary["method_estimates"].values())
    assert "method_timings" not in summary
    assert "method_estimates" not in plan_job(job, "direct", workers=1).summary(job)


def test_a_method_whose_tiles_do_not_fit_is_left_out(monkeypatch):
    import conv3d_cli.engine as engine
    real = engine.make_plan

    def refuse_fft(job, method, **kwargs):
        if method == "fft":
            raise ArgumentError("`memory_limit` 1 MiB is too small for this layer")
        return real(job, method, **kwargs)

    monkeypatch.setattr(engine, "make_plan", refuse_fft)
    job = _job(Conv3D(1, 15), (1, 64, 64, 64, 1))  # fft by far, were it possible
    assert plan_job(job, "auto", workers=1).method == "direct"
    monkeypatch.setattr(engine, "make_plan", lambda *a, **k: refuse_fft(a[0], "fft"))
    with pytest.raises(ArgumentError, match="too small"):
        plan_job(job, "auto", workers=1)


def _model(workers_p=1.0, threads_p=1.0):
    """A model with every constant 1 ns (and the given parallel fractions)."""
    fitted = choose.load_model(choose.MODEL_FILE)
    return choose.CostModel({path: {k: 1e-9 for k in c} for path, c in fitted.constants.items()},
                            {lib: threads_p for lib in fitted.threads}, workers_p)


def test_more_tiles_cost_more_on_one_worker():
    """Each tile pays its overhead and its halo."""
    job = _job(Conv3D(1, 5), (1, 64, 64, 64, 1))
    one = plan_job(job, "fft", workers=1)
    many = plan_job(job, "fft", workers=1, chunk_shape=(15, 15, 15))
    model = _model()
    assert choose.plan_seconds(job, many, model) > choose.plan_seconds(job, one, model) > 0


def test_workers_share_the_tiles_as_far_as_they_run_in_parallel():
    job = _job(Conv3D(1, 5, padding="same"), (1, 128, 128, 128, 1))
    one, two, three = (plan_job(job, "direct", workers=w, chunk_shape=(32, 128, 128),
                                processes=False) for w in (1, 2, 3))
    serial = choose.plan_seconds(job, one, _model())
    assert choose.plan_seconds(job, two, _model(1.0)) == pytest.approx(serial / 2)
    assert choose.plan_seconds(job, two, _model(0.0)) == pytest.approx(serial)
    # 4 equal tiles on 3 workers: one worker computes two of them.
    assert choose.plan_seconds(job, three, _model(1.0)) == pytest.approx(serial / 2)


def test_threads_speed_up_the_fft_part():
    job = _job(Conv3D(1, 9), (1, 64, 64, 64, 1))
    plan = plan_job(job, "fft", workers=2, processes=False)
    assert plan.threads == 2 and len(plan.tiles) == 1
    alone = choose.plan_seconds(job, replace(plan, threads=1), _model(threads_p=1.0))
    assert choose.plan_seconds(job, plan, _model(threads_p=0.0)) == pytest.approx(alone)
    assert choose.plan_seconds(job, plan, _model(threads_p=1.0)) < alone


def test_amdahl():
    assert choose.amdahl(1.0, 4) == 4 and choose.amdahl(0.0, 4) == 1
    assert choose.amdahl(0.5, 2) == pytest.approx(4 / 3)


# ----------------------------------------------------------------- measuring
def test_measure_runs_the_fastest_timing(monkeypatch):
    job = _job(Conv3D(16, 3), (1, 20, 20, 20, 16))
    seen = {}

    def fake(job, plan, tile, clock=None):
        seen[plan.method] = tile
        return {"direct": 3.0, "fft": 1.0, "winograd": 2.0}[plan.method]

    monkeypatch.setattr(measure, "time_tile", fake)
    plan = plan_job(job, "measure", workers=2, processes=False)
    assert plan.method == "fft"
    summary = plan.summary(job)
    assert summary["method_timings"] == {"direct": 3.0, "fft": 1.0, "winograd": 2.0}
    assert set(summary["method_estimates"]) == {"direct", "fft", "winograd"}
    for method, tile in seen.items():  # each candidate's largest tile
        other = plan_job(job, method, workers=2, processes=False)
        assert math.prod(tile.shape) == max(math.prod(t.shape) for t in other.tiles)
    monkeypatch.setattr(measure, "time_tile",
                        lambda job, plan, tile, clock=None:
                        1.0 if plan.method == "winograd" else 5.0)
    assert plan_job(job, "measure", workers=1).method == "winograd"


def test_measure_computes_the_same_result(rng):
    layer = Conv3D(3, 3, padding="same", bias_initializer="random_normal")
    x = rng.standard_normal((2, 9, 8, 7, 2)).astype(np.float32)
    layer.build(x.shape)
    expected = layer(x, method="direct")
    assert_close(layer(x, method="measure", workers=2), expected)
    assert layer.last_stats.method in ("direct", "fft")


def test_measure_times_a_zeros_tile_with_the_plans_threads():
    job = _job(Conv3D(2, 3), (1, 12, 10, 9, 2))
    plan = plan_job(job, "fft", workers=1)
    ticks = iter([10.0, 12.5])
    assert measure.time_tile(job, plan, plan.tiles[0], clock=lambda: next(ticks)) == 2.5
    block = measure.ZerosSource(job).read(0, 1, [(-1, 3), (0, 2), (5, 9)])
    assert block.shape == (1, 4, 2, 4, 2) and not block.any()


def test_cli_measure_records_the_timings(tmp_path, rng):
    x = rng.standard_normal((12, 11, 10)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"),
                                 "--filters", "1", "--kernel-size", "3", "--seed", "0",
                                 "--method", "measure", "--report", "-", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    timings = report["plan"]["method_timings"]
    assert set(timings) == {"direct", "fft"} and all(t > 0 for t in timings.values())
    assert report["method"] in timings
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "in.npy"), str(tmp_path / "ref.npy"),
                                 "--filters", "1", "--kernel-size", "3", "--seed", "0",
                                 "--method", "direct", "-q"])
    assert_close(np.load(tmp_path / "out.npy"), np.load(tmp_path / "ref.npy"))
    r = CliRunner().invoke(cli, ["shape", "--input-shape", "1,12,11,10,1", "--filters", "1",
                                 "--kernel-size", "3", "--method", "measure"])
    assert r.exit_code == 0, r.output
    assert "measured       direct" in r.output and "(the largest tile, zeros)" in r.output


# ------------------------------------------------------ the model and its fit
def _fit_script():
    spec = importlib.util.spec_from_file_location(
        "fit_cost_model", os.path.join(ROOT, "tools", "fit_cost_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_model_has_a_constant_for_every_count():
    fit = _fit_script()
    model = choose.load_model(choose.MODEL_FILE)
    for path, configs in fit.CONFIGS.items():
        for config in configs:
            job, tile = fit.config_job(config)
            assert set(choose.tile_counts(job, path, tile)) <= set(model.constants[path])
            if path in choose.SETUP:
                setup = choose.setup_counts(job, path, choose.tile_axes(job, tile.out))
                assert set(setup) <= set(model.constants[choose.SETUP[path]])
    assert set(model.threads) == set(choose.THREADED.values())


def test_committed_constants_are_the_fit_of_the_committed_data(tmp_path, capsys):
    """cost_model.json is what tools/fit_cost_model.py fits from the measurements
    committed beside it, counted by the current model (``--refit``: no timing)."""
    fit = _fit_script()
    out = tmp_path / "model.json"
    fit.main(["--refit", os.path.join(ROOT, "tools", "cost_model_data.json"),
              "--output", str(out), "--data", str(tmp_path / "data.json")])
    capsys.readouterr()
    refitted = json.loads(out.read_text())
    with open(choose.MODEL_FILE) as f:
        committed = json.load(f)
    assert refitted["constants"].keys() == committed["constants"].keys()
    for path, values in committed["constants"].items():
        assert refitted["constants"][path] == pytest.approx(values, rel=1e-3), path
    assert refitted["threads"] == pytest.approx(committed["threads"], abs=1e-3)
    assert refitted["workers"] == pytest.approx(committed["workers"], abs=1e-3)


def test_fit_recovers_known_constants():
    fit = _fit_script()
    true = {"tile": 1e-4, "mac": 2e-11, "copy": 5e-10}
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(12):
        counts = {"tile": 1.0, "mac": float(rng.uniform(1e6, 1e9)),
                  "copy": float(rng.uniform(1e4, 1e7))}
        seconds = sum(true[k] * v for k, v in counts.items())
        rows.append({"path": "gemm", "threads": 1, "counts": counts, "seconds": seconds})
        # the same work on two threads: the BLAS part (mac) 80% parallel
        blas = true["mac"] * counts["mac"]
        rows.append({"path": "gemm", "threads": 2, "counts": counts, "seconds_1": seconds,
                     "seconds": seconds - blas + blas * (0.2 + 0.8 / 2)})
    constants, errors = fit.fit_constants(rows)
    for k, v in true.items():
        assert constants["gemm"][k] == pytest.approx(v, rel=1e-6)
    assert errors["gemm"]["max"] < 1e-6
    assert fit.fit_threads(rows, constants)["blas"] == pytest.approx(0.8, abs=1e-6)
    cores = fit.CORES
    if cores > 1:  # tiles side by side each taking 1.25x as long: the median of three
        ratios = [cores / choose.amdahl(p, cores) for p in (0.75, 0.5, 1.0)]
        crowd = [{"path": "gemm", "ratio": r} for r in ratios]
        assert fit.fit_workers(crowd) == pytest.approx(0.75)


@pytest.mark.slow
def test_fit_script_quick_run_writes_a_model_choose_reads(tmp_path, capsys, monkeypatch):
    fit = _fit_script()
    out, data = tmp_path / "model.json", tmp_path / "data.json"
    fit.main(["--quick", "--output", str(out), "--data", str(data)])
    printed = capsys.readouterr().out
    model = json.loads(out.read_text())
    text = printed.split("CONSTANTS = ", 1)[1].split("\nTHREADS = ", 1)[0]
    constants = ast.literal_eval(text)
    for path, values in model["constants"].items():
        for name, value in values.items():
            assert constants[path][name] == pytest.approx(value, rel=1e-3, abs=1e-30)
    rows = json.loads(data.read_text())["rows"]
    assert rows and all(r["seconds"] > 0 and r["counts"] for r in rows)
    monkeypatch.setenv("CONV3D_COST_MODEL", str(out))
    job = _job(Conv3D(2, 3), (1, 16, 16, 16, 2))
    assert plan_job(job, "auto", workers=1).method in ("direct", "fft")


def test_an_unreadable_model_file_is_a_clean_error(tmp_path, monkeypatch):
    (tmp_path / "bad.json").write_text("{")
    monkeypatch.setenv("CONV3D_COST_MODEL", str(tmp_path / "bad.json"))
    job = _job(Conv3D(2, 3), (1, 16, 16, 16, 2))
    with pytest.raises(ArgumentError, match="cost model .*bad.json: cannot be read"):
        plan_job(job, "auto", workers=1)
    assert plan_job(job, "direct", workers=1).method == "direct"  # forced: no model needed


def test_planning_fft_lengths_are_scipys():
    """Planning sizes FFTs without SciPy; the lengths must be the ones the FFT path uses."""
    from scipy.fft import next_fast_len as scipy_len

    from conv3d_cli.engine.fftsize import next_fast_len
    assert [next_fast_len(n) for n in range(1, 3000)] == \
        [scipy_len(n, real=True) for n in range(1, 3000)]
