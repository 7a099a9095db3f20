"""``conv3d run`` through click's CliRunner, including every bad input of issue 2 §5."""

import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FLOAT64_RTOL, assert_close
from conv3d_cli.cli.main import cli
from reference import conv3d as ref_conv3d
from reference import conv3d_transpose as ref_conv3d_transpose

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_data")


def run(*args):
    result = CliRunner().invoke(cli, ["run", *map(str, args)])
    return result


@pytest.fixture
def vol(tmp_path, rng):
    a = rng.standard_normal((9, 10, 11)).astype(np.float32)
    np.save(tmp_path / "in.npy", a)
    return tmp_path, a


def test_run_with_weights_matches_reference(vol, rng):
    tmp, a = vol
    k = rng.standard_normal((3, 3, 3, 1, 2)).astype(np.float32)
    b = np.array([0.5, -1], np.float32)
    np.savez(tmp / "w.npz", kernel=k, bias=b)
    r = run(tmp / "in.npy", tmp / "out.npy", "--weights", tmp / "w.npz", "--padding", "same",
            "--report", tmp / "rep.json", "-q")
    assert r.exit_code == 0, r.output
    y = np.load(tmp / "out.npy")
    assert y.shape == (9, 10, 11, 2) and y.dtype == np.float32
    assert_close(y, ref_conv3d(a[None, ..., None], k, b, padding="same")[0])
    rep = json.loads((tmp / "rep.json").read_text())
    assert rep["output_shape"] == [1, 9, 10, 11, 2] and rep["params"] == 56
    assert rep["layer"]["config"]["padding"] == "same" and rep["method"] in ("direct", "fft")
    assert rep["losses"] == {"kernel_regularizer": None, "bias_regularizer": None,
                             "activity_regularizer": None}


def test_run_transposed_drops_added_channel_axis(vol):
    tmp, a = vol
    r = run(tmp / "in.npy", tmp / "up.npy", "--layer", "conv3dtranspose", "--filters", 1,
            "--kernel-size", "3", "--strides", "2,1,2", "--padding", "same", "--seed", 1,
            "--save-weights", tmp / "w.npz", "-q")
    assert r.exit_code == 0, r.output
    y = np.load(tmp / "up.npy")
    assert y.shape == (18, 10, 22)
    with np.load(tmp / "w.npz") as w:
        expected = ref_conv3d_transpose(a[None, ..., None], w["kernel"], w["bias"], (2, 1, 2),
                                        "same")[0, ..., 0]
    assert_close(y, expected)


def test_run_seed_reproducible_and_report_losses(vol):
    tmp, _ = vol
    args = ["--filters", 2, "--kernel-size", 3, "--seed", 3, "--kernel-regularizer",
            'l1_l2:{"l1": 0.1, "l2": 0.2}', "--activity-regularizer", "l2", "-q"]
    assert run(tmp / "in.npy", tmp / "a.npy", *args, "--report", tmp / "a.json").exit_code == 0
    assert run(tmp / "in.npy", tmp / "b.npy", *args, "--workers", 2,
               "--chunk-shape", "3,3,3").exit_code == 0
    np.testing.assert_allclose(np.load(tmp / "a.npy"), np.load(tmp / "b.npy"), rtol=1e-5, atol=1e-6)
    losses = json.loads((tmp / "a.json").read_text())["losses"]
    assert losses["kernel_regularizer"] > 0 and losses["activity_regularizer"] > 0
    assert losses["bias_regularizer"] is None


def test_run_config_with_overrides(vol, tmp_path):
    tmp, a = vol
    cfg = {"class_name": "Conv3D", "config": {"filters": 3, "kernel_size": [3, 3, 3],
                                              "padding": "valid", "activation": "relu",
                                              "kernel_initializer": {"class_name": "Ones",
                                                                     "config": {}}}}
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    r = run(tmp / "in.npy", tmp / "o.npy", "--config", tmp / "cfg.json", "--padding", "same",
            "--report", "-", "-q")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    config = rep["layer"]["config"]
    assert config["padding"] == "same" and config["activation"] == "relu"
    expected = np.maximum(ref_conv3d(a[None, ..., None], np.ones((3, 3, 3, 1, 3)), np.zeros(3),
                                     padding="same")[0], 0)
    assert_close(np.load(tmp / "o.npy"), expected)


