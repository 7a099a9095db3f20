"""``conv3d export``: a one-layer Keras model that Keras (when installed) and this tool load
to the same numbers."""

import os
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_close
from conv3d_cli.api import build_layer
from conv3d_cli.cli.main import cli

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "sample_data")
EXPORTS = [
    ["--weights", os.path.join(SAMPLE, "sobel3.npz"), "--padding", "same"],
    ["--layer", "Conv3DTranspose", "--filters", "4", "--kernel-size", "3", "--strides", "2",
     "--input-channels", "2", "--seed", "1", "--activation", "gelu", "--kernel-regularizer", "l2"],
    ["--filters", "4", "--kernel-size", "2,3,1", "--groups", "2", "--data-format",
     "channels_first", "--input-channels", "4", "--seed", "3", "--activation", "softmax"],
]


def _export(tmp_path, args):
    out = tmp_path / "m.keras"
    r = CliRunner().invoke(cli, ["export", str(out), *args])
    assert r.exit_code == 0, r.output
    return out


def _input(layer, rng):
    c = layer.input_channels
    return rng.standard_normal((2, 6, 7, 5, c) if layer.data_format == "channels_last"
                               else (2, c, 6, 7, 5)).astype(np.float32)


@pytest.mark.parametrize("args", EXPORTS)
def test_export_round_trips_through_the_reader(tmp_path, rng, args):
    out = _export(tmp_path, args)
    with zipfile.ZipFile(out) as z:
        assert set(z.namelist()) == {"config.json", "metadata.json", "model.weights.h5"}
    again = build_layer(weights=str(out))
    original = build_layer(**_build_args(args))
    strip = lambda c: {k: v for k, v in c.items() if k != "name"}  # noqa: E731 (auto names differ)
    assert strip(again.get_config()) == strip(original.get_config())
    for a, b in zip(again.get_weights(), original.get_weights()):
        np.testing.assert_array_equal(a, b)


def _build_args(args):
    """The same layer as the CLI builds from ``args`` (for comparison)."""
    opts = dict(zip(args[::2], args[1::2]))
    overrides = {}
    for key in ("filters", "groups"):
        if f"--{key}" in opts:
            overrides[key] = int(opts[f"--{key}"])
    for key in ("kernel_size", "strides"):
        if f"--{key.replace('_', '-')}" in opts:
            v = tuple(int(p) for p in opts[f"--{key.replace('_', '-')}"].split(","))
            overrides[key] = v[0] if len(v) == 1 else v
    for key in ("padding", "activation", "data_format", "kernel_regularizer"):
        if f"--{key.replace('_', '-')}" in opts:
            overrides[key] = opts[f"--{key.replace('_', '-')}"]
    layer = build_layer(layer=opts.get("--layer"), overrides=overrides,
                        weights=opts.get("--weights"),
                        seed=int(opts["--seed"]) if "--seed" in opts else None)
    if not layer.built:
        c = int(opts["--input-channels"])
        layer.build((None, None, None, None, c) if layer.data_format == "channels_last"
                    else (None, c, None, None, None))
    return {"config": {"class_name": layer.keras_name, "config": layer.get_config()},
            "weights": dict(zip(["kernel", "bias"], layer.get_weights() + [None]))}


@pytest.mark.parametrize("args", EXPORTS)
def test_keras_loads_the_export_and_computes_the_same(tmp_path, rng, args):
    keras = pytest.importorskip("keras", reason="Keras is not installed: the reader round trip "
                                                "above still checks the file")
    out = _export(tmp_path, args)
    model = keras.models.load_model(out)
    ours = build_layer(weights=str(out))
    x = _input(ours, rng)
    assert_close(ours(x), np.asarray(model(x)))


def test_export_errors(tmp_path):
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "m.keras"), "--filters", "2",
                                 "--kernel-size", "3"])
    assert r.exit_code != 0 and "--input-channels" in r.output
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "m.npz"), "--filters", "2",
                                 "--kernel-size", "3", "--input-channels", "1"])
    assert r.exit_code != 0 and "expected a .keras file name" in r.output
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "m.keras"), "--filters", "2",
                                 "--kernel-size", "3", "--input-channels", "1",
                                 "--activation", 'leaky_relu:{"negative_slope": 0.1}'])
    assert r.exit_code != 0 and "cannot be saved" in r.output
    assert not os.listdir(tmp_path)
