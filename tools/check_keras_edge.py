"""Record what real Keras does at the edges for tests/test_keras_edge.py.

Run by hand, once per Keras flavour (the tests need none of them); each run
updates its own section of tests/fixtures/keras_edge.json:

    KERAS_BACKEND=jax KERASENV/bin/python tools/check_keras_edge.py     # "keras3_jax"
    KERAS_BACKEND=tensorflow TFENV/bin/python tools/check_keras_edge.py # "keras3_tensorflow"
    TF_USE_LEGACY_KERAS=1 TFENV/bin/python tools/check_keras_edge.py    # "tf_keras2"

(KERASENV: a venv with ``keras==3.15.1 jax``; TFENV: one with
``tensorflow-cpu==2.21.0 tf_keras==2.21.0``, which brings Keras 3.15.1 too.)

Recorded per flavour:

- ``empty``: ``compute_output_shape`` and a call on inputs with a zero batch, a
  zero-length spatial axis or zero channels (output shape, dtype, and the sum
  of the output with a bias of ones, which shows whether an empty input gives
  a bias-filled output);
- ``order`` (Keras 3): the error raised when two arguments are wrong at once;
- ``weights``: ``weights=[kernel, bias]`` and ``batch_size=`` (tf.keras 2
  accepts them; Keras 3 refuses them);
- ``constraints`` (Keras 3): how a Python callable constraint is kept and
  serialized;
- ``glu`` (Keras 3): output shapes and errors of an activation that halves
  Keras's last axis;
- ``config_keys``: the keys of each class's ``get_config()``.

Error messages are cut at their first line and at 300 characters; arrays are
never written (Keras 3 puts a whole kernel into its "Unrecognized keyword
arguments" message).
"""

import json
import os
import sys

import numpy as np

LEGACY = bool(os.environ.get("TF_USE_LEGACY_KERAS"))
if LEGACY:
    import tf_keras as keras
    FLAVOUR = "tf_keras2"
else:
    import keras
    FLAVOUR = "keras3_" + keras.backend.backend()

L = keras.layers
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                   "keras_edge.json")
TF = FLAVOUR != "keras3_jax"


def error(exc):
    text = str(exc).strip().splitlines()
    # Keras wraps call errors in "Exception encountered when calling ...": keep
    # the backend's own line.
    lines = [t.strip() for t in text if t.strip() and not t.startswith(("Exception encountered",
                                                                         "Call arguments",
                                                                         "Arguments received",
                                                                         "  •"))]
    msg = lines[0] if lines else ""
    msg = msg.replace("\x1b[1m", "").replace("\x1b[0m", "")
    if "array(" in msg:  # never keep an array's repr
        msg = msg[:msg.index("array(")] + "array(...)"
    return {"error": type(exc).__name__, "message": msg[:300]}


