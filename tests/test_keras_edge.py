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
from conv3d_cli.api import apply_to_file, build_layer, describe
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
