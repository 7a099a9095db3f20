"""Keras dtype policies (float16, bfloat16, mixed_float16, mixed_bfloat16, float64)
against what real Keras 3 computed (tools/make_dtype_fixtures.py), TensorFlow's own
float16/bfloat16 Conv3D cases, and the float64 reference.

No Keras needed: the fixtures are committed.
"""

import json
import os
import zipfile

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import BFLOAT16_RTOL, FIXTURES, FLOAT16_RTOL, FLOAT32_RTOL, FLOAT64_RTOL, assert_close
from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.api import build_layer
from conv3d_cli.cli.main import cli
from conv3d_cli.errors import ArgumentError
from conv3d_cli.layers import from_config
from conv3d_cli.layers.args import BFLOAT16, numpy_dtype, standardize_dtype_policy
from reference import conv3d as ref_conv3d
from reference import conv3d_transpose as ref_conv3d_transpose


def _npz(path):
    """Every array of a .npz, with the file closed (the suite runs with warnings as errors)."""
    with np.load(path) as data:
        return dict(data)


with open(os.path.join(FIXTURES, "dtype_golden.json")) as fh:
    GOLDEN = json.load(fh)
ARRAYS = _npz(os.path.join(FIXTURES, "dtype_golden.npz"))
CASES = GOLDEN["cases"]
KERAS_CASES = [c for c in CASES if "tf_expected" not in c]
TF_CASES = [c for c in CASES if "tf_expected" in c]
MODELS = os.path.join(FIXTURES, "dtype_models")
RTOL = {"float16": FLOAT16_RTOL, "bfloat16": BFLOAT16_RTOL, "float32": FLOAT32_RTOL,
        "float64": FLOAT64_RTOL}


def ulps(a, b, dtype):
    """How many representable ``dtype`` values lie between a and b, elementwise
    (0: equal). float16 and bfloat16 are both sign + 15 bits."""
    def ordered(v):
        bits = np.asarray(v, np.float64).astype(dtype).view(np.uint16).astype(np.int64)
        return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)
    return np.abs(ordered(a) - ordered(b))


def case_layer(case):
    layer = from_config(json.loads(json.dumps(case["layer"])))
    x = ARRAYS[case["name"] + "/x"]
    layer.set_weights([ARRAYS[f"{case['name']}/w{i}"] for i in range(case["n_weights"])])
    return layer, x, ARRAYS[f"{case['name']}/{case['policy']}/y"]


def assert_matches_keras(y, expected, compute_dtype):
    """Keras's numbers to within the compute dtype's rounding (conftest): for
    float16/bfloat16 all values but at most two per case are Keras's bit for
    bit; those (a float32 sum at a rounding boundary, summed in another order)
    are within one ulp of the output's scale."""
    assert_close(np.asarray(y, np.float64), expected, rtol=RTOL[compute_dtype])
    if compute_dtype in ("float16", "bfloat16"):
        differ = np.count_nonzero(ulps(y, expected, numpy_dtype(compute_dtype)))
        assert differ <= 2, differ


