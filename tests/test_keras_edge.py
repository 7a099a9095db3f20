"""Inputs Keras accepts at the edges (issue 9, item 2), against what real Keras did.

The fixture tests/fixtures/keras_edge.json is written by tools/check_keras_edge.py
with Keras 3.15.1 (JAX and TensorFlow backends) and tf.keras 2.21; no Keras is
needed here.
"""

import json
import os
import re

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FIXTURES, assert_close
from conv3d_cli.api import apply_to_file, build_layer, describe, infer_class
from conv3d_cli.cli.main import cli
from conv3d_cli.engine import plan_job
from conv3d_cli.errors import ArgumentError, ShapeError, WeightsError
from conv3d_cli.layers import constraints
from conv3d_cli.layers.conv import Conv3D, Conv3DTranspose
from reference import conv3d as ref_conv3d

with open(os.path.join(FIXTURES, "keras_edge.json")) as fh:
    KERAS = json.load(fh)
K3 = KERAS["keras3_jax"]
K3_TF = KERAS["keras3_tensorflow"]
K2 = KERAS["tf_keras2"]
CLASSES = {"Conv3D": Conv3D, "Conv3DTranspose": Conv3DTranspose}


def make(cls, kwargs, **extra):
    return CLASSES[cls](**kwargs, **extra)


def ok(result):
    return isinstance(result, dict) and "shape" in result


# --------------------------------------------------------------- empty tensors
def _empty_id(case):
    kw = ",".join(f"{k}={v}" for k, v in sorted(case["kwargs"].items()))
    return f"{case['layer']}[{kw}]{tuple(case['input_shape'])}"


def _same_case(flavour, case):
    """The case of another Keras flavour run with the same layer and input, if any."""
    for other in KERAS[flavour]["empty"]:
        if (other["layer"], other["kwargs"], other["input_shape"]) == \
                (case["layer"], case["kwargs"], case["input_shape"]):
            return other
    return None


def _keras_call(case):
    """What Keras's call returns for an empty case.

    TensorFlow's result when it has one: its transposed convolutions agree with
    compute_output_shape in every case, while JAX's call differs from it for a
    zero-length axis at stride 2 (e.g. 'same': 1 voxel where the formula and
    TensorFlow give 0). TensorFlow's CPU Conv3D cannot add a bias to an empty
    batch (a oneDNN BiasAdd error); there JAX's empty result is Keras's answer.
    """
    tf_case = _same_case("keras3_tensorflow", case)
    if tf_case is not None and ok(tf_case["call"]):
        return tf_case["call"]
    call, shape = case["call"], case["compute_output_shape"]
    if ok(call) and call["shape"] != shape:  # JAX only (channels_first): its stride-2 deviation
        assert case["layer"] == "Conv3DTranspose" and case["kwargs"]["strides"] == 2
        assert "activation" not in case["kwargs"]  # a bias of ones, linear: the sum is the size
        return {"shape": shape, "dtype": call["dtype"], "sum": float(np.prod(shape))}
    return call


@pytest.mark.parametrize("index", range(len(K3["empty"])),
                         ids=[_empty_id(c) for c in K3["empty"]])
def test_empty_tensors_match_keras(index):
    case = K3["empty"][index]
    shape = tuple(case["input_shape"])
    layer = make(case["layer"], case["kwargs"], bias_initializer="ones")
    keras_shape = case["compute_output_shape"]
    if isinstance(keras_shape, dict):  # Keras raises: the same error, from both calls
        assert keras_shape["message"].startswith("Computed output size would be zero or negative")
        for fn in (lambda: layer.compute_output_shape(shape),
                   lambda: layer(np.zeros(shape, np.float32))):
            with pytest.raises(ShapeError, match="Computed output size would be zero or negative"):
                fn()
        return
    if any(n < 0 for n in keras_shape):
        # Keras 3 returns a negative size and tf.keras 2 raises ("Dimension -1
        # must be >= 0"); a negative size cannot be computed, so the tool raises.
        assert isinstance(_same_case("tf_keras2", case)["compute_output_shape"], dict)
        with pytest.raises(ShapeError, match="Computed output size would be negative"):
            layer.compute_output_shape(shape)
        return
    assert list(layer.compute_output_shape(shape)) == keras_shape
    k2_case = _same_case("tf_keras2", case)  # none for channels_first (no TF CPU kernel)
    if k2_case is not None:
        assert k2_case["compute_output_shape"] == keras_shape
    expected = _keras_call(case)
    if not ok(expected):  # every backend refuses: a Conv3D over zero channels
        assert case["layer"] == "Conv3D" and shape[-1] == 0
        with pytest.raises(ShapeError, match="has no channels"):
            layer(np.zeros(shape, np.float32))
        return
    y = layer(np.zeros(shape, np.float32))
    assert list(y.shape) == expected["shape"] == keras_shape
    assert str(y.dtype) == expected["dtype"]
    assert float(y.sum()) == pytest.approx(expected["sum"], rel=1e-5)


