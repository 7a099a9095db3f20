"""Outputs, shapes and losses against what real Keras 3 computed (tools/make_keras_fixtures.py).

No Keras needed: the fixtures are committed.
"""

import json
import os

import numpy as np
import pytest

from conftest import FIXTURES, assert_close
from conv3d_cli.layers import from_config

with open(os.path.join(FIXTURES, "keras3_golden.json")) as fh:
    GOLDEN = json.load(fh)
with np.load(os.path.join(FIXTURES, "keras3_golden.npz")) as _data:
    ARRAYS = {name: _data[name] for name in _data.files}
CASES = GOLDEN["cases"]


def make_layer(case):
    cfg = json.loads(json.dumps(case["layer"]))
    if case["post_activation"]:
        post = case["post_activation"]
        cfg["config"]["activation"] = {"class_name": post["name"], "config": post["args"]}
    layer = from_config(cfg)
    x = ARRAYS[case["name"] + "/x"]
    weights = [ARRAYS[f"{case['name']}/w{i}"] for i in range(case["n_weights"])]
    return layer, x, weights


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("method", ["direct", "fft"])
def test_output_matches_keras(case, method):
    layer, x, weights = make_layer(case)
    layer.set_weights(weights)
    y = layer(x, method=method)
    assert_close(y, ARRAYS[case["name"] + "/y"])
    # Tiles that do not line up with the kernel give the same numbers.
    if not layer.activation.axiswise or layer.data_format == "channels_last":
        chunked = layer(x, method=method, chunk_shape=(2, 3, 2))
        assert_close(chunked, ARRAYS[case["name"] + "/y"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_shape_params_and_losses_match_keras(case):
    layer, x, weights = make_layer(case)
    keras_in = x.shape if x.ndim == 5 else (int(np.prod(x.shape[:-4])),) + x.shape[-4:]
    assert list(layer.compute_output_shape(keras_in)) == case["compute_output_shape"]
    layer.set_weights(weights)
    assert layer.count_params() == sum(w.size for w in weights)
    layer(x)
    assert len(layer.losses) == len(case["losses"])
    for ours, theirs in zip(layer.losses, case["losses"]):
        assert ours == pytest.approx(theirs, rel=1e-4)


def test_fixture_covers_the_spec():
    names = {c["name"] for c in CASES}
    from conv3d_cli.layers.activations import NAMES
    acts = {c["name"][len("act_cl_"):] for c in CASES if c["name"].startswith("act_cl_")}
    assert set(NAMES) <= acts  # every Keras 3 activation name, aliases included
    assert any("groups" in n for n in names) and any("extended_batch" in n for n in names)
    assert any(c["layer"]["config"].get("output_padding") for c in CASES)
    assert {c["layer"]["config"]["data_format"] for c in CASES} == {
        "channels_last", "channels_first"}
