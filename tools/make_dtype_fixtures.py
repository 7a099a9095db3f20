"""Golden outputs of real Keras under each dtype policy, for tests/test_dtype_policy.py.

Two environments (the tests need neither):

    # 1. tf.keras 2 (pip install tensorflow-cpu==2.21.0 tf_keras==2.21.0 h5py): a legacy
    #    .h5 saved under tf.keras 2's mixed_float16 policy, with what tf.keras 2 computed.
    /tmp/tfvenv/bin/python tools/make_dtype_fixtures.py tf2
    # 2. Keras 3 (pip install keras==3.15.1 jax[cpu] h5py; JAX backend, CPU): everything
    #    else, and what Keras 3 computes for the tf.keras 2 file's layers.
    KERAS_BACKEND=jax /tmp/kvenv/bin/python tools/make_dtype_fixtures.py keras3

Writes to tests/fixtures/:

- ``dtype_golden.json`` / ``.npz``: small Conv3D and Conv3DTranspose cases (strides,
  same/valid, groups, bias, relu/sigmoid/softmax/tanh/gelu/silu, channels_first)
  under float16, bfloat16, mixed_float16, mixed_bfloat16 and float64, computed by
  ``layer(x)``. Inputs are float32; weights are float32 before ``set_weights`` (so
  the policy's variable dtype rounds them as Keras does); biases are large
  enough that rounding the sum before the bias add is visible. TensorFlow's own
  float16/bfloat16 Conv3D cases (``conv_ops_3d_test.py``: inputs 1/N..1,
  filters 1/M..1, the expected values that test hard-codes) run through Keras
  under float16 and bfloat16 too.
- ``dtype_models/``: ``.keras`` models saved by Keras 3 under mixed_float16,
  mixed_bfloat16 and bfloat16 (the last stores bfloat16 weights), the tf.keras
  2 ``.h5``, and ``<model>_outputs.npz`` with, per layer, an input and what
  that layer computes on it (Keras 3's numbers; ``tf2_tf_outputs.npz`` holds
  tf.keras 2's own, whose float16 convolution sums differently on CPU).

Arrays of bfloat16 are stored widened to float32 (exactly: every bfloat16 is a
float32); float16 arrays are stored as float16.
"""

import json
import os
import sys

FLAVOUR = sys.argv[1] if len(sys.argv) > 1 else "keras3"
if FLAVOUR == "tf2":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tf_keras as keras  # noqa: E402
else:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    # Without x64, JAX silently computes a float64 policy in float32.
    os.environ["JAX_ENABLE_X64"] = "1"
    import keras  # noqa: E402
import numpy as np  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODELS = os.path.join(FIXTURES, "dtype_models")
POLICIES = ("float16", "bfloat16", "mixed_float16", "mixed_bfloat16", "float64")
L = keras.layers

# (name, class, kwargs, input shape)
CASES = [
    ("conv_valid_k3", "Conv3D", dict(filters=4, kernel_size=3), (2, 6, 7, 5, 3)),
    ("conv_same_s2_relu", "Conv3D", dict(filters=3, kernel_size=3, strides=2, padding="same",
                                         activation="relu"), (1, 7, 8, 9, 2)),
    ("conv_groups_sigmoid", "Conv3D", dict(filters=4, kernel_size=(2, 3, 2), groups=2,
                                           padding="same", activation="sigmoid"), (1, 6, 6, 6, 4)),
    ("conv_wide_softmax", "Conv3D", dict(filters=8, kernel_size=3, padding="same",
                                         activation="softmax"), (1, 6, 6, 6, 16)),
    ("conv_wide_linear", "Conv3D", dict(filters=16, kernel_size=3, padding="same"),
     (1, 6, 5, 6, 16)),
    ("conv_cf_gelu", "Conv3D", dict(filters=4, kernel_size=3, padding="same",
                                    data_format="channels_first", activation="gelu"),
     (1, 3, 5, 6, 7)),
    ("conv_silu_dilated", "Conv3D", dict(filters=2, kernel_size=2, dilation_rate=2,
                                         activation="silu"), (1, 6, 7, 6, 3)),
    ("transpose_same_s2_tanh", "Conv3DTranspose", dict(filters=3, kernel_size=3, strides=2,
                                                       padding="same", activation="tanh"),
     (1, 4, 5, 3, 4)),
    ("transpose_valid_op", "Conv3DTranspose", dict(filters=2, kernel_size=(2, 3, 2),
                                                   strides=(2, 1, 3), output_padding=(1, 0, 2)),
     (2, 3, 4, 3, 3)),
    ("transpose_wide_stride2", "Conv3DTranspose", dict(filters=12, kernel_size=3, strides=2),
     (1, 3, 4, 3, 10)),
    ("conv_no_bias_accumulation", "Conv3D", dict(filters=2, kernel_size=3, use_bias=False),
     (1, 5, 5, 5, 48)),
]