def test_issue_example_conv3d_transpose_on_zero_length_axis():
    layer = Conv3DTranspose(2, 3, padding="same")
    y = layer(np.zeros((1, 32, 32, 0, 3), np.float32))
    assert y.shape == (1, 32, 32, 0, 2) and y.dtype == np.float32
    assert layer.compute_output_shape((1, 32, 32, 0, 3)) == (1, 32, 32, 0, 2)


def test_empty_batch_keeps_dtype_and_batch_dims():
    layer = Conv3D(4, 3, padding="same", dtype="float64", activation="softmax")
    y = layer(np.zeros((0, 3, 5, 5, 5, 2)))
    assert y.shape == (0, 3, 5, 5, 5, 4) and y.dtype == np.float64
    assert layer.compute_output_shape((0, 3, 5, 5, 5, 2)) == (0, 3, 5, 5, 5, 4)


def test_transpose_of_empty_axis_is_bias_through_activation():
    # No input voxel reaches the output: each voxel is sigmoid(bias of its channel).
    layer = Conv3DTranspose(3, 3, data_format="channels_first", activation="sigmoid")
    layer.build((1, 2, 4, 0, 4))
    bias = np.array([0.5, -1.0, 2.0], np.float32)
    layer.set_weights([layer.kernel, bias])
    y = layer(np.zeros((1, 2, 4, 0, 4), np.float32))
    assert y.shape == (1, 3, 6, 2, 6)
    expected = 1 / (1 + np.exp(-bias.astype(np.float64)))
    assert_close(y, np.broadcast_to(expected[None, :, None, None, None], y.shape))


def test_transpose_zero_length_output_from_nonempty_input():
    # (n - 1) * s + ke % 2 + output_padding = 0 for n=1, k=2, s=2: Keras returns it empty.
    layer = Conv3DTranspose(2, 2, strides=2, padding="same", output_padding=0)
    x = np.ones((1, 1, 4, 4, 3), np.float32)
    assert layer(x).shape == (1, 0, 6, 6, 2)


@pytest.mark.parametrize("shape,expected", [((0, 8, 8, 8, 3), [0, 8, 8, 8, 2]),
                                            ((1, 8, 8, 0, 3), [1, 8, 8, 0, 2])])
def test_describe_an_empty_input_plans_no_tiles(shape, expected):
    info, _, plan = describe(Conv3D(2, 3, padding="same"), input_shape=shape, workers=2)
    assert info["output_shape"] == expected and plan.tiles == ()


def _write_h5(path, array):
    with h5py.File(path, "w") as f:
        f["data"] = array


@pytest.mark.parametrize("suffix,make_file", [
    (".npy", lambda p: np.save(p, np.zeros((4, 0, 4), np.float32))),
    (".h5", lambda p: _write_h5(p, np.zeros((4, 4, 0), np.float32))),
])
def test_empty_files_refused_naming_the_file(tmp_path, suffix, make_file):
    src = tmp_path / f"in{suffix}"
    make_file(src)
    spec = str(src) + (":/data" if suffix == ".h5" else "")
    for args in (["run", spec, str(tmp_path / "out.npy")], ["shape", spec]):
        r = CliRunner().invoke(cli, args + ["--filters", "1", "--kernel-size", "1"])
        assert r.exit_code == 1
        line = r.output.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in line
        assert f"INPUT {spec}" in line and "empty dimension" in line
    assert not (tmp_path / "out.npy").exists()


# ------------------------------------------------------ weights= and batch_size=
@pytest.fixture
def kb(rng):
    return (rng.standard_normal((3, 3, 3, 3, 2)).astype(np.float32),
            np.array([1.0, -2.0], np.float32))