# --------------------------------------------------------------- the policies
@pytest.mark.parametrize("value,name,compute,variable", [
    (None, "float32", "float32", "float32"),
    ("float32", "float32", "float32", "float32"),
    ("float64", "float64", "float64", "float64"),
    ("float16", "float16", "float16", "float16"),
    ("bfloat16", "bfloat16", "bfloat16", "bfloat16"),
    ("mixed_float16", "mixed_float16", "float16", "float32"),
    ("mixed_bfloat16", "mixed_bfloat16", "bfloat16", "float32"),
    (np.float16, "float16", "float16", "float16"),
    (np.dtype("float64"), "float64", "float64", "float64"),
    (BFLOAT16, "bfloat16", "bfloat16", "bfloat16"),
    (float, "float32", "float32", "float32"),  # Keras maps Python's float to float32
    ({"module": "keras", "class_name": "DTypePolicy", "config": {"name": "mixed_float16"},
      "registered_name": None}, "mixed_float16", "float16", "float32"),
    ({"class_name": "FloatDTypePolicy", "config": {"name": "mixed_bfloat16"}},
     "mixed_bfloat16", "bfloat16", "float32"),
    ({"module": "keras.mixed_precision", "class_name": "Policy",
      "config": {"name": "mixed_float16"}, "registered_name": None},
     "mixed_float16", "float16", "float32"),
    ({"class_name": "Policy", "config": {"name": "float64"}}, "float64", "float64", "float64"),
])
def test_policy_names_dtypes_and_serialized_policies(value, name, compute, variable):
    layer = Conv3D(2, 3, dtype=value)
    assert (layer.dtype_policy.name, layer.compute_dtype, layer.variable_dtype) == \
        (name, compute, variable)
    assert layer.dtype == variable  # Keras: dtype is the variables' dtype
    assert layer.get_config()["dtype"] == {"module": "keras", "class_name": "DTypePolicy",
                                           "config": {"name": name}, "registered_name": None}


@pytest.mark.parametrize("value,message", [
    ("int8_from_float32", "'int8_from_float32' (a quantized policy"),
    ("float8_from_mixed_bfloat16", "'float8_from_mixed_bfloat16' (a quantized policy"),
    ({"module": "keras", "class_name": "QuantizedDTypePolicy",
      "config": {"mode": "int8", "source_name": "float32"}},
     "'int8_from_float32' (QuantizedDTypePolicy: a quantized layer"),
    ({"module": "keras", "class_name": "Int4DTypePolicy",
      "config": {"mode": "int4/128", "source_name": "mixed_float16"}},
     "'int4/128_from_mixed_float16' (Int4DTypePolicy"),
    ({"module": "keras.dtype_policies", "class_name": "DTypePolicyMap",
      "config": {"default_policy": "mixed_float16", "policy_map": {}}},
     "'mixed_float16' (a DTypePolicyMap"),
    ("int32", "Unsupported `dtype`: 'int32'. Expected a float dtype policy, one of float32, "
              "float64, float16, bfloat16, mixed_float16, mixed_bfloat16."),
    ("float", "Unsupported `dtype`: 'float'."),
    ("float8_e4m3fn", "Unsupported `dtype`: 'float8_e4m3fn'."),
    ({"class_name": "Mystery", "config": {"name": "float32"}}, "Unsupported `dtype`"),
])
def test_refuses_other_policies_by_name(value, message):
    with pytest.raises(ArgumentError) as info:
        Conv3D(2, 3, dtype=value)
    assert message in str(info.value)


def test_default_policy_is_keras_json_floatx(tmp_path, monkeypatch):
    (tmp_path / "keras.json").write_text(json.dumps({"floatx": "float64"}))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert Conv3D(2, 3).dtype_policy.name == "float64"
    assert standardize_dtype_policy("mixed_float16").name == "mixed_float16"


def test_tf_keras2_policy_config_reads_as_keras2():
    cfg = {"name": "c", "filters": 2, "kernel_size": [3, 3, 3], "activation": "hard_sigmoid",
           "dtype": {"class_name": "Policy", "config": {"name": "mixed_float16"}}}
    layer = Conv3D.from_config(cfg)
    assert layer.keras2 and layer.dtype_policy.name == "mixed_float16"


# ------------------------------------------------------------ against Keras 3
@pytest.mark.parametrize("case", KERAS_CASES,
                         ids=[f"{c['name']}-{c['policy']}" for c in KERAS_CASES])