# TensorFlow's Conv3D cases that run for float16 and bfloat16 on CPU
# (tensorflow/python/kernel_tests/nn_ops/conv_ops_3d_test.py): input 1/N..1 and
# filter 1/M..1 in the layer's dtype, no bias, and the float64 values that test
# hard-codes. TF checks float16 at rtol = atol = 1e-3 and bfloat16 at 1e-2.
TF_CASES = [
    ("tf_1x1x1_filter", [1, 2, 3, 1, 3], [1, 1, 1, 3, 3], 1, "valid", [
        0.18518519, 0.22222222, 0.25925926, 0.40740741, 0.5, 0.59259259, 0.62962963,
        0.77777778, 0.92592593, 0.85185185, 1.05555556, 1.25925926, 1.07407407, 1.33333333,
        1.59259259, 1.2962963, 1.61111111, 1.92592593]),
    ("tf_2x2x2_filter", [1, 4, 2, 3, 3], [2, 2, 2, 3, 3], 1, "valid", [
        3.77199074, 3.85069444, 3.92939815, 4.2650463, 4.35763889, 4.45023148, 6.73032407,
        6.89236111, 7.05439815, 7.22337963, 7.39930556, 7.57523148, 9.68865741, 9.93402778,
        10.17939815, 10.18171296, 10.44097222, 10.70023148]),
    ("tf_strides", [1, 5, 8, 7, 1], [1, 2, 3, 1, 1], [2, 3, 1], "same", [
        0.06071429, 0.08988095, 0.10238095, 0.11488095, 0.12738095, 0.13988095, 0.08452381,
        0.26071429, 0.35238095, 0.36488095, 0.37738095, 0.38988095, 0.40238095, 0.23452381,
        0.46071429, 0.61488095, 0.62738095, 0.63988095, 0.65238095, 0.66488095, 0.38452381,
        1.12738095, 1.48988095, 1.50238095, 1.51488095, 1.52738095, 1.53988095, 0.88452381,
        1.32738095, 1.75238095, 1.76488095, 1.77738095, 1.78988095, 1.80238095, 1.03452381,
        1.52738095, 2.01488095, 2.02738095, 2.03988095, 2.05238095, 2.06488095, 1.18452381,
        2.19404762, 2.88988095, 2.90238095, 2.91488095, 2.92738095, 2.93988095, 1.68452381,
        2.39404762, 3.15238095, 3.16488095, 3.17738095, 3.18988095, 3.20238095, 1.83452381,
        2.59404762, 3.41488095, 3.42738095, 3.43988095, 3.45238095, 3.46488095, 1.98452381]),
    ("tf_2x2x2_filter_stride2", [1, 4, 2, 3, 3], [2, 2, 2, 3, 3], 2, "valid", [
        3.77199074, 3.85069444, 3.92939815, 9.68865741, 9.93402778, 10.17939815]),
    ("tf_stride3", [1, 6, 7, 8, 2], [3, 2, 1, 2, 3], 3, "valid", [
        1.51140873, 1.57167659, 1.63194444, 1.56349206, 1.62673611, 1.68998016, 1.6155754,
        1.68179563, 1.74801587, 1.9280754, 2.01215278, 2.09623016, 1.98015873, 2.0672123,
        2.15426587, 2.03224206, 2.12227183, 2.21230159, 4.4280754, 4.65500992, 4.88194444,
        4.48015873, 4.71006944, 4.93998016, 4.53224206, 4.76512897, 4.99801587, 4.84474206,
        5.09548611, 5.34623016, 4.8968254, 5.15054563, 5.40426587, 4.94890873, 5.20560516,
        5.46230159]),
    ("tf_2x2x2_filter_stride2_same", [1, 4, 2, 3, 3], [2, 2, 2, 3, 3], 2, "same", [
        3.77199074, 3.85069444, 3.92939815, 2.0162037, 2.06597222, 2.11574074, 9.68865741,
        9.93402778, 10.17939815, 4.59953704, 4.73263889, 4.86574074]),
    ("tf_kernel_smaller_than_stride_same", [1, 3, 3, 3, 1], [1, 1, 1, 1, 1], 2, "same", [
        0.03703704, 0.11111111, 0.25925926, 0.33333333, 0.7037037, 0.77777778, 0.92592593,
        1.0]),
    ("tf_kernel_smaller_than_stride_valid", [1, 3, 3, 3, 1], [1, 1, 1, 1, 1], 2, "valid", [
        0.03703704, 0.11111111, 0.25925926, 0.33333333, 0.7037037, 0.77777778, 0.92592593,
        1.0]),
    ("tf_k2_stride3_same", [1, 7, 7, 7, 1], [2, 2, 2, 1, 1], 3, "same", [
        0.54081633, 0.58017493, 0.28061224, 0.81632653, 0.85568513, 0.40306122, 0.41873178,
        0.4340379, 0.19642857, 2.46938776, 2.50874636, 1.1377551, 2.74489796, 2.78425656,
        1.26020408, 1.16873178, 1.1840379, 0.51785714, 1.09511662, 1.10604956, 0.44642857,
        1.17164723, 1.18258017, 0.47704082, 0.3691691, 0.37244898, 0.125]),
    ("tf_k2_stride3_valid", [1, 7, 7, 7, 1], [2, 2, 2, 1, 1], 3, "valid", [
        0.540816, 0.580175, 0.816327, 0.855685, 2.469388, 2.508746, 2.744898, 2.784257]),
    ("tf_kernel_matches_input", [1, 2, 1, 2, 1], [2, 1, 2, 1, 2], 1, "valid", [1.5625, 1.875]),
]


