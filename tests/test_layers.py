"""Layer objects: Keras's argument checks and wording, config round trips, weights,
initializers, regularizers and constraints."""

import json

import numpy as np
import pytest

from conftest import FLOAT64_RTOL, assert_close
from conv3d_cli import Conv3D, Conv3DTranspose
from conv3d_cli.layers import activations, constraints, from_config, initializers, regularizers
from reference import conv3d as ref_conv3d


@pytest.mark.parametrize("kwargs,message", [
    (dict(filters=1, kernel_size=3, padding="causal"),
     "The `padding` argument must be a list/tuple or one of"),
    (dict(filters=1, kernel_size=3, padding="full"), "one of {'valid', 'same'}"),
    (dict(filters=1, kernel_size=3, strides=2, dilation_rate=2),
     "`strides > 1` not supported in conjunction with `dilation_rate > 1`"),
    (dict(filters=1, kernel_size=3, strides=(1, 2, 1), dilation_rate=(2, 1, 1)),
     "`strides > 1` not supported"),
    (dict(filters=1, kernel_size=(3, 3)),
     "The `kernel_size` argument must be a tuple of 3 integers. Received kernel_size=(3, 3)"),
    (dict(filters=1, kernel_size=0), "that do not satisfy `value > 0`"),
    (dict(filters=1, kernel_size=3, strides=-1),
     "The `strides` argument must be a tuple of 3 integers"),
    (dict(filters=0, kernel_size=3),
     "Invalid value for argument `filters`. Expected a strictly positive value"),
    (dict(filters=-2, kernel_size=3), "Expected a strictly positive value"),
    (dict(filters=3, kernel_size=3, groups=2),
     "The number of filters must be evenly divisible by the number of groups"),
    (dict(filters=2, kernel_size=3, groups=0), "The number of groups must be a positive integer"),
    (dict(filters=1, kernel_size=3, activation="nope"),
     "Could not interpret activation function identifier"),
    (dict(filters=1, kernel_size=3, kernel_initializer="nope"),
     "Unknown initializer for `kernel_initializer`"),
    (dict(filters=1, kernel_size=3, kernel_regularizer="l3"), "Unknown regularizer"),
    (dict(filters=1, kernel_size=3, data_format="channels_middle"),
     "The `data_format` argument must be one of"),
    (dict(filters=1, kernel_size=3, dtype="int8"), "Unsupported `dtype`"),
    (dict(filters=1, kernel_size=3, bogus=1), "Unrecognized keyword arguments"),
])
def test_conv3d_argument_errors(kwargs, message):
    with pytest.raises(ValueError) as info:
        Conv3D(**kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(filters=1, kernel_size=3, strides=2, output_padding=2),
     "`output_padding` must be strictly less than `strides`"),
    (dict(filters=1, kernel_size=3, output_padding=1),
     "At dimension 0, `output_padding` is 1 but `strides` is 1"),
    (dict(filters=1, kernel_size=3, strides=2, output_padding=(1, 1)),
     "The `output_padding` argument must be a tuple of 3 integers"),
    (dict(filters=1, kernel_size=3, groups=2), "Conv3DTranspose has no `groups` argument"),
])
def test_conv3d_transpose_argument_errors(kwargs, message):
    with pytest.raises(ValueError, match=None) as info:
        Conv3DTranspose(**kwargs)
    assert message in str(info.value)


def test_build_time_errors():
    layer = Conv3D(4, 3, groups=2)
    with pytest.raises(ValueError, match="The number of input channels must be evenly divisible"):
        layer.build((1, 8, 8, 8, 3))
    with pytest.raises(ValueError, match="Computed output size would be zero or negative"):
        Conv3D(1, 5).build((1, 4, 8, 8, 1))
    with pytest.raises(ValueError, match="expected min_ndim=5"):
        Conv3D(1, 3).build((8, 8, 8, 1))
    with pytest.raises(ValueError, match="isn't built"):
        Conv3D(1, 3).count_params()


def test_call_checks_channels_against_built_kernel():
    layer = Conv3D(2, 3)
    layer.build((1, 6, 6, 6, 3))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer(np.zeros((1, 6, 6, 6, 4), np.float32))


def test_weights_shapes_and_params():
    conv = Conv3D(6, (2, 3, 4), groups=3)
    conv.build((1, 8, 8, 8, 9))
    assert conv.kernel.shape == (2, 3, 4, 3, 6) and conv.bias.shape == (6,)
    assert conv.count_params() == 2 * 3 * 4 * 3 * 6 + 6
    tconv = Conv3DTranspose(5, 3, use_bias=False)
    tconv.build((1, 4, 4, 4, 2))
    assert tconv.kernel.shape == (3, 3, 3, 5, 2) and tconv.get_weights()[0].shape == (3, 3, 3, 5, 2)
    assert len(tconv.get_weights()) == 1 and tconv.count_params() == 270
    with pytest.raises(ValueError, match="is not compatible with provided weight shape"):
        conv.set_weights([np.zeros((2, 3, 4, 3, 5)), np.zeros(6)])
    with pytest.raises(ValueError, match="was expecting 2 weights"):
        conv.set_weights([np.zeros((2, 3, 4, 3, 6))])