def test_output_matches_keras(case):
    layer, x, expected = case_layer(case)
    y = layer(x, method="direct")
    assert str(y.dtype) == case["compute_dtype"] and y.shape == expected.shape
    # Keras 3.15's JAX tanh returns float32 for float64 inputs; the tool stays in float64.
    dtype = case["compute_dtype"] if case["keras_output_dtype"] == case["compute_dtype"] \
        else case["keras_output_dtype"]
    assert_matches_keras(y, expected, dtype)
    # The variables are kept in the policy's variable dtype, rounded as Keras rounds them.
    for i, w in enumerate(layer.get_weights()):
        assert str(w.dtype) == case["variable_dtype"]
        np.testing.assert_array_equal(w.astype(np.float64),
                                      ARRAYS[f"{case['name']}/{case['policy']}/w{i}"])


def test_fixture_covers_the_policies_and_arguments():
    assert {c["policy"] for c in KERAS_CASES} == {"float16", "bfloat16", "mixed_float16",
                                                  "mixed_bfloat16", "float64"}
    assert {(c["policy"], c["compute_dtype"]) for c in TF_CASES} == {("float16", "float16"),
                                                                     ("bfloat16", "bfloat16")}
    configs = [(c["layer"]["class_name"], c["layer"]["config"]) for c in KERAS_CASES]
    assert {cls for cls, _ in configs} == {"Conv3D", "Conv3DTranspose"}
    assert {cfg["padding"] for _, cfg in configs} == {"same", "valid"}
    assert {"relu", "sigmoid", "softmax", "gelu", "silu", "tanh", "linear"} <= \
        {cfg["activation"] for _, cfg in configs}
    assert any(cfg.get("groups", 1) > 1 for _, cfg in configs)
    assert any(max(cfg["strides"]) > 1 for cls, cfg in configs if cls == "Conv3DTranspose")
    assert {cfg["use_bias"] for _, cfg in configs} == {True, False}


# Winograd takes the 3x3x3 stride-1 layers with 8+ channels ("conv_wide_*").
PATHS = [(c, m) for c in KERAS_CASES for m in ("fft", "winograd", "chunked")
         if c["name"] in ("conv_wide_linear", "conv_wide_softmax", "transpose_wide_stride2",
                          "conv_valid_k3")
         and c["policy"] in ("mixed_float16", "bfloat16", "float64")
         and (m != "winograd" or c["name"].startswith("conv_wide"))]


@pytest.mark.parametrize("case,method", PATHS,
                         ids=[f"{c['name']}-{c['policy']}-{m}" for c, m in PATHS])
def test_every_path_matches_keras(case, method):
    layer, x, expected = case_layer(case)
    y = layer(x, chunk_shape=(2, 3, 2)) if method == "chunked" else layer(x, method=method)
    assert_matches_keras(y, expected, case["compute_dtype"])


def _fixture_layer(name, policy):
    return next(case_layer(c) for c in KERAS_CASES if c["name"] == name and c["policy"] == policy)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_each_rounding_keras_does_is_needed(policy):
    """The fixture tells the sequence apart: skipping any rounding Keras performs
    (inputs and kernel to the compute dtype, the sum before the bias add) gives
    other numbers, and the sums must not run in the compute dtype either."""
    layer, x, expected = _fixture_layer("conv_valid_k3", policy)
    dt = numpy_dtype(layer.compute_dtype)
    k32, b32 = layer.get_weights()
    rounded = lambda a: np.asarray(a).astype(dt).astype(np.float64)  # noqa: E731
    ours = layer(x)
    assert np.array_equal(ours.astype(np.float64), expected)

    def mismatches(y):
        return np.count_nonzero(np.asarray(y).astype(dt).astype(np.float64) != expected)

    sums = ref_conv3d(rounded(x), rounded(k32))
    assert mismatches(rounded(rounded(sums) + rounded(b32))) == 0  # Keras's sequence
    assert mismatches(sums + rounded(b32)) > expected.size // 20  # one rounding, bias fused
    assert mismatches(rounded(ref_conv3d(x, rounded(k32))) + rounded(b32)) > expected.size // 20
    assert mismatches(rounded(ref_conv3d(rounded(x), k32)) + rounded(b32)) > expected.size // 20


