"""Golden outputs of real Keras 3 (JAX backend) on NaN and +-Inf, for tests/test_nonfinite.py.

Needs keras and jax (not needed by the tests):

    KERAS_BACKEND=jax /path/to/keras-venv/bin/python tools/make_nonfinite_fixtures.py

Writes tests/fixtures/keras3_nonfinite.npz. Per layer case NAME: ``NAME/config``
(the serialized layer, a JSON string), ``NAME/x``, ``NAME/w0`` (kernel),
``NAME/w1`` (bias) and ``NAME/y`` (Keras's output). Per activation case NAME:
``act/NAME/args`` (JSON), ``act/NAME/x`` and ``act/NAME/y``.

What the cases pin (all verified against Keras while writing this):

- A NaN input gives NaN in exactly the outputs whose window holds it; an
  Inf input gives +-Inf there, and NaN where it meets a zero weight
  (``inf * 0``) or where +Inf and -Inf meet in one window (``inf - inf``).
- A non-finite *weight* is multiplied by everything in its window, including
  the zeros of 'same' padding (Conv3D) and the zeros that transposed
  convolution inserts between input voxels and pads around them
  (``0 * inf = NaN``), so it turns most of a filter NaN.
- Activations on NaN, +Inf, -Inf and huge finite values.

Values are kept moderate (standard normal), so no finite float32 sum
overflows and only the non-finite inputs decide the pattern.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                   "keras3_nonfinite.npz")
rng = np.random.default_rng(2024)
arrays = {}


def poke(x, points):
    """Set voxels (spatial index, channel) of batch element 0 to NaN/+Inf/-Inf."""
    x = x.copy()
    for (d, h, w, c), v in points:
        x[0, d, h, w, c] = v
    return x


def add(name, cls, kwargs, input_shape, points=(), kernel_edit=None, bias_edit=None,
        zero_fraction=0.2):
    """Run ``cls(**kwargs)`` on a random input with non-finite ``points`` and record it.

    A fraction of the kernel's weights is set to zero, so that Inf inputs meet
    zero taps; ``kernel_edit``/``bias_edit`` put non-finite values into the weights.
    """
    layer = getattr(keras.layers, cls)(**kwargs)
    x = poke(rng.standard_normal(input_shape).astype(np.float32), points)
    layer.build(x.shape)
    kernel, bias = (rng.standard_normal(w.shape).astype(np.float32) for w in layer.get_weights())
    kernel[rng.random(kernel.shape) < zero_fraction] = 0
    if kernel_edit is not None:
        kernel_edit(kernel)
    if bias_edit is not None:
        bias_edit(bias)
    layer.set_weights([kernel, bias])
    y = np.asarray(layer(x), np.float32)
    arrays[f"{name}/config"] = np.array(json.dumps(keras.layers.serialize(layer)))
    arrays[f"{name}/x"], arrays[f"{name}/w0"], arrays[f"{name}/w1"] = x, kernel, bias
    arrays[f"{name}/y"] = y
    print(f"{name}: {x.shape} -> {y.shape}; NaN {np.isnan(y).sum()}, +Inf {np.isposinf(y).sum()}, "
          f"-Inf {np.isneginf(y).sum()}", file=sys.stderr)


NAN, INF = np.nan, np.inf


def layer_cases():
    # Conv3D: every kind of non-finite input, at the border, inside, next to each other.
    mixed = [((0, 0, 0, 0), NAN), ((3, 4, 2, 1), INF), ((5, 1, 6, 3), -INF),
             ((7, 8, 6, 7), NAN), ((4, 4, 4, 2), INF), ((4, 4, 5, 2), -INF),  # inf - inf
             ((2, 6, 3, 5), INF), ((6, 2, 1, 0), -INF)]
    add("conv_valid_c8", "Conv3D", dict(filters=8, kernel_size=3), (1, 8, 9, 7, 8), mixed)
    add("conv_same_c8_relu", "Conv3D", dict(filters=8, kernel_size=3, padding="same",
                                            activation="relu"), (1, 8, 9, 7, 8), mixed)
    few = [((0, 3, 3, 0), INF), ((4, 0, 5, 1), -INF), ((5, 5, 8, 0), NAN), ((2, 2, 2, 1), INF),
           ((2, 3, 2, 1), -INF)]
    add("conv_same_s2", "Conv3D", dict(filters=3, kernel_size=3, strides=2, padding="same"),
        (2, 7, 8, 9, 2), few)
    add("conv_dilated", "Conv3D", dict(filters=2, kernel_size=(2, 3, 2), dilation_rate=(2, 1, 3)),
        (1, 7, 8, 9, 2), few)
    add("conv_groups", "Conv3D", dict(filters=4, kernel_size=3, groups=2, padding="same"),
        (1, 7, 8, 9, 2), few)
    add("conv_k7_one_nan", "Conv3D", dict(filters=1, kernel_size=7),
        (1, 12, 11, 13, 1), [((6, 5, 7, 0), NAN)])
    add("conv_softmax_inf", "Conv3D", dict(filters=4, kernel_size=2, padding="same",
                                           activation="softmax"), (1, 5, 6, 6, 2),
        [((0, 3, 3, 0), INF), ((4, 0, 5, 1), -INF), ((2, 2, 2, 1), NAN)])
    # Conv3DTranspose: strided (scatter), stride 1 (Winograd-eligible), output padding, dilation.
    tpoints = [((0, 0, 0, 0), NAN), ((2, 3, 1, 1), INF), ((4, 1, 4, 3), -INF),
               ((2, 2, 2, 5), INF), ((2, 2, 3, 5), -INF), ((3, 0, 2, 7), NAN)]
    add("tconv_s2_same_c8", "Conv3DTranspose",
        dict(filters=8, kernel_size=3, strides=2, padding="same"), (1, 5, 4, 6, 8), tpoints)
    add("tconv_s1_c8", "Conv3DTranspose", dict(filters=8, kernel_size=3),
        (1, 5, 4, 6, 8), tpoints)
    tfew = [((0, 1, 2, 0), INF), ((2, 3, 0, 1), -INF), ((1, 1, 1, 0), NAN)]
    add("tconv_op_valid", "Conv3DTranspose",
        dict(filters=2, kernel_size=(4, 2, 3), strides=(2, 3, 1), output_padding=(1, 2, 0)),
        (1, 3, 4, 5, 2), tfew)
    add("tconv_dilated_same", "Conv3DTranspose",
        dict(filters=2, kernel_size=3, dilation_rate=2, padding="same"), (1, 3, 4, 5, 2), tfew)
    add("tconv_k2_s3", "Conv3DTranspose", dict(filters=2, kernel_size=2, strides=3),
        (1, 3, 4, 3, 2), tfew)

    # Non-finite weights: multiplied by padded and inserted zeros too.
    def kernel_conv(k):  # (kd, kh, kw, C, F): +Inf, -Inf, NaN in three filters
        k[0, 0, 0, 0, 0] = INF
        k[2, 1, 0, 1, 1] = -INF
        k[1, 2, 2, 0, 2] = NAN

    def kernel_tconv(k):  # (kd, kh, kw, F, C)
        k[0, 0, 0, 0, 0] = INF
        k[k.shape[0] - 1, 1, 0, 1, 1] = -INF

    def kernel_tconv_nan(k):
        k[1, 0, 1, 2, 0] = NAN

    add("conv_same_inf_weights", "Conv3D", dict(filters=4, kernel_size=3, padding="same"),
        (1, 5, 6, 7, 2), kernel_edit=kernel_conv)
    add("conv_valid_inf_weights", "Conv3D", dict(filters=4, kernel_size=3),
        (1, 5, 6, 7, 2), kernel_edit=kernel_conv)
    add("tconv_s2_inf_weights", "Conv3DTranspose", dict(filters=3, kernel_size=3, strides=2),
        (1, 3, 4, 5, 2), kernel_edit=kernel_tconv)
    add("tconv_s2_same_inf_weights", "Conv3DTranspose",
        dict(filters=3, kernel_size=3, strides=2, padding="same"), (1, 3, 4, 5, 2),
        kernel_edit=kernel_tconv)
    add("tconv_s1_nan_weight", "Conv3DTranspose", dict(filters=3, kernel_size=3, padding="same"),
        (1, 3, 4, 5, 2), kernel_edit=kernel_tconv_nan)
    add("tconv_k2_s3_inf_weights", "Conv3DTranspose", dict(filters=3, kernel_size=2, strides=3),
        (1, 2, 3, 2, 2), kernel_edit=kernel_tconv)
    add("tconv_op_same_inf_weights_and_input", "Conv3DTranspose",
        dict(filters=3, kernel_size=(3, 4, 2), strides=(2, 3, 2), padding="same",
             output_padding=(1, 0, 1)), (1, 3, 4, 5, 2), tfew, kernel_edit=kernel_tconv)

    def bias_edit(b):
        b[0], b[-1] = INF, NAN

    add("conv_nonfinite_bias", "Conv3D", dict(filters=3, kernel_size=3), (1, 5, 6, 7, 2),
        [((1, 1, 1, 0), -INF)], bias_edit=bias_edit)


ACT_VALUES = np.array([NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 0.3, -0.3, 0.5, -0.5, 2.5, -2.5,
                       6.0, 7.0, 10.0, -10.0, 100.0, -100.0, 3e38, -3e38], np.float32)
ACT_ROWS = np.array([[1, INF, 2, 0], [NAN, 1, 2, 0], [-INF, 1, 2, 0], [INF, INF, 1, 0],
                     [-INF, -INF, -INF, -INF], [INF, -INF, 0, 1], [1, 2, 3, 4],
                     [INF, INF, INF, INF], [-INF, 5, -INF, 0], [3e38, 3e38, 1, 0]], np.float32)
AXISWISE = {"softmax", "log_softmax", "glu", "sparsemax"}
ACTIVATIONS = [(n, {}) for n in (
    "celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid", "hard_silu",
    "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid", "log_softmax", "mish",
    "relu", "relu6", "selu", "sigmoid", "silu", "swish", "soft_shrink", "softmax", "softplus",
    "softsign", "sparse_plus", "sparse_sigmoid", "sparsemax", "squareplus", "tanh",
    "tanh_shrink")] + [
    ("threshold", {"threshold": 0.5, "default_value": -2.0}),
    ("relu", {"max_value": 6.0}), ("relu", {"negative_slope": 0.1}),
    ("relu", {"threshold": 0.5}),
    ("relu", {"negative_slope": 0.1, "threshold": 0.5, "max_value": 3.0}),
    ("elu", {"alpha": 0.5}), ("leaky_relu", {"negative_slope": 0.3}),
    ("gelu", {"approximate": True}), ("celu", {"alpha": 2.0}),
    ("hard_shrink", {"threshold": 1.0}), ("soft_shrink", {"threshold": 1.0}),
    ("squareplus", {"b": 0.0})]


def activation_cases():
    for i, (name, args) in enumerate(ACTIVATIONS):
        x = ACT_ROWS if name in AXISWISE else ACT_VALUES
        y = np.asarray(getattr(keras.activations, name)(x, **args), np.float32)
        key = f"act/{i:02d}_{name}"
        arrays[f"{key}/args"] = np.array(json.dumps(args))
        arrays[f"{key}/x"], arrays[f"{key}/y"] = x, y


def main():
    layer_cases()
    activation_cases()
    arrays["keras_version"] = np.array(f"{keras.__version__} ({keras.backend.backend()})")
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