def test_set_weights_builds_an_unbuilt_layer(rng):
    layer = Conv3D(2, 3, groups=2)
    k = rng.standard_normal((3, 3, 3, 2, 2)).astype(np.float32)
    layer.set_weights([k, np.ones(2, np.float32)])
    assert layer.input_channels == 4
    x = rng.standard_normal((1, 5, 5, 5, 4)).astype(np.float32)
    assert_close(layer(x), ref_conv3d(x, k, np.ones(2), groups=2))


@pytest.mark.parametrize("cls", [Conv3D, Conv3DTranspose])
def test_config_round_trip(cls):
    kwargs = dict(filters=4, kernel_size=(1, 2, 3), strides=(1, 1, 1), padding="same",
                  dilation_rate=(1, 2, 1), activation="gelu", use_bias=False,
                  kernel_initializer=initializers.HeNormal(seed=3),
                  kernel_regularizer=regularizers.L1L2(0.1, 0.2), bias_regularizer="l2",
                  activity_regularizer="l1", kernel_constraint="max_norm",
                  bias_constraint=constraints.MinMaxNorm(0.1, 2.0), name="c1")
    layer = cls(**kwargs)
    config = layer.get_config()
    json.dumps(config)  # serializable
    again = cls.from_config(config)
    assert again.get_config() == config
    assert from_config({"class_name": cls.__name__, "config": config}).get_config() == config
    assert config["kernel_initializer"]["class_name"] == "HeNormal"
    assert config["kernel_regularizer"]["config"] == {"l1": 0.1, "l2": 0.2}
    assert ("groups" in config) == (cls is Conv3D)
    assert ("output_padding" in config) == (cls is Conv3DTranspose)


def test_from_tf_keras2_config_uses_keras2_hard_sigmoid():
    config = {"name": "conv3d", "trainable": True, "dtype": "float32", "filters": 2,
              "kernel_size": [3, 3, 3], "strides": [1, 1, 1], "padding": "valid",
              "data_format": "channels_last", "dilation_rate": [1, 1, 1], "groups": 1,
              "activation": "hard_sigmoid", "use_bias": True,
              "kernel_initializer": {"class_name": "GlorotUniform", "config": {"seed": None}},
              "bias_initializer": {"class_name": "Zeros", "config": {}},
              "kernel_regularizer": None, "bias_regularizer": None, "activity_regularizer": None,
              "kernel_constraint": None, "bias_constraint": None}
    layer = Conv3D.from_config(config)
    assert layer.keras2
    x = np.array([-3.0, -1.0, 0.0, 1.0, 2.0], np.float32)
    assert_close(layer.activation(x), np.clip(0.2 * x + 0.5, 0, 1))
    k3 = Conv3D(2, 3, activation="hard_sigmoid")
    assert_close(k3.activation(x), np.clip(x + 3, 0, 6) / 6)


def test_data_format_default_from_keras_json(tmp_path, monkeypatch):
    (tmp_path / "keras.json").write_text(json.dumps({"image_data_format": "channels_first"}))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert Conv3D(1, 3).data_format == "channels_first"
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "missing"))
    assert Conv3D(1, 3).data_format == "channels_last"


@pytest.mark.parametrize("name,check", [
    ("glorot_uniform", lambda w, fi, fo: np.abs(w).max() <= np.sqrt(6 / (fi + fo))),
    ("he_uniform", lambda w, fi, fo: np.abs(w).max() <= np.sqrt(6 / fi)),
    ("lecun_uniform", lambda w, fi, fo: np.abs(w).max() <= np.sqrt(3 / fi)),
    ("he_normal", lambda w, fi, fo: abs(w.std() - np.sqrt(2 / fi)) < 0.05 * np.sqrt(2 / fi)
     and np.abs(w).max() <= 2 * np.sqrt(2 / fi) / 0.87962566103423978),
    ("glorot_normal", lambda w, fi, fo: abs(w.std() - np.sqrt(2 / (fi + fo)))
     < 0.05 * np.sqrt(2 / (fi + fo))),
    ("lecun_normal", lambda w, fi, fo: abs(w.std() - np.sqrt(1 / fi)) < 0.05 * np.sqrt(1 / fi)),
    ("random_normal", lambda w, fi, fo: abs(w.std() - 0.05) < 0.003),
    ("random_uniform", lambda w, fi, fo: np.abs(w).max() <= 0.05 and w.std() > 0.025),
    ("truncated_normal", lambda w, fi, fo: np.abs(w).max() <= 0.1),
    ("zeros", lambda w, fi, fo: not w.any()),
    ("ones", lambda w, fi, fo: (w == 1).all()),
])
def test_initializer_distributions_use_keras_fans(name, check):
    shape = (3, 3, 3, 16, 32)
    fan_in, fan_out = 27 * 16, 27 * 32
    w = initializers.get(name)(shape)
    assert w.shape == shape and w.dtype == np.float32
    assert check(w, fan_in, fan_out)


