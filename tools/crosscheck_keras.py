"""Random configurations, computed by real Keras 3 and by conv3d, compared.

A development check beyond the committed fixtures (needs keras and jax):

    KERAS_BACKEND=jax python tools/crosscheck_keras.py [N] [seed]

Draws N random Conv3D / Conv3DTranspose configurations (every argument:
kernel sizes, strides or dilation, both paddings, output_padding, groups,
data formats, activations, extended batch dims), runs each through Keras and
through ``conv3d_cli`` (direct, FFT, Winograd where it applies, chunked,
two workers), and reports every mismatch beyond float32 rounding.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from conv3d_cli.layers import from_config  # noqa: E402
from conv3d_cli.layers.activations import NAMES  # noqa: E402


def random_case(rng):
    transpose = rng.random() < 0.45
    df = rng.choice(["channels_last", "channels_first"])
    k = tuple(int(v) for v in rng.integers(1, 5, 3))
    dilated = rng.random() < 0.3
    s = (1, 1, 1) if dilated else tuple(int(v) for v in rng.integers(1, 4, 3))
    d = tuple(int(v) for v in rng.integers(1, 3, 3)) if dilated else (1, 1, 1)
    padding = rng.choice(["valid", "same"])
    groups = 1
    c = int(rng.integers(1, 5))
    f = int(rng.integers(1, 6))
    if not transpose and rng.random() < 0.3:
        groups = int(rng.integers(1, 3))
        c, f = c * groups, f * groups
    if rng.random() < 0.15:  # many channels: the GEMM / Winograd paths
        c, f = c * 8, f * 8
    act = str(rng.choice([n for n in NAMES if n != "threshold"] + ["linear"] * 5))
    if act == "glu":
        f = f * 2
    kwargs = dict(filters=f, kernel_size=k, strides=s, dilation_rate=d, padding=padding,
                  data_format=df, activation=act, use_bias=bool(rng.random() < 0.8))
    if transpose:
        if rng.random() < 0.4:
            kwargs["output_padding"] = tuple(int(rng.integers(0, st)) for st in s)
    else:
        kwargs["groups"] = groups
    spatial = []
    for ax in range(3):
        ke = (k[ax] - 1) * d[ax] + 1
        spatial.append(int(rng.integers(max(ke, 1), ke + 7)))
    if act == "glu" and df == "channels_first":
        # glu halves W under channels_first: keep the output's W even
        spatial[2] += spatial[2] % 2
    batch = (int(rng.integers(1, 3)),)
    shape = batch + ((*spatial, c) if df == "channels_last" else (c, *spatial))
    return ("Conv3DTranspose" if transpose else "Conv3D"), kwargs, shape


def main(n=200, seed=0):
    rng = np.random.default_rng(seed)
    bad = 0
    for i in range(n):
        cls, kwargs, shape = random_case(rng)
        try:
            layer = getattr(keras.layers, cls)(**kwargs)
            x = rng.standard_normal(shape).astype(np.float32)
            layer.build(x.shape)
            weights = [rng.standard_normal(w.shape).astype(np.float32) * 0.3
                       for w in layer.get_weights()]
            layer.set_weights(weights)
            expected = np.asarray(layer(x))
        except Exception as exc:  # Keras refuses it: so must we
            try:
                ours = from_config(keras.layers.serialize(getattr(keras.layers, cls)(**kwargs)))
                ours(np.zeros(shape, np.float32))
                print(f"[{i}] Keras refused, conv3d accepted: {cls} {kwargs} {shape}: {exc}")
                bad += 1
            except ValueError:
                pass
            continue
        ours = from_config(keras.layers.serialize(layer))
        ours.set_weights(weights)
        scale = max(float(np.abs(expected).max()), 1e-6)
        methods = ["direct", "fft"]
        from conv3d_cli.engine.winograd import winograd_suits
        if winograd_suits(ours.job(x.shape)):
            methods.append("winograd")
        for method in methods:
            for kw in ({}, {"chunk_shape": (2, 3, 2)}, {"workers": 2, "chunk_shape": (3, 2, 4)}):
                if (kw.get("chunk_shape") and ours.activation.axiswise
                        and ours.data_format == "channels_first"):
                    continue
                y = ours(x, method=method, **kw)
                err = (float(np.abs(y - expected).max()) / scale
                       if y.shape == expected.shape else np.inf)
                if not err <= 1e-4:
                    bad += 1
                    print(f"[{i}] MISMATCH {method} {kw}: {cls} {kwargs} {shape}: "
                          f"shapes {y.shape} vs {expected.shape}, rel err {err:.2e}")
    print(f"{n} cases, {bad} mismatches")
    return bad


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    sys.exit(1 if main(*args) else 0)