def test_sums_run_in_float32_not_in_float16():
    """Many large same-sign terms: summing in float16 would be visibly off."""
    layer, x, expected = _fixture_layer("conv_no_bias_accumulation", "float16")
    xs = x.astype(np.float16)
    k = layer.kernel
    acc = np.zeros((1, 3, 3, 3, 2), np.float16)
    for d, h, w in np.ndindex(3, 3, 3):
        window = xs[:, d:d + 3, h:h + 3, w:w + 3, :]
        for j in np.ndindex(3, 3, 3):
            for c in range(x.shape[-1]):
                acc[:, d, h, w] += window[(slice(None),) + j + (c,)][:, None] * k[j + (c,)]
    assert np.count_nonzero(acc.astype(np.float64) != expected) > expected.size // 2
    assert np.array_equal(layer(x).astype(np.float64), expected)


# ------------------------------------------------- TensorFlow's own test cases
@pytest.mark.parametrize("case", TF_CASES, ids=[f"{c['name']}-{c['policy']}" for c in TF_CASES])
def test_tensorflow_conv3d_cases(case):
    """conv_ops_3d_test.py's float16/bfloat16 cases: within TF's tolerances of the
    values it hard-codes, and Keras's own numbers to the ulp."""
    layer, x, expected = case_layer(case)
    y = layer(x)
    tol = {"float16": 1e-3, "bfloat16": 1e-2}[case["compute_dtype"]]
    np.testing.assert_allclose(np.asarray(y, np.float64).ravel(), case["tf_expected"],
                               rtol=tol, atol=tol)
    assert_matches_keras(y, expected, case["compute_dtype"])


# ---------------------------------------------------------------- model files
MODEL_FILES = [("mixed_float16.keras", "mixed_float16", "float32"),
               ("mixed_bfloat16.keras", "mixed_bfloat16", "float32"),
               ("bfloat16.keras", "bfloat16", "bfloat16"),
               ("tf2_mixed_float16.h5", "mixed_float16", "float32")]


@pytest.mark.parametrize("layer_name", ["down", "up"])
@pytest.mark.parametrize("filename,policy,variable", MODEL_FILES)
def test_model_files_saved_under_a_policy(filename, policy, variable, layer_name):
    layer = build_layer(weights=os.path.join(MODELS, filename), layer_name=layer_name)
    assert layer.dtype_policy.name == policy
    assert {str(w.dtype) for w in layer.get_weights()} == {variable}
    assert layer.keras2 == filename.startswith("tf2")
    outputs = _npz(os.path.join(MODELS, filename.split(".")[0] + "_outputs.npz"))
    y = layer(outputs[f"{layer_name}/x"])
    assert_matches_keras(y, outputs[f"{layer_name}/y"], layer.compute_dtype)


def test_tf_keras2_sums_float16_differently():
    """tf.keras 2 on CPU sums a float16 convolution in a way of its own; Keras 3
    (what the tool follows) and it differ by about 1e-3 of the output's scale."""
    layer = build_layer(weights=os.path.join(MODELS, "tf2_mixed_float16.h5"), layer_name="down")
    theirs = _npz(os.path.join(MODELS, "tf2_tf_outputs.npz"))
    y = layer(theirs["down/x"]).astype(np.float64)
    assert_close(y, theirs["down/y"], rtol=1e-2)
    assert not np.array_equal(y, theirs["down/y"])