def test_initial_weights_are_set_at_build_like_tf_keras2(kb, rng):
    k, b = kb
    layer = Conv3D(2, 3, weights=[k, b])
    assert layer.built is K2["weights"]["built_after_init"] is False
    assert len(layer.get_weights()) == K2["weights"]["weights_before_build"] == 0
    x = rng.standard_normal((1, 5, 5, 5, 3)).astype(np.float32)
    y = layer(x)
    assert list(y.shape) == K2["weights"]["init"]["shape"]
    assert_close(y, ref_conv3d(x, k, b))
    kernel, bias = layer.get_weights()
    assert np.array_equal(kernel, k) and bias.tolist() == K2["weights"]["init"]["bias"]


def test_weights_with_input_shape_batch_size_and_from_config(kb, rng):
    k, b = kb
    x = rng.standard_normal((4, 5, 5, 5, 3)).astype(np.float32)
    layer = Conv3D(2, 3, weights=(k, b), batch_size=4, input_shape=(5, 5, 5, 3))
    assert_close(layer(x), ref_conv3d(x, k, b))
    assert Conv3D(2, 3, batch_size=4).built is K2["weights"]["batch_size"] is False
    assert "weights" not in layer.get_config() and not K2["weights"]["in_get_config"]
    # from_config, with the arrays as JSON lists (a config file can carry them).
    config = json.loads(json.dumps({**Conv3D(2, 3).get_config(),
                                    "weights": [k.tolist(), b.tolist()]}))
    assert_close(Conv3D.from_config(config)(x), ref_conv3d(x, k, b))
    t = Conv3DTranspose(2, 3, weights=[np.zeros((3, 3, 3, 2, 4), np.float32), b])
    assert list(t(np.ones((1, 4, 4, 4, 4), np.float32)).shape) == K2["weights"]["transpose"]


def _normalise(message):
    """A weights message without the layer's name, which weight it is, and the
    array repr tf.keras 2 appends."""
    message = message.split(" Provided weights")[0]
    message = re.sub(r"layer [\"']?\w+[\"']?", "layer L", message)
    return re.sub(r"Layer [\"']?\w+[\"']?( kernel| bias)?", "Layer L", message)


@pytest.mark.parametrize("case,weights,shape", [
    ("wrong_count", lambda k, b: [k], (1, 5, 5, 5, 3)),
    ("wrong_kernel", lambda k, b: [k[:, :, :, :2], b], (1, 5, 5, 5, 3)),
    ("wrong_bias", lambda k, b: [k, np.ones(3, np.float32)], (1, 5, 5, 5, 3)),
    ("channels_mismatch", lambda k, b: [k, b], (1, 5, 5, 5, 4)),
])
def test_initial_weights_errors_name_shapes_never_arrays(kb, case, weights, shape):
    k, b = kb
    layer = Conv3D(2, 3, weights=weights(k, b), name="L")
    with pytest.raises(WeightsError) as info:
        layer(np.zeros(shape, np.float32))
    message = str(info.value)
    assert _normalise(message) == _normalise(K2["weights"][case]["message"])
    assert "array(" not in message and "[[" not in message


def test_keras3_rejection_message_never_carries_an_array(kb):
    # Keras 3 refuses unknown keyword arguments with the whole kernel in the message.
    assert K3["weights"]["init"]["message"].startswith("Unrecognized keyword arguments")
    k, _ = kb
    with pytest.raises(ArgumentError) as info:
        Conv3D(2, 3, kernel=k)
    assert str(info.value) == ("Unrecognized keyword arguments passed to Conv3D: "
                               "{'kernel': <array shape=(3, 3, 3, 3, 2) dtype=float32>}")
    with pytest.raises(ArgumentError, match=r"`weights` must be a list of arrays.*weights=5"):
        Conv3D(2, 3, weights=5)
    with pytest.raises(ArgumentError) as info:
        Conv3D(np.ones((4, 4)), 3)
    assert "<array shape=(4, 4) dtype=float64>" in str(info.value)
    with pytest.raises(ArgumentError) as info:
        Conv3D(2, np.ones((3, 3, 3)))
    assert "<array shape=(3, 3, 3) dtype=float64>" in str(info.value)


def test_config_weights_give_way_to_explicit_weights(kb, rng):
    k, b = kb
    config = {**Conv3D(2, 3).get_config(), "weights": [np.zeros_like(k), np.zeros_like(b)]}
    layer = build_layer(config=config, weights={"kernel": k, "bias": b})
    x = rng.standard_normal((1, 5, 5, 5, 3)).astype(np.float32)
    assert_close(layer(x), ref_conv3d(x, k, b))