def test_run_nifti_to_hdf5_and_back(tmp_path):
    brain = os.path.join(SAMPLE, "brain.nii.gz")
    r = run(brain, f"{tmp_path}/o.h5:/grp/out", "--weights", os.path.join(SAMPLE, "sobel3.npz"),
            "-q")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "o.h5") as f:
        assert f["grp/out"].shape == (46, 54, 38, 3)
    r = run(f"{tmp_path}/o.h5:/grp/out", tmp_path / "back.nii", "--filters", 1, "--kernel-size", 1,
            "--seed", 0, "-q")
    assert r.exit_code == 0, r.output
    # The channel axis was the file's own, not added by the tool: it stays.
    assert nib.load(tmp_path / "back.nii").shape == (46, 54, 38, 1)


def test_run_channels_first_rank5_npy(tmp_path, rng):
    a = rng.standard_normal((2, 3, 5, 6, 7)).astype(np.float32)
    np.save(tmp_path / "cf.npy", a)
    r = run(tmp_path / "cf.npy", tmp_path / "o.npy", "--data-format", "channels_first",
            "--filters", 4, "--kernel-size", 3, "--seed", 0,
            "--save-weights", tmp_path / "w.npz", "-q")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "w.npz") as w:
        expected = ref_conv3d(a, w["kernel"], w["bias"], data_format="channels_first")
    assert_close(np.load(tmp_path / "o.npy"), expected)


def test_integer_input_converted_to_float32(tmp_path):
    np.save(tmp_path / "i.npy", np.arange(6 * 6 * 6, dtype=np.uint16).reshape(6, 6, 6))
    r = run(tmp_path / "i.npy", tmp_path / "o.npy", "--filters", 1, "--kernel-size", 1,
            "--kernel-initializer", "ones", "-q")
    assert r.exit_code == 0
    y = np.load(tmp_path / "o.npy")
    assert y.dtype == np.float32 and y[1, 2, 3] == 1 * 36 + 2 * 6 + 3


def test_float64_output(tmp_path, rng):
    a = rng.standard_normal((5, 6, 7))
    np.save(tmp_path / "i.npy", a)
    r = run(tmp_path / "i.npy", tmp_path / "o.npy", "--filters", 2, "--kernel-size", 3,
            "--dtype", "float64", "--bias-initializer", "random_normal", "--workers", 2,
            "--chunk-shape", "2,2,3", "--save-weights", tmp_path / "w.npz", "-q")
    assert r.exit_code == 0, r.output
    y = np.load(tmp_path / "o.npy")
    with np.load(tmp_path / "w.npz") as w:
        assert w["kernel"].dtype == np.float64
        expected = ref_conv3d(a[None, ..., None], w["kernel"], w["bias"])[0]
    assert y.dtype == np.float64
    assert_close(y, expected, rtol=FLOAT64_RTOL)


# ------------------------------------------------------------------ bad input
BAD = [
    (["--filters", 1, "--kernel-size", 3, "--padding", "causal"], "padding"),
    (["--filters", 1, "--kernel-size", 3, "--padding", "full"], "padding"),
    (["--filters", 1, "--kernel-size", 3, "--strides", 2, "--dilation-rate", 2],
     "`strides > 1` not supported"),
    (["--filters", 3, "--kernel-size", 3, "--groups", 2], "groups"),
    (["--filters", 2, "--kernel-size", 3, "--groups", 2],
     "input channels must be evenly divisible"),
    (["--layer", "Conv3DTranspose", "--filters", 1, "--kernel-size", 3, "--strides", 2,
      "--output-padding", 2], "`output_padding` must be strictly less than `strides`"),
    (["--filters", 1, "--kernel-size", 12], "output would have zero or negative size"),
    (["--filters", 1, "--kernel-size", 3, "--activation", "swishy"], "activation"),
    (["--filters", 1, "--kernel-size", 3, "--kernel-initializer", "glorious"],
     "kernel_initializer"),
    (["--filters", 0, "--kernel-size", 3], "filters"),
    (["--filters", 1, "--kernel-size", 0], "kernel_size"),
    (["--filters", 1, "--kernel-size", "3,-1,3"], "kernel_size"),
    (["--filters", 1, "--kernel-size", "3,3"],
     "The `kernel_size` argument must be a tuple of 3 integers"),
    (["--filters", 1, "--kernel-size", "a,b,c"], "--kernel-size"),
    (["--filters", 1, "--kernel-size", 3, "--strides", "1,1,1,1"], "strides"),
    (["--kernel-size", 3], "`filters` is required"),
    (["--filters", 1, "--kernel-size", 3, "--layer", "Dense"], "Unknown layer"),
    (["--filters", 1, "--kernel-size", 3, "--memory-limit", "lots"], "--memory-limit"),
    (["--filters", 1, "--kernel-size", 3, "--dtype", "int32"], "dtype"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[str(m) for _, m in BAD])
def test_bad_arguments_one_line_no_output(vol, args, message):
    tmp, _ = vol
    r = run(tmp / "in.npy", tmp / "out.npy", *args)
    assert r.exit_code != 0
    err = r.output.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp / "out.npy").exists() and sorted(os.listdir(tmp)) == ["in.npy"]