# ------------------------------------------------ float64 on every engine path
F64_PATHS = [  # (method, layer, input shape): each engine path taken in float64
    ("direct", Conv3D, dict(filters=2, kernel_size=3, padding="same"), (1, 6, 7, 5, 2)),  # stencil
    ("direct", Conv3D, dict(filters=8, kernel_size=3, strides=2), (1, 7, 6, 7, 6)),  # GEMM
    ("direct", Conv3DTranspose, dict(filters=6, kernel_size=3, strides=2),
     (1, 4, 3, 4, 5)),  # scatter
    ("direct", Conv3DTranspose, dict(filters=6, kernel_size=2, padding="same"), (1, 4, 5, 4, 5)),
    ("winograd", Conv3D, dict(filters=8, kernel_size=3, padding="same"), (1, 6, 6, 5, 8)),
    ("fft", Conv3D, dict(filters=3, kernel_size=3, dilation_rate=2), (1, 7, 8, 7, 2)),
    ("fft", Conv3DTranspose, dict(filters=3, kernel_size=3, strides=2), (1, 4, 3, 4, 2)),
]


@pytest.mark.parametrize("method,cls,kwargs,shape", F64_PATHS,
                         ids=[f"{m}-{c.__name__}-{i}" for i, (m, c, _, _) in enumerate(F64_PATHS)])
def test_float64_runs_in_float64_on_every_path(method, cls, kwargs, shape, rng):
    """A float32 kernel, spectrum or block anywhere would be off by ~1e-7."""
    layer = cls(dtype="float64", bias_initializer="random_normal", **kwargs)
    x = rng.standard_normal(shape)
    y = layer(x, method=method)
    assert y.dtype == np.float64 and layer.kernel.dtype == np.float64
    k, b = layer.get_weights()
    if cls is Conv3D:
        expected = ref_conv3d(x, k, b, layer.strides, layer.padding, layer.dilation_rate)
    else:
        expected = ref_conv3d_transpose(x, k, b, layer.strides, layer.padding)
    assert_close(y, expected, rtol=FLOAT64_RTOL)


# ------------------------------------------------------------ layer behaviour
def test_mixed_policy_keeps_float32_variables_and_rounds_them_for_the_computation(rng):
    layer = Conv3D(3, 3, dtype="mixed_float16", padding="same")
    x = rng.standard_normal((1, 5, 5, 5, 2)).astype(np.float32)
    k = rng.standard_normal((3, 3, 3, 2, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    layer.set_weights([k, b])
    assert all(w.dtype == np.float32 for w in layer.get_weights())
    np.testing.assert_array_equal(layer.get_weights()[0], k)  # not rounded in the variable
    y = layer(x)
    assert y.dtype == np.float16
    half = lambda a: a.astype(np.float16).astype(np.float64)  # noqa: E731
    expected = half(half(ref_conv3d(half(x), half(k), padding="same")) + half(b))
    np.testing.assert_array_equal(y.astype(np.float64), expected)


def test_bfloat16_and_float16_inputs_are_taken(rng):
    layer = Conv3D(2, 3, dtype="mixed_bfloat16")
    x = rng.standard_normal((1, 4, 4, 4, 1)).astype(np.float32)
    y16 = layer(x.astype(BFLOAT16))
    assert y16.dtype == BFLOAT16
    np.testing.assert_array_equal(y16.astype(np.float32), layer(x).astype(np.float32))
    assert Conv3D(2, 3, dtype="float32")(x.astype(np.float16)).dtype == np.float32


# ----------------------------------------------------------------------- CLI
def run(*args):
    return CliRunner().invoke(cli, ["run", *map(str, args)])


@pytest.fixture
def scan(tmp_path, rng):
    a = (rng.standard_normal((7, 8, 6)) * 3).astype(np.float32)
    np.save(tmp_path / "in.npy", a)
    k = rng.standard_normal((3, 3, 3, 1, 2)).astype(np.float32)
    np.savez(tmp_path / "w.npz", kernel=k, bias=np.array([0.5, -3.3], np.float32))
    return tmp_path, a


def _expected(tmp, a, policy):
    layer = build_layer(weights=str(tmp / "w.npz"), overrides={"dtype": policy,
                                                                "padding": "same"})
    return layer(a[None, ..., None])[0]


@pytest.mark.parametrize("output,policy,stored,note", [
    ("o.npy", "mixed_float16", "float16", None),
    ("o.h5", "float16", "float16", None),
    ("o.zarr", "mixed_float16", "float16", None),
    ("o.nii.gz", "mixed_float16", "float32", "NIfTI cannot store float16: wrote float32"),
    ("o.npy", "mixed_bfloat16", "float32", ".npy cannot store bfloat16: wrote float32"),
    ("o.h5", "bfloat16", "float32", "HDF5 cannot store bfloat16: wrote float32"),
    ("o.nii", "float64", "float64", None),
])
def test_run_writes_the_compute_dtype_the_format_can_hold(scan, output, policy, stored, note):
    tmp, a = scan
    r = run(tmp / "in.npy", tmp / output, "--weights", tmp / "w.npz", "--padding", "same",
            "--dtype", policy, "--report", tmp / "rep.json", "-q")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp / "rep.json").read_text())
    compute = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(policy, policy)
    variable = "float32" if policy.startswith("mixed") else policy
    assert rep["dtype_policy"] == policy and rep["compute_dtype"] == compute
    assert rep["variable_dtype"] == variable and rep["output_dtype"] == stored
    assert rep["accumulation_dtype"] == ("float64" if policy == "float64" else "float32")
    assert (rep["output_dtype_note"] is None) == (note is None)
    if note:
        assert rep["output_dtype_note"].startswith(note)
    if output.endswith(".npy"):
        y = np.load(tmp / output)
    elif output.endswith(".h5"):
        with h5py.File(tmp / output) as f:
            y = f["data"][...]
    elif output.endswith(".zarr"):
        import zarr
        y = zarr.open_array(str(tmp / output), mode="r", path="data")[...]
    else:
        img = nib.load(tmp / output)
        assert img.get_data_dtype() == np.dtype(stored)
        y = np.asarray(img.dataobj)
    assert y.dtype == np.dtype(stored)
    np.testing.assert_array_equal(y, _expected(tmp, a, policy).astype(stored))