# ------------------------------------------------------------ constraint callables
def clip(w):
    return np.clip(w, -0.1, 0.1)


def test_callable_constraints_are_kept_and_serialized_as_keras_does(rng):
    spec = K3["constraints"]
    layer = Conv3D(2, 3, kernel_constraint=clip, bias_constraint=lambda w: w * 0)
    assert layer.kernel_constraint is clip and spec["kept"]
    config = layer.get_config()
    assert config["kernel_constraint"] == spec["function"]
    lam = config["bias_constraint"]
    assert lam["class_name"] == spec["lambda"]["class_name"] == "__lambda__"
    assert sorted(lam["config"]) == spec["lambda"]["config_keys"]
    assert [type(v).__name__ for v in lam["config"]["value"]] == spec["lambda"]["value_types"]
    json.dumps(config)
    # A class is instantiated, as in Keras.
    assert type(Conv3D(2, 3, kernel_constraint=constraints.NonNeg).kernel_constraint).__name__ \
        == spec["class"]


def test_callable_constraints_never_act_in_a_forward_pass_only_when_applied(rng):
    layer = Conv3D(1, 1, kernel_constraint=lambda w: w * 0, kernel_initializer="ones",
                   use_bias=False)
    assert float(layer(np.ones((1, 2, 2, 2, 1), np.float32)).sum()) == \
        K3["constraints"]["forward_unaffected"]
    layer = Conv3D(2, 3, kernel_constraint=clip, bias_constraint=np.abs)
    layer.build((1, 5, 5, 5, 2))
    layer.set_weights([layer.kernel * 100, -np.ones(2, np.float32)])
    layer.apply_constraints()
    assert np.abs(layer.kernel).max() == pytest.approx(0.1) and layer.bias.tolist() == [1, 1]
    bad = Conv3D(2, 3, kernel_constraint=lambda w: w[0])
    bad.build((1, 5, 5, 5, 2))
    with pytest.raises(WeightsError, match="must keep the weight's shape"):
        bad.apply_constraints()


def test_constraint_errors():
    assert K3["constraints"]["not_callable"]["message"] == \
        "Could not interpret constraint identifier: 5"
    with pytest.raises(ArgumentError, match="Could not interpret constraint identifier"):
        Conv3D(2, 3, kernel_constraint=5)
    config = Conv3D(2, 3, kernel_constraint=clip).get_config()
    with pytest.raises(ArgumentError, match=r"was a Python function .*\(clip\)"):
        Conv3D.from_config(config)
    with pytest.raises(TypeError, match="must implement the `get_config\\(\\)` method"):
        Conv3D(2, 3, kernel_constraint=type("C", (), {"__call__": lambda s, w: w})()).get_config()


# ------------------------------------------------------------------ error order
def _which(message):
    """The argument an error message is about (Keras's wording or the tool's)."""
    rules = [
        ("kwargs", r"Unrecognized keyword|has no `groups`|has no `output_padding`"),
        ("filters_groups", r"filters must be evenly divisible"),
        ("channels_groups", r"input channels must be evenly divisible"),
        ("groups", r"groups must be a positive"),
        ("output_padding_rule", r"`output_padding` must be strictly less"),
        ("output_padding", r"`output_padding` argument"),
        ("kernel_size", r"`kernel_size`"),
        ("strides_dilation", r"`strides > 1`"),
        ("strides", r"`strides` argument"),
        ("padding", r"`padding` argument"),
        ("data_format", r"data_format"),
        ("activation", r"activation"),
        ("initializer", r"initializer"),
        ("regularizer", r"regularizer"),
        ("constraint", r"constraint"),
        ("filters", r"`filters`"),
        ("rank", r"min_ndim"),
        ("output_size", r"zero or negative"),
    ]
    for label, pattern in rules:
        if re.search(pattern, message):
            return label
    raise AssertionError(f"unclassified message: {message}")


@pytest.mark.parametrize("case", [c for c in K3["order"] if "result" in c],
                         ids=lambda c: f"{c['layer']}{sorted(c['kwargs'].items())}")
def test_first_of_several_wrong_arguments_is_the_one_keras_names(case):
    expected = case["result"]
    assert "error" in expected  # every case has two or more wrong arguments
    with pytest.raises(ValueError) as info:
        CLASSES[case["layer"]](**case["kwargs"])
    assert _which(str(info.value)) == _which(expected["message"]), \
        (str(info.value), expected["message"])