def test_kernel_not_fitting_input_channels(vol, rng):
    tmp, _ = vol
    np.savez(tmp / "w.npz", kernel=rng.standard_normal((3, 3, 3, 2, 1)), bias=np.zeros(1))
    r = run(tmp / "in.npy", tmp / "out.npy", "--weights", tmp / "w.npz")
    assert r.exit_code != 0
    assert "weights (kernel shape (3, 3, 3, 2, 1)) take 2 input channels" in r.output
    np.savez(tmp / "w2.npz", kernel=rng.standard_normal((3, 3, 3, 1, 4)))
    r = run(tmp / "in.npy", tmp / "out.npy", "--weights", tmp / "w2.npz", "--filters", 2)
    assert r.exit_code != 0 and "filters=2" in r.output
    r = run(tmp / "in.npy", tmp / "out.npy", "--weights", tmp / "w2.npz", "--use-bias")
    assert r.exit_code != 0 and "no 'bias'" in r.output
    assert not (tmp / "out.npy").exists()


@pytest.mark.parametrize("setup,message", [
    (lambda p: np.save(p, np.zeros((5, 5))), "rank >= 3"),
    (lambda p: np.save(p, np.zeros((4, 0, 4))), "empty dimension"),
    (lambda p: p.write_bytes(b"\x93NUMPY garbage"), "not a valid .npy"),
    (lambda p: np.save(p, np.array([None, 1], dtype=object), allow_pickle=True),
     "object arrays are refused"),
    (lambda p: np.save(p, np.zeros((4, 4, 4), np.complex64)), "expected real numbers"),
    (lambda p: None, "no such file"),
])
def test_bad_input_files(tmp_path, setup, message):
    setup(tmp_path / "in.npy")
    r = run(tmp_path / "in.npy", tmp_path / "out.npy", "--filters", 1, "--kernel-size", 1)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.npy").exists()


def test_missing_hdf5_dataset_and_bad_weights(tmp_path):
    with h5py.File(tmp_path / "in.h5", "w") as f:
        f["a"] = np.zeros((4, 4, 4), np.float32)
    r = run(f"{tmp_path}/in.h5:/b", tmp_path / "o.npy", "--filters", 1, "--kernel-size", 1)
    assert r.exit_code != 0 and "no dataset /b" in r.output
    (tmp_path / "w.npz").write_bytes(b"PK\x03\x04 truncated")
    r = run(f"{tmp_path}/in.h5", tmp_path / "o.npy", "--weights", tmp_path / "w.npz")
    assert r.exit_code != 0 and "--weights" in r.output
    np.save(tmp_path / "p.npy", np.array([{}], dtype=object), allow_pickle=True)
    r = run(f"{tmp_path}/in.h5", tmp_path / "o.npy", "--weights", tmp_path / "p.npy")
    assert r.exit_code != 0 and "pickle" in r.output
    assert not (tmp_path / "o.npy").exists()


def test_existing_output_needs_overwrite(vol):
    tmp, _ = vol
    (tmp / "out.npy").write_bytes(b"keep me")
    r = run(tmp / "in.npy", tmp / "out.npy", "--filters", 1, "--kernel-size", 3)
    assert r.exit_code != 0 and "--overwrite" in r.output
    assert (tmp / "out.npy").read_bytes() == b"keep me"
    r = run(tmp / "in.npy", tmp / "out.npy", "--filters", 1, "--kernel-size", 3, "--overwrite",
            "-q")
    assert r.exit_code == 0 and np.load(tmp / "out.npy").shape == (7, 8, 9)


def test_unknown_output_extension(vol):
    tmp, _ = vol
    r = run(tmp / "in.npy", tmp / "out.xyz", "--filters", 1, "--kernel-size", 3)
    assert r.exit_code != 0 and "OUTPUT" in r.output and "unknown volume format" in r.output


def test_debug_shows_traceback(vol):
    tmp, _ = vol
    r = CliRunner().invoke(cli, ["--debug", "run", str(tmp / "in.npy"), str(tmp / "o.npy"),
                                 "--filters", 1, "--kernel-size", 3, "--padding", "causal"])
    assert r.exit_code != 0 and r.exception is not None
