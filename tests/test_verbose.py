"""``conv3d run -v``: the plan, the method and why, and the time of each phase, on stderr."""

import json
import re

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conv3d_cli.cli.main import cli


def _run(tmp_path, *args, name="in.npy"):
    r = CliRunner().invoke(cli, ["run", str(tmp_path / name), *map(str, args)])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture
def volume(tmp_path):
    np.save(tmp_path / "in.npy", np.random.default_rng(0).random((1, 12, 12, 12, 8), np.float32))
    return tmp_path


def _lines(stderr):
    return [line[len("conv3d: "):] for line in stderr.splitlines() if line.startswith("conv3d: ")]


def test_verbose_tells_the_plan_a_forced_method_and_the_phases(volume):
    r = _run(volume, volume / "out.npy", "--filters", 8, "--kernel-size", 3, "--method", "fft",
             "--chunk-shape", "5,10,10", "--workers", 1, "-v", "--report", volume / "r.json")
    plan = json.loads((volume / "r.json").read_text())["plan"]
    lines = _lines(r.stderr)
    assert f"plan: {plan['tiles']} tiles of 5x10x10 x 1 batch, 1 workers" in lines[0]
    assert plan["tiles"] == 2 * 1 * 1
    assert re.fullmatch(r"memory: ~[0-9.]+ [KMG]iB peak estimated \(limit [0-9.]+ [KMG]iB\)",
                        lines[1])
    assert "method: fft: as --method asked" in lines
    timing = [line for line in lines if line.startswith("timings: ")]
    assert len(timing) == 1
    assert re.fullmatch(r"timings: open \S+ s, plan \S+ s, compute \S+ s, write \S+ s, "
                        r"total \S+ s", timing[0]), timing
    assert any(line.startswith("writing ") for line in lines)  # -v's temporary-file log


def test_verbose_gives_the_cost_models_estimates_behind_auto(volume):
    r = _run(volume, volume / "out.npy", "--filters", 8, "--kernel-size", 3, "-v",
             "--report", volume / "r.json")
    report = json.loads((volume / "r.json").read_text())
    estimates = report["plan"]["method_estimates"]
    assert len(estimates) > 1
    said = [line for line in _lines(r.stderr) if line.startswith("method: ")]
    assert said[0].startswith(f"method: {report['method']}: the cost model's estimates for "
                              "the run: ")
    for method, seconds in estimates.items():
        assert f"{method} {seconds:.3g} s" in said[0]
    assert "over 10% faster than direct" in said[0]
    # The report is written before OUTPUT is put in place: its phases end with compute.
    assert set(report["phase_seconds"]) == {"open", "plan", "compute"}


def test_verbose_times_decompressing_and_compressing_a_nifti(tmp_path):
    data = np.random.default_rng(1).random((10, 9, 8), np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "in.nii.gz")
    r = _run(tmp_path, tmp_path / "out.nii.gz", "--filters", 1, "--kernel-size", 3, "-v",
             name="in.nii.gz")
    timing = [line for line in _lines(r.stderr) if line.startswith("timings: ")][0]
    assert re.search(r"open \S+ s \(decompress \S+ s\), .* write \S+ s \(compress \S+ s\)",
                     timing), timing


def test_without_verbose_nothing_of_it(volume):
    r = _run(volume, volume / "out.npy", "--filters", 1, "--kernel-size", 3)
    assert _lines(r.stderr) == [] and r.stderr.startswith("wrote ")