@pytest.mark.parametrize("case", [c for c in K3["order"] if "build" in c],
                         ids=lambda c: f"{c['kwargs']}{c['build_shape']}")
def test_build_and_call_check_in_keras_order(case):
    shape = tuple(case["build_shape"])
    with pytest.raises(ValueError) as info:
        Conv3D(**case["kwargs"]).build(shape)
    assert _which(str(info.value)) == _which(case["build"]["message"])
    with pytest.raises(ValueError) as info:
        Conv3D(**case["kwargs"])(np.zeros(shape, np.float32))
    assert _which(str(info.value)) == _which(case["call"]["message"])


def test_groups_mismatch_before_rank_complaint_message():
    with pytest.raises(ShapeError) as info:
        Conv3D(4, 3, groups=2).build((8, 8, 8, 3))
    assert str(info.value) == K3["order"][-3]["build"]["message"]


# ------------------------------------------------------- --config class inference
@pytest.mark.parametrize("flavour", ["keras3_jax", "tf_keras2"])
def test_the_keys_every_keras_writes_infer_the_right_class(flavour):
    # tf.keras 2 writes `groups` into a Conv3DTranspose config too.
    for name, keys in KERAS[flavour]["config_keys"].items():
        assert infer_class(dict.fromkeys(keys))[0] == name


def test_get_config_writes_keras3_keys():
    keys = K3["config_keys"]
    assert sorted(Conv3D(2, 3).get_config()) == keys["Conv3D"]
    assert sorted(Conv3DTranspose(2, 3).get_config()) == keys["Conv3DTranspose"]


def _bare(cls, **kw):
    return json.loads(json.dumps(cls(2, 3, **kw).get_config()))


def test_bare_config_class_is_inferred_from_its_keys(tmp_path):
    cases = [
        (_bare(Conv3DTranspose, strides=2, padding="same"), "Conv3DTranspose",
         "inferred from output_padding in --config"),
        # tf.keras 2 writes groups: 1 into a Conv3DTranspose config as well.
        ({**_bare(Conv3DTranspose, strides=2), "groups": 1}, "Conv3DTranspose",
         "inferred from output_padding in --config"),
        (_bare(Conv3D), "Conv3D", "inferred from groups in --config"),
        ({"filters": 2, "kernel_size": 3}, "Conv3D", "default (Conv3D)"),
        ({"class_name": "Conv3DTranspose", "config": _bare(Conv3DTranspose)},
         "Conv3DTranspose", "class_name in --config"),
    ]
    for config, name, source in cases:
        path = tmp_path / "layer.json"
        path.write_text(json.dumps(config))
        layer = build_layer(config=str(path))
        assert (layer.keras_name, layer.layer_class_source) == (name, source)
    layer = build_layer(config=_bare(Conv3DTranspose))
    assert layer.layer_class_source == "inferred from output_padding in the config"
    # --layer wins over the keys.
    layer = build_layer(layer="Conv3DTranspose", config=_bare(Conv3D))
    assert (layer.keras_name, layer.layer_class_source) == ("Conv3DTranspose", "--layer")


def test_report_says_which_class_was_chosen(tmp_path, rng):
    np.save(tmp_path / "in.npy", rng.standard_normal((6, 6, 6)).astype(np.float32))
    (tmp_path / "t.json").write_text(json.dumps(_bare(Conv3DTranspose, strides=2,
                                                      padding="same")))
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"),
                                 "--config", str(tmp_path / "t.json"), "--seed", "0",
                                 "--report", "-", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["layer"]["class_name"] == "Conv3DTranspose"
    assert report["layer_class_source"] == "inferred from output_padding in --config"
    assert report["file_output_shape"] == [12, 12, 12, 2]


# ------------------------------------- forced chunk shape + axis-wise activation
@pytest.mark.parametrize("activation,filters", [("softmax", 3), ("glu", 4),
                                                ("log_softmax", 2), ("sparsemax", 3)])
def test_forced_chunk_shape_is_widened_along_w_for_axiswise_activations(rng, activation,
                                                                        filters):
    layer = Conv3D(filters, 3, padding="same", activation=activation,
                   data_format="channels_first")
    x = rng.standard_normal((2, 2, 6, 7, 8)).astype(np.float32)
    whole = layer(x)
    chunked = layer(x, chunk_shape=(2, 3, 3))
    assert layer.last_stats.tiles == 2 * 3 * 3  # D and H split; W whole
    assert_close(chunked, whole)
    plan = plan_job(layer.job(x.shape), "direct", chunk_shape=(2, 3, 3), workers=1)
    assert plan.tile_shape == (2, 3, 8)
    assert plan.summary(layer.job(x.shape))["notes"] == [
        f"chunk_shape W widened from 3 to the whole axis (8): the '{activation}' "
        "activation acts along W under channels_first"]