def test_initializer_seed_gives_same_weights():
    a = Conv3D(4, 3, kernel_initializer=initializers.GlorotUniform(seed=5))
    b = Conv3D(4, 3, kernel_initializer='glorot_uniform:{"seed": 5}')
    a.build((1, 6, 6, 6, 2))
    b.build((1, 6, 6, 6, 2))
    np.testing.assert_array_equal(a.kernel, b.kernel)
    c = Conv3D(4, 3, kernel_initializer=initializers.GlorotUniform(seed=6))
    c.build((1, 6, 6, 6, 2))
    assert not np.array_equal(a.kernel, c.kernel)


def test_orthogonal_and_identity_and_constant():
    w = initializers.get("orthogonal")((2, 2, 2, 4, 8))
    flat = w.reshape(-1, 8)
    assert_close(flat.T @ flat, np.eye(8), rtol=1e-5)
    with pytest.raises(ValueError, match="Identity matrix initializer can only be used for 2D"):
        initializers.get("identity")((3, 3, 3, 1, 1))
    assert (initializers.get('constant:{"value": 0.5}')((2, 3)) == 0.5).all()


def test_regularizer_specs_and_penalties():
    w = np.array([[-1.0, 2.0], [3.0, -4.0]], np.float32)
    assert regularizers.get("l2")(w) == pytest.approx(0.01 * 30)
    assert regularizers.get("l1")(w) == pytest.approx(0.01 * 10)
    assert regularizers.get('l1_l2:{"l1": 0.1, "l2": 0.2}')(w) == pytest.approx(1 + 6)
    assert regularizers.get("l1_l2")(w) == pytest.approx(0.1 + 0.3)  # Keras 2 defaults
    spec = ('{"module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.5}, '
            '"registered_name": null}')
    assert regularizers.get(spec)(w) == pytest.approx(15)
    with pytest.raises(ValueError, match="Invalid JSON"):
        regularizers.get("l2:{oops}")


def test_activity_penalty_is_divided_by_batch(rng):
    layer = Conv3D(1, 1, use_bias=False, activity_regularizer="l2", kernel_initializer="ones")
    x = rng.standard_normal((4, 3, 3, 3, 1)).astype(np.float32)
    layer(x)
    expected = 0.01 * float(np.square(x.astype(np.float64)).sum()) / 4
    assert layer.losses == [pytest.approx(expected, rel=1e-6)]


def test_constraints_project_as_keras():
    w = np.array([[3.0, 0.1], [4.0, 0.1]])
    assert_close(constraints.get("max_norm")(w), np.array([[1.2, 0.1], [1.6, 0.1]]), rtol=1e-6)
    assert_close(constraints.get("unit_norm")(w)[:, 0], [0.6, 0.8], rtol=1e-6)
    assert (constraints.get("non_neg")(np.array([-1.0, 2.0])) == [0, 2]).all()
    mm = constraints.get('min_max_norm:{"min_value": 1.0, "max_value": 2.0}')(w)
    assert_close(np.linalg.norm(mm, axis=0), [2.0, 1.0], rtol=1e-5)


def test_apply_constraints_projects_loaded_weights(rng):
    layer = Conv3D(2, 1, kernel_constraint="non_neg")
    layer.set_weights([-np.ones((1, 1, 1, 1, 2)), np.zeros(2)])
    x = np.ones((1, 2, 2, 2, 1), np.float32)
    assert (layer(x) == -1).all()  # the forward pass never projects (as Keras)
    layer.apply_constraints()
    assert (layer(x) == 0).all()


def test_activation_arguments_and_errors():
    act = activations.get('leaky_relu:{"negative_slope": 0.5}')
    assert_close(act(np.array([-2.0, 2.0], np.float32)), [-1.0, 2.0])
    with pytest.raises(ValueError, match="needs arguments"):
        activations.get("threshold")
    with pytest.raises(ValueError, match="axis size must be divisible by 2"):
        Conv3D(3, 1, activation="glu")(np.zeros((1, 2, 2, 2, 1), np.float32))


def test_glu_halves_w_under_channels_first(rng):
    layer = Conv3D(2, 1, activation="glu", data_format="channels_first")
    y = layer(rng.standard_normal((1, 1, 3, 3, 4)).astype(np.float32))
    assert y.shape == (1, 2, 3, 3, 2)


def test_float64_dtype(rng):
    layer = Conv3D(2, 3, dtype="float64", bias_initializer="random_normal")
    x = rng.standard_normal((1, 5, 5, 5, 1))
    y = layer(x)
    assert y.dtype == np.float64 and layer.kernel.dtype == np.float64
    assert_close(y, ref_conv3d(x, layer.kernel, layer.bias), rtol=FLOAT64_RTOL)