def stored(a):
    """float16 as is; bfloat16 widened to float32 (exact); everything else as is."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else a


def golden(rng):
    cases, arrays = [], {}
    for name, cls, kwargs, shape in CASES:
        x = rng.standard_normal(shape).astype(np.float32)
        if name == "conv_no_bias_accumulation":
            x = x * 4 + 8  # large same-sign sums: float16 accumulation would be visibly off
        arrays[f"{name}/x"] = x
        weights32 = None
        for policy in POLICIES:
            layer = getattr(L, cls)(dtype=policy, **kwargs)
            layer.build(x.shape)
            if weights32 is None:  # one float32 draw per case, rounded by each policy
                weights32 = [rng.standard_normal(w.shape).astype(np.float32) * 0.5
                             for w in layer.get_weights()]
                if len(weights32) == 2:
                    weights32[1] = weights32[1] * 8
                for i, w in enumerate(weights32):
                    arrays[f"{name}/w{i}"] = w
            layer.set_weights(weights32)
            y = np.asarray(layer(x))
            # Keras 3.15's JAX tanh promotes float64 with a Python float to
            # float32: that one case comes back in float32 (recorded).
            assert str(y.dtype) == layer.compute_dtype or kwargs.get("activation") == "tanh"
            arrays[f"{name}/{policy}/y"] = stored(y)
            for i, w in enumerate(layer.get_weights()):
                assert str(w.dtype) == layer.variable_dtype
                arrays[f"{name}/{policy}/w{i}"] = stored(w)
            cases.append({"name": name, "policy": policy, "layer": keras.layers.serialize(layer),
                          "compute_dtype": layer.compute_dtype,
                          "variable_dtype": layer.variable_dtype,
                          "keras_output_dtype": str(y.dtype),
                          "n_weights": len(weights32), "output_shape": list(y.shape)})
            print(name, policy, x.shape, "->", y.shape, y.dtype, file=sys.stderr)
    for name, in_shape, f_shape, stride, padding, expected in TF_CASES:
        n, m = int(np.prod(in_shape)), int(np.prod(f_shape))
        x = (np.arange(1, n + 1) / n).reshape(in_shape)  # float64, as TF's lists
        w = (np.arange(1, m + 1) / m).reshape(f_shape)
        arrays[f"{name}/x"], arrays[f"{name}/w0"] = x, w
        for policy in ("float16", "bfloat16"):
            layer = L.Conv3D(f_shape[-1], f_shape[:3], strides=stride, padding=padding,
                             use_bias=False, dtype=policy)
            layer.build(x.shape)
            layer.set_weights([w])
            y = np.asarray(layer(x))
            arrays[f"{name}/{policy}/y"] = stored(y)
            cases.append({"name": name, "policy": policy, "layer": keras.layers.serialize(layer),
                          "compute_dtype": layer.compute_dtype,
                          "variable_dtype": layer.variable_dtype, "n_weights": 1,
                          "output_shape": list(y.shape), "tf_expected": expected})
            print(name, policy, x.shape, "->", y.shape, file=sys.stderr)
    with open(os.path.join(FIXTURES, "dtype_golden.json"), "w") as fh:
        json.dump({"keras_version": keras.__version__, "backend": keras.backend.backend(),
                   "cases": cases}, fh, indent=1)
    np.savez_compressed(os.path.join(FIXTURES, "dtype_golden.npz"), **arrays)


def two_layer_model(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        return keras.Sequential([
            keras.Input((6, 6, 6, 2)),
            L.Conv3D(4, 3, padding="same", activation="relu", name="down"),
            L.Conv3DTranspose(2, 3, strides=2, padding="same", activation="sigmoid", name="up"),
        ], name=f"net_{policy}")
    finally:
        keras.mixed_precision.set_global_policy("float32")


def per_layer_outputs(rng, layers, input_shapes):
    """{name/x, name/y}: a float32 input per layer and what that layer alone computes."""
    out = {}
    for layer, shape in zip(layers, input_shapes):
        x = rng.standard_normal((1,) + tuple(shape)).astype(np.float32)
        out[f"{layer.name}/x"] = x
        out[f"{layer.name}/y"] = stored(np.asarray(layer(x)))
    return out


def keras3_models(rng):
    shapes = [(6, 6, 6, 2), (6, 6, 6, 4)]
    for policy in ("mixed_float16", "mixed_bfloat16", "bfloat16"):
        model = two_layer_model(policy)
        for layer in model.layers:
            layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.5
                               for w in layer.get_weights()])
        model.save(os.path.join(MODELS, f"{policy}.keras"))
        np.savez(os.path.join(MODELS, f"{policy}_outputs.npz"),
                 **per_layer_outputs(rng, model.layers, shapes))
        print(policy, [layer.dtype_policy for layer in model.layers], file=sys.stderr)
    tf2_outputs_in_keras3()


def tf2_outputs_in_keras3():
    """What Keras 3 computes for the layers of the tf.keras 2 file.

    Keras 3.15 cannot load that file itself (its legacy loader does not map
    tf.keras 2's serialized Policy), so each layer is rebuilt from the file's
    config, with the policy's name, and given the file's weights."""
    import h5py
    path = os.path.join(MODELS, "tf2_mixed_float16.h5")
    tf_out = np.load(os.path.join(MODELS, "tf2_tf_outputs.npz"))
    out = {}
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])
        for entry in config["config"]["layers"]:
            if entry["class_name"] not in ("Conv3D", "Conv3DTranspose"):
                continue
            cfg = dict(entry["config"])
            cfg["dtype"] = cfg["dtype"]["config"]["name"]
            if entry["class_name"] == "Conv3DTranspose":
                cfg.pop("groups", None)  # tf.keras 2 writes groups=1; Keras 3 refuses it
            layer = getattr(L, entry["class_name"]).from_config(cfg)
            group = f["model_weights"][cfg["name"]]
            names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs["weight_names"]]
            weights = [np.asarray(group[n]) for n in names]
            x = tf_out[f"{cfg['name']}/x"]
            layer.build(x.shape)
            layer.set_weights(weights)
            out[f"{cfg['name']}/x"] = x
            out[f"{cfg['name']}/y"] = stored(np.asarray(layer(x)))
    np.savez(os.path.join(MODELS, "tf2_mixed_float16_outputs.npz"), **out)


def tf2_model():
    rng = np.random.default_rng(7)
    model = two_layer_model("mixed_float16")
    for layer in model.layers:
        layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) * 0.5
                           for w in layer.get_weights()])
    model.save(os.path.join(MODELS, "tf2_mixed_float16.h5"))
    np.savez(os.path.join(MODELS, "tf2_tf_outputs.npz"),
             **per_layer_outputs(rng, model.layers, [(6, 6, 6, 2), (6, 6, 6, 4)]))


def main():
    os.makedirs(MODELS, exist_ok=True)
    if FLAVOUR == "tf2":
        tf2_model()
        return
    rng = np.random.default_rng(2026)
    golden(rng)
    keras3_models(rng)


if __name__ == "__main__":
    main()
