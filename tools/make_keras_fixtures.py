"""Generate golden outputs with real Keras 3 (JAX backend) for tests/test_keras_golden.py.

Needs keras and jax (not needed by the tests):

    python -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install keras jax h5py
    KERAS_BACKEND=jax /tmp/kvenv/bin/python tools/make_keras_fixtures.py

Writes tests/fixtures/keras3_golden.npz (inputs, weights, outputs) and
tests/fixtures/keras3_golden.json (each case's serialized layer, Keras's
output shape, ``layer.losses`` and, for activations that need arguments, the
arguments). Inputs are random; weights are random too (not the layer's own
initializer) so every tap and bias matters.
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
rng = np.random.default_rng(1234)
cases, arrays = [], {}


def add(name, cls, kwargs, input_shape, post=None, flatten_batch=False):
    """Run ``cls(**kwargs)`` on a random input of ``input_shape`` and record it."""
    layer = getattr(keras.layers, cls)(**kwargs)
    x = rng.standard_normal(input_shape).astype(np.float32)
    keras_x = x.reshape((-1,) + x.shape[-4:]) if flatten_batch else x
    layer.build(keras_x.shape)
    weights = [rng.standard_normal(w.shape).astype(np.float32) * 0.5 for w in layer.get_weights()]
    layer.set_weights(weights)
    y = np.asarray(layer(keras_x))
    if post is not None:  # an activation that needs arguments, applied as Keras does
        fn, args = post
        y = np.asarray(getattr(keras.activations, fn)(y, **args))
    if flatten_batch:
        y = y.reshape(x.shape[:-4] + y.shape[1:])
    losses = [float(v) for v in layer.losses]
    cfg = keras.layers.serialize(layer)
    arrays[f"{name}/x"] = x
    arrays[f"{name}/y"] = y.astype(np.float32)
    for i, w in enumerate(weights):
        arrays[f"{name}/w{i}"] = w
    cases.append({"name": name, "layer": cfg, "input_shape": list(x.shape),
                  "output_shape": list(y.shape), "losses": losses,
                  "post_activation": None if post is None else {"name": post[0], "args": post[1]},
                  "compute_output_shape": list(layer.compute_output_shape(keras_x.shape)),
                  "n_weights": len(weights)})
    print(name, x.shape, "->", y.shape, file=sys.stderr)


def main():
    for df in ("channels_last", "channels_first"):
        def shp(b, d, h, w, c):
            return (b, d, h, w, c) if df == "channels_last" else (b, c, d, h, w)

        tag = "cl" if df == "channels_last" else "cf"
        # Conv3D: padding, strides, dilation, groups, kernel shapes, odd/even sizes.
        conv = [
            ("valid_k3", dict(filters=4, kernel_size=3), shp(2, 7, 8, 9, 3)),
            ("same_k3", dict(filters=4, kernel_size=3, padding="same"), shp(2, 7, 8, 9, 3)),
            ("same_even_k4_s2", dict(filters=3, kernel_size=4, strides=2, padding="same"),
             shp(1, 9, 8, 7, 2)),
            ("valid_aniso", dict(filters=2, kernel_size=(2, 3, 1), strides=(1, 2, 3)),
             shp(2, 6, 9, 10, 3)),
            ("same_aniso_s3", dict(filters=2, kernel_size=(3, 2, 5), strides=(3, 1, 2),
                                   padding="SAME"), shp(1, 10, 7, 11, 2)),
            ("dilated_valid", dict(filters=3, kernel_size=3, dilation_rate=2),
             shp(1, 9, 10, 11, 2)),
            ("dilated_same_aniso", dict(filters=3, kernel_size=(2, 3, 2), dilation_rate=(1, 2, 3),
                                        padding="same"), shp(2, 7, 8, 9, 2)),
            ("groups2", dict(filters=4, kernel_size=3, groups=2, padding="same"),
             shp(1, 6, 7, 8, 4)),
            ("groups_depthwise", dict(filters=6, kernel_size=2, groups=3, strides=2),
             shp(2, 7, 6, 9, 3)),
            ("no_bias_relu", dict(filters=2, kernel_size=3, use_bias=False, activation="relu"),
             shp(1, 6, 6, 6, 2)),
            ("k1", dict(filters=5, kernel_size=1, strides=2), shp(1, 5, 6, 7, 3)),
            ("kernel_equals_input", dict(filters=2, kernel_size=(5, 4, 3)), shp(2, 5, 4, 3, 1)),
            ("regularized", dict(filters=3, kernel_size=3,
                                 kernel_regularizer=keras.regularizers.L1L2(0.01, 0.02),
                                 bias_regularizer="l1",
                                 activity_regularizer=keras.regularizers.L2(0.001)),
             shp(3, 6, 6, 6, 2)),
        ]
        for name, kw, s in conv:
            add(f"conv_{tag}_{name}", "Conv3D", dict(kw, data_format=df), s)
        tconv = [
            ("valid_k3", dict(filters=3, kernel_size=3), shp(2, 4, 5, 6, 2)),
            ("same_k3_s2", dict(filters=3, kernel_size=3, strides=2, padding="same"),
             shp(1, 4, 5, 6, 2)),
            ("valid_k2_s2", dict(filters=2, kernel_size=2, strides=2), shp(2, 3, 4, 5, 3)),
            ("valid_k1_s3", dict(filters=2, kernel_size=1, strides=3), shp(1, 3, 4, 2, 2)),
            ("same_k4_s3", dict(filters=2, kernel_size=4, strides=3, padding="same"),
             shp(1, 3, 4, 5, 2)),
            ("same_even_s1", dict(filters=2, kernel_size=2, padding="same"), shp(1, 4, 5, 6, 2)),
            ("op_valid", dict(filters=2, kernel_size=3, strides=(2, 3, 2),
                              output_padding=(1, 2, 0)), shp(1, 3, 4, 5, 2)),
            ("op_same", dict(filters=2, kernel_size=(3, 4, 2), strides=(2, 3, 2), padding="same",
                             output_padding=(1, 0, 1)), shp(2, 3, 4, 5, 2)),
            ("op_same_k5", dict(filters=1, kernel_size=5, strides=2, padding="same",
                                output_padding=0), shp(1, 4, 3, 5, 3)),
            ("op_same_k3_s1", dict(filters=2, kernel_size=3, padding="same", output_padding=0),
             shp(1, 4, 5, 6, 2)),
            ("dilated_valid", dict(filters=2, kernel_size=3, dilation_rate=2), shp(1, 4, 5, 6, 2)),
            ("dilated_same", dict(filters=2, kernel_size=(2, 3, 3), dilation_rate=(2, 1, 3),
                                  padding="same"), shp(1, 5, 4, 6, 2)),
            ("aniso_valid", dict(filters=3, kernel_size=(1, 2, 3), strides=(3, 2, 1)),
             shp(2, 3, 4, 5, 2)),
            ("tanh_no_bias", dict(filters=2, kernel_size=3, strides=2, activation="tanh",
                                  use_bias=False), shp(1, 3, 3, 3, 2)),
        ]
        for name, kw, s in tconv:
            add(f"tconv_{tag}_{name}", "Conv3DTranspose", dict(kw, data_format=df), s)

        # All activations; axis -1 is W under channels_first.
        acts = ["celu", "elu", "exponential", "gelu", "glu", "hard_shrink", "hard_sigmoid",
                "hard_silu", "hard_swish", "hard_tanh", "leaky_relu", "linear", "log_sigmoid",
                "log_softmax", "mish", "relu", "relu6", "selu", "sigmoid", "silu", "swish",
                "soft_shrink", "softmax", "softplus", "softsign", "sparse_plus",
                "sparse_sigmoid", "sparsemax", "squareplus", "tanh", "tanh_shrink"]
        for act in acts:
            add(f"act_{tag}_{act}", "Conv3D",
                dict(filters=4, kernel_size=2, padding="same", activation=act, data_format=df),
                shp(1, 4, 5, 6, 2))
        add(f"act_{tag}_threshold", "Conv3D",
            dict(filters=3, kernel_size=2, data_format=df), shp(1, 4, 5, 6, 2),
            post=("threshold", {"threshold": 0.3, "default_value": -1.0}))
        # Extended batch dims: Keras 3 takes rank 5 only; the semantics is a flattened batch.
        add(f"conv_{tag}_extended_batch", "Conv3D",
            dict(filters=2, kernel_size=3, padding="same", data_format=df),
            (2, 3) + shp(1, 5, 4, 6, 2)[1:], flatten_batch=True)
        add(f"tconv_{tag}_extended_batch", "Conv3DTranspose",
            dict(filters=2, kernel_size=2, strides=2, data_format=df),
            (3, 2) + shp(1, 3, 4, 2, 2)[1:], flatten_batch=True)

    os.makedirs(OUT, exist_ok=True)
    np.savez_compressed(os.path.join(OUT, "keras3_golden.npz"), **arrays)
    with open(os.path.join(OUT, "keras3_golden.json"), "w") as fh:
        json.dump({"keras_version": keras.__version__, "backend": keras.backend.backend(),
                   "cases": cases}, fh, indent=1)
    print(f"{len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