def test_output_dtype_option(scan):
    tmp, a = scan
    r = run(tmp / "in.npy", tmp / "o.npy", "--weights", tmp / "w.npz", "--padding", "same",
            "--dtype", "mixed_float16", "--output-dtype", "float32", "-q")
    assert r.exit_code == 0, r.output
    y = np.load(tmp / "o.npy")
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, _expected(tmp, a, "mixed_float16").astype(np.float32))
    r = run(tmp / "in.npy", tmp / "o16.npy", "--weights", tmp / "w.npz", "--padding", "same",
            "--output-dtype", "float16", "--report", "-")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["compute_dtype"] == "float32" and rep["output_dtype"] == "float16"
    assert "rounded to float16" in rep["output_dtype_note"]
    np.testing.assert_array_equal(np.load(tmp / "o16.npy"),
                                  _expected(tmp, a, "float32").astype(np.float16))
    r = run(tmp / "in.npy", tmp / "oin.npy", "--weights", tmp / "w.npz", "--dtype", "float64",
            "--output-dtype", "input", "-q")
    assert r.exit_code == 0 and np.load(tmp / "oin.npy").dtype == np.float32


@pytest.mark.parametrize("args,message", [
    (["o.nii", "--output-dtype", "float16"], "--output-dtype float16: NIfTI cannot store float16"),
    (["o.npy", "--dtype", "int8_from_float32"], "a quantized policy"),
    (["o.npy", "--dtype", "mixed_float32"], "Unsupported `dtype`: 'mixed_float32'"),
])
def test_dtype_errors_one_line_no_output(scan, args, message):
    tmp, a = scan
    src = tmp / "in.npy"
    if "--int-input" in args:
        args = [v for v in args if v != "--int-input"]
        src = tmp / "int.npy"
        np.save(src, a.astype(np.int16))
    r = run(src, tmp / args[0], "--weights", tmp / "w.npz", *args[1:])
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp.iterdir()) == sorted(["in.npy", "w.npz"] + (
        ["int.npy"] if src.name == "int.npy" else []))