def test_forced_chunk_shape_note_in_report_and_on_stderr(tmp_path, rng):
    a = rng.standard_normal((1, 2, 6, 6, 7)).astype(np.float32)
    np.save(tmp_path / "in.npy", a)
    base = ["run", str(tmp_path / "in.npy"), "--filters", "3", "--kernel-size", "3",
            "--padding", "same", "--activation", "softmax", "--data-format", "channels_first",
            "--seed", "1", "--no-progress", "--workers", "2"]
    r = CliRunner().invoke(cli, [*base[:2], str(tmp_path / "whole.npy"), *base[2:]])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, [*base[:2], str(tmp_path / "tiled.npy"), *base[2:],
                                 "--chunk-shape", "2,2,2", "--report",
                                 str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "note: chunk_shape W widened from 2 to the whole axis (7)" in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["plan"]["tile_shape"] == [2, 2, 7] and report["plan"]["notes"]
    assert_close(np.load(tmp_path / "tiled.npy"), np.load(tmp_path / "whole.npy"))


# --------------------------------------------------- conv3d shape with glu
@pytest.mark.parametrize("case", K3["glu"], ids=lambda c: f"{c['kwargs']}{c['input_shape']}")
def test_glu_shapes_and_errors_match_keras(case):
    layer = Conv3D(**case["kwargs"])
    shape = tuple(case["input_shape"])
    # compute_output_shape is the convolution's, before the activation, as in Keras.
    assert list(layer.compute_output_shape(shape)) == case["compute_output_shape"]
    if isinstance(case["call"], dict):
        assert case["call"]["message"].startswith("axis size must be divisible by 2")
        with pytest.raises(ShapeError, match="axis size must be divisible by 2") as info:
            layer(np.zeros(shape, np.float32))
        assert f"x.shape={tuple(case['compute_output_shape'])} with axis=-1" in str(info.value)
        with pytest.raises(ShapeError, match="axis size must be divisible by 2"):
            describe(layer, input_shape=shape, workers=1)
    else:
        assert list(layer(np.zeros(shape, np.float32)).shape) == case["call"]
        info, _, _ = describe(layer, input_shape=shape, workers=1)
        assert info["output_shape"] == case["call"]


@pytest.mark.parametrize("filters,data_format,shape", [
    (4, "channels_last", (7, 8, 9)),
    (3, "channels_last", (7, 8, 9)),
    (2, "channels_first", (2, 6, 6, 8)),
    (2, "channels_first", (2, 6, 6, 7)),
])
def test_cli_shape_prints_what_run_produces_or_raises_the_same_error(tmp_path, rng, filters,
                                                                      data_format, shape):
    np.save(tmp_path / "in.npy", rng.standard_normal(shape).astype(np.float32))
    args = ["--filters", str(filters), "--kernel-size", "3", "--padding", "same",
            "--activation", "glu", "--data-format", data_format, "--seed", "0"]
    s = CliRunner().invoke(cli, ["shape", str(tmp_path / "in.npy"), "--json", *args])
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "in.npy"), str(tmp_path / "out.npy"),
                                 "--report", "-", "-q", *args])
    assert s.exit_code == r.exit_code
    if r.exit_code == 0:
        info, report = json.loads(s.output), json.loads(r.output)
        assert info["output_shape"] == report["output_shape"]
        assert info["file_output_shape"] == report["file_output_shape"] == \
            list(np.load(tmp_path / "out.npy").shape)
    else:
        assert s.output == r.output and "axis size must be divisible by 2" in s.output
        assert not (tmp_path / "out.npy").exists()


def test_apply_to_file_with_glu_odd_axis_leaves_no_output(tmp_path, rng):
    np.save(tmp_path / "in.npy", rng.standard_normal((5, 5, 5)).astype(np.float32))
    layer = Conv3D(3, 3, activation="glu")
    with pytest.raises(ShapeError, match="axis size must be divisible by 2"):
        apply_to_file(layer, str(tmp_path / "in.npy"), str(tmp_path / "out.npy"),
                      progress=False, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]