def attempt(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recording what Keras raises is the point
        return error(exc)


def as_list(shape):
    return [None if n is None else int(n) for n in shape]


def empty_cases():
    out = []
    shapes_cl = [(0, 8, 8, 8, 3), (1, 8, 8, 0, 3), (1, 0, 8, 8, 3), (2, 8, 8, 8, 0)]
    configs = []
    for cls in ("Conv3D", "Conv3DTranspose"):
        for padding in ("valid", "same"):
            for strides in (1, 2):
                for shape in shapes_cl:
                    configs.append((cls, dict(filters=2, kernel_size=3, strides=strides,
                                              padding=padding), shape))
    configs += [
        ("Conv3DTranspose", dict(filters=2, kernel_size=3, padding="same"), (1, 32, 32, 0, 3)),
        ("Conv3DTranspose", dict(filters=2, kernel_size=3, strides=2, padding="same",
                                 output_padding=0), (1, 8, 8, 0, 3)),
        ("Conv3DTranspose", dict(filters=2, kernel_size=3, strides=2, padding="valid",
                                 output_padding=1), (1, 8, 8, 0, 3)),
        ("Conv3DTranspose", dict(filters=2, kernel_size=2, strides=2, padding="same",
                                 output_padding=0), (1, 1, 4, 4, 3)),
        ("Conv3DTranspose", dict(filters=4, kernel_size=3, padding="valid",
                                 activation="sigmoid"), (1, 4, 4, 0, 3)),
        ("Conv3DTranspose", dict(filters=4, kernel_size=3, padding="valid",
                                 activation="softmax"), (1, 4, 4, 0, 3)),
        ("Conv3D", dict(filters=2, kernel_size=3, padding="same", activation="sigmoid"),
         (0, 5, 5, 5, 3)),
    ]
    if not TF:  # the TensorFlow CPU kernels have no channels_first Conv3D
        configs += [
            ("Conv3D", dict(filters=2, kernel_size=3, padding="same",
                            data_format="channels_first"), (1, 3, 8, 0, 8)),
            ("Conv3DTranspose", dict(filters=2, kernel_size=3, strides=2, padding="valid",
                                     data_format="channels_first"), (1, 3, 8, 0, 8)),
        ]
    for cls, kwargs, shape in configs:
        kwargs = dict(kwargs, bias_initializer="ones")
        case = {"layer": cls, "kwargs": {k: v for k, v in kwargs.items()
                                         if k != "bias_initializer"},
                "input_shape": list(shape)}
        cos = attempt(lambda: as_list(getattr(L, cls)(**kwargs).compute_output_shape(shape)))
        case["compute_output_shape"] = cos
        negative = isinstance(cos, list) and any(n is not None and n < 0 for n in cos)
        if TF and (negative or (isinstance(cos, dict) and cls == "Conv3DTranspose")):
            # TensorFlow aborts the whole process on a negative output dim.
            case["call"] = {"skipped": "negative output dim: TensorFlow aborts"}
        else:
            def call():
                y = np.asarray(getattr(L, cls)(**kwargs)(np.zeros(shape, "float32")))
                return {"shape": list(y.shape), "dtype": str(y.dtype),
                        "sum": round(float(y.sum()), 4)}
            case["call"] = attempt(call)
        out.append(case)
        print(FLAVOUR, cls, kwargs, shape, cos, case["call"], file=sys.stderr)
    return out


ORDER_CASES = [
    # (class, kwargs) with two or more wrong arguments.
    ("Conv3D", dict(filters=0, kernel_size=(3, 3))),
    ("Conv3D", dict(filters=3, kernel_size=3, groups=2, strides=0)),
    ("Conv3D", dict(filters=2, kernel_size=3, groups=0, activation="nope")),
    ("Conv3D", dict(filters=2, kernel_size=3, strides=2, dilation_rate=2, groups=0)),
    ("Conv3D", dict(filters=0, kernel_size=3, bogus=1)),
    ("Conv3D", dict(filters=0, kernel_size=3, data_format="channels_middle")),
    ("Conv3D", dict(filters=0, kernel_size=3, kernel_regularizer="l3")),
    ("Conv3D", dict(filters=0, kernel_size=3, kernel_constraint=5)),
    ("Conv3D", dict(filters=3, kernel_size=3, groups=2, padding="full")),
    ("Conv3D", dict(filters=2, kernel_size=(3, 3), activity_regularizer="l3")),
    ("Conv3D", dict(filters=2, kernel_size=3, kernel_initializer="nope",
                    kernel_regularizer="l3")),
    ("Conv3D", dict(filters=2, kernel_size=3, strides=2, dilation_rate=2, output_padding=1)),
    ("Conv3DTranspose", dict(filters=0, kernel_size=3, output_padding=(1, 1))),
    ("Conv3DTranspose", dict(filters=2, kernel_size=3, output_padding=1, dilation_rate=2,
                             padding="full")),
    ("Conv3DTranspose", dict(filters=2, kernel_size=3, strides=(2, 1, 1), dilation_rate=2,
                             output_padding=(2, 0, 0))),
    ("Conv3DTranspose", dict(filters=0, kernel_size=3, strides=1, output_padding=1)),
    ("Conv3DTranspose", dict(filters=2, kernel_size=0, groups=2)),
]

BUILD_CASES = [
    # (kwargs, shape given to build(), shape given to a call)
    (dict(filters=4, kernel_size=3, groups=2), (8, 8, 8, 3)),
    (dict(filters=4, kernel_size=3, groups=2), (1, 2, 8, 8, 3)),
    (dict(filters=4, kernel_size=5, groups=2), (1, 2, 8, 8, 4)),
]


def order_cases():
    out = []
    for cls, kwargs in ORDER_CASES:
        res = attempt(lambda: getattr(L, cls)(**kwargs) and {"ok": True})
        out.append({"layer": cls, "kwargs": kwargs, "result": res})
    for kwargs, shape in BUILD_CASES:
        built = attempt(lambda: L.Conv3D(**kwargs).build(shape) or {"ok": True})
        called = attempt(lambda: L.Conv3D(**kwargs)(np.zeros(shape, "float32")) is None
                         or {"ok": True})
        out.append({"layer": "Conv3D", "kwargs": kwargs, "build_shape": list(shape),
                    "build": built, "call": called})
    return out


def weights_cases():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((3, 3, 3, 3, 2)).astype("float32")
    b = np.array([1.0, -2.0], "float32")
    x = rng.standard_normal((1, 5, 5, 5, 3)).astype("float32")
    cases = {}

    def run(layer, inputs=x):
        y = np.asarray(layer(inputs))
        w = layer.get_weights()
        return {"shape": list(y.shape), "kernel_equal": bool(np.array_equal(w[0], k)),
                "bias": [float(v) for v in w[1]] if len(w) > 1 else None}

    cases["init"] = attempt(lambda: run(L.Conv3D(2, 3, weights=[k, b])))
    cases["built_after_init"] = attempt(lambda: L.Conv3D(2, 3, weights=[k, b]).built)
    cases["weights_before_build"] = attempt(
        lambda: len(L.Conv3D(2, 3, weights=[k, b]).get_weights()))
    cases["with_input_shape"] = attempt(
        lambda: run(L.Conv3D(2, 3, weights=[k, b], input_shape=(5, 5, 5, 3))))
    cases["from_config"] = attempt(
        lambda: run(L.Conv3D.from_config({**L.Conv3D(2, 3).get_config(), "weights": [k, b]})))
    cases["in_get_config"] = attempt(
        lambda: "weights" in L.Conv3D(2, 3, weights=[k, b]).get_config())
    cases["wrong_count"] = attempt(lambda: run(L.Conv3D(2, 3, weights=[k])))
    cases["wrong_kernel"] = attempt(lambda: run(L.Conv3D(2, 3, weights=[k[:, :, :, :2], b])))
    cases["wrong_bias"] = attempt(lambda: run(L.Conv3D(2, 3, weights=[k, np.ones(3, "f4")])))
    cases["channels_mismatch"] = attempt(
        lambda: run(L.Conv3D(2, 3, weights=[k, b]), np.zeros((1, 5, 5, 5, 4), "f4")))
    cases["transpose"] = attempt(lambda: list(L.Conv3DTranspose(
        2, 3, weights=[np.zeros((3, 3, 3, 2, 4), "f4"), b])(np.ones((1, 4, 4, 4, 4), "f4")).shape))
    cases["batch_size"] = attempt(lambda: L.Conv3D(2, 3, batch_size=4).built)
    cases["batch_size_input_shape"] = attempt(lambda: as_list(L.Conv3D(
        2, 3, batch_size=4, input_shape=(5, 5, 5, 3)).get_config()["batch_input_shape"]))
    return cases


def constraint_cases():
    def clip(w):
        return keras.ops.clip(w, -0.1, 0.1)

    def cfg(**kw):
        return L.Conv3D(2, 3, **kw).get_config()

    cases = {}
    cases["function"] = attempt(lambda: cfg(kernel_constraint=clip)["kernel_constraint"])
    lam = attempt(lambda: cfg(kernel_constraint=lambda w: w)["kernel_constraint"])
    if isinstance(lam, dict) and "config" in lam:
        value = lam["config"]["value"]
        lam = {"class_name": lam["class_name"], "config_keys": sorted(lam["config"]),
               "value_len": len(value), "value_types": [type(v).__name__ for v in value]}
    cases["lambda"] = lam
    cases["kept"] = attempt(lambda: L.Conv3D(2, 3, kernel_constraint=clip).kernel_constraint
                            is clip)
    cases["class"] = attempt(lambda: type(L.Conv3D(
        2, 3, kernel_constraint=keras.constraints.NonNeg).kernel_constraint).__name__)
    cases["not_callable"] = attempt(lambda: L.Conv3D(2, 3, kernel_constraint=5) and None)
    cases["forward_unaffected"] = attempt(lambda: float(np.asarray(L.Conv3D(
        1, 1, kernel_constraint=lambda w: w * 0, kernel_initializer="ones", use_bias=False)(
        np.ones((1, 2, 2, 2, 1), "float32"))).sum()))
    cases["round_trip_function"] = attempt(
        lambda: L.Conv3D.from_config(cfg(kernel_constraint=clip)) and {"ok": True})
    return cases


def glu_cases():
    out = []
    for kwargs, shape in [
        (dict(filters=4, kernel_size=3), (1, 8, 8, 8, 2)),
        (dict(filters=3, kernel_size=3), (1, 8, 8, 8, 2)),
        (dict(filters=4, kernel_size=3, padding="same", data_format="channels_first"),
         (1, 2, 8, 8, 6)),
        (dict(filters=4, kernel_size=3, padding="same", data_format="channels_first"),
         (1, 2, 8, 8, 7)),
    ]:
        kwargs = dict(kwargs, activation="glu")
        if TF and kwargs.get("data_format") == "channels_first":
            continue
        layer = getattr(L, "Conv3D")(**kwargs)
        out.append({"kwargs": kwargs, "input_shape": list(shape),
                    "compute_output_shape": attempt(
                        lambda: as_list(layer.compute_output_shape(shape))),
                    "call": attempt(lambda: list(np.asarray(
                        getattr(L, "Conv3D")(**kwargs)(np.zeros(shape, "float32"))).shape))})
    return out


def main():
    section = {"keras_version": keras.__version__, "empty": empty_cases(),
               "weights": weights_cases(),
               "config_keys": {cls: sorted(getattr(L, cls)(2, 3).get_config())
                               for cls in ("Conv3D", "Conv3DTranspose")}}
    if not LEGACY:
        section.update(order=order_cases(), constraints=constraint_cases(),
                       glu=glu_cases())
    data = {}
    if os.path.exists(OUT):
        with open(OUT) as fh:
            data = json.load(fh)
    data[FLAVOUR] = section
    with open(OUT, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"wrote {FLAVOUR} to {os.path.normpath(OUT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