@pytest.mark.parametrize("policy,stored", [("mixed_bfloat16", "float32"), ("float16", "float16"),
                                           ("bfloat16", "float32")])
def test_save_weights_writes_the_variables(scan, policy, stored):
    tmp, a = scan
    r = run(tmp / "in.npy", tmp / "o.npy", "--weights", tmp / "w.npz", "--dtype", policy,
            "--save-weights", tmp / "saved.npz", "-q")
    assert r.exit_code == 0, r.output
    saved, given = _npz(tmp / "saved.npz"), _npz(tmp / "w.npz")
    variable = numpy_dtype("float32" if policy.startswith("mixed") else policy)
    assert saved["kernel"].dtype == np.dtype(stored)
    np.testing.assert_array_equal(saved["kernel"],
                                  given["kernel"].astype(variable).astype(stored))


# ------------------------------------------------------------------- export
@pytest.mark.parametrize("policy", ["mixed_float16", "bfloat16", "float64"])
def test_export_writes_the_policy_as_keras_does(tmp_path, policy):
    src = os.path.join(MODELS, "mixed_bfloat16.keras")
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "m.keras"), "--weights", src,
                                 "--layer-name", "up", "--dtype", policy])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(tmp_path / "m.keras") as z:
        config = json.loads(z.read("config.json"))
    serialized = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": policy},
                  "registered_name": None}
    assert config["config"]["dtype"] == serialized
    assert config["config"]["layers"][1]["config"]["dtype"] == serialized
    again = build_layer(weights=str(tmp_path / "m.keras"))
    original = build_layer(weights=src, layer_name="up", overrides={"dtype": policy})
    assert again.dtype_policy.name == policy
    for a, b in zip(again.get_weights(), original.get_weights()):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    x = _npz(os.path.join(MODELS, "mixed_bfloat16_outputs.npz"))["up/x"]
    np.testing.assert_array_equal(again(x).astype(np.float64), original(x).astype(np.float64))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16", "bfloat16"])
def test_keras_loads_the_export_and_computes_the_same(tmp_path, policy):
    keras = pytest.importorskip("keras", reason="Keras is not installed: the reader round trip "
                                                "above still checks the file")
    src = os.path.join(MODELS, "mixed_float16.keras")
    out = tmp_path / "m.keras"
    r = CliRunner().invoke(cli, ["export", str(out), "--weights", src, "--layer-name", "up",
                                 "--dtype", policy])
    assert r.exit_code == 0, r.output
    model = keras.models.load_model(out)
    ours = build_layer(weights=str(out))
    x = _npz(os.path.join(MODELS, "mixed_float16_outputs.npz"))["up/x"]
    theirs = np.asarray(model(x))
    assert str(theirs.dtype) == ours.compute_dtype
    assert_matches_keras(ours(x), theirs.astype(np.float64), ours.compute_dtype)


@pytest.mark.parametrize("name,stored", [("v.npy", "float16"), ("v.nii", "float32"),
                                         ("v.h5", "float16"), ("b.npy", "float32")])
def test_write_volume_keeps_16_bit_results_exactly(tmp_path, rng, name, stored):
    from conv3d_cli import read_volume, write_volume
    dtype = BFLOAT16 if name.startswith("b") else np.float16
    a = rng.standard_normal((4, 5, 3)).astype(dtype)
    write_volume(tmp_path / name, a)
    back, _ = read_volume(tmp_path / name)
    assert back.dtype == np.dtype(stored)
    np.testing.assert_array_equal(back, a.astype(stored))


def test_layers_lists_the_policy():
    r = CliRunner().invoke(cli, ["layers", os.path.join(MODELS, "tf2_mixed_float16.h5"), "--json"])
    assert [row["dtype"] for row in json.loads(r.output)] == ["mixed_float16", "mixed_float16"]
