"""Layers read from files written by Keras 3 and tf.keras 2 compute what Keras computed.

The files and Keras's outputs are committed (tools/make_keras_model_fixtures.py);
Keras is not needed here.
"""

import json
import os
import zipfile

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import FIXTURES, assert_close
from conv3d_cli.api import build_layer
from conv3d_cli.cli.main import cli
from conv3d_cli.errors import WeightsError
from conv3d_cli.io.keras_files import ModelFile, to_snake_case

MODELS = os.path.join(FIXTURES, "models")
NAMES = ["encoder/enc_a", "encoder/enc_b", "up", "head"]
FILES = [("keras3", "keras3.keras"), ("keras3", "keras3.h5"), ("keras2", "keras2.h5")]


def outputs(flavour):
    with np.load(os.path.join(MODELS, f"{flavour}_outputs.npz")) as data:
        return {name: data[name] for name in data.files}


@pytest.mark.parametrize("flavour,filename", FILES)
def test_model_files_list_their_layers(flavour, filename):
    with ModelFile(os.path.join(MODELS, filename)) as model:
        assert [e.name for e in model.layers] == NAMES
        assert [e.class_name for e in model.layers] == [
            "Conv3D", "Conv3D", "Conv3DTranspose", "Conv3D"]
        assert all(e.keras2 == (flavour == "keras2") for e in model.layers)


@pytest.mark.parametrize("flavour,filename", FILES)
@pytest.mark.parametrize("name", NAMES)
def test_layer_from_model_file_matches_keras(flavour, filename, name):
    data = outputs(flavour)
    layer = build_layer(weights=os.path.join(MODELS, filename), layer_name=name)
    assert layer.keras2 == (flavour == "keras2")
    assert_close(layer(data[name + "/x"]), data[name + "/y"])


def test_keras2_hard_sigmoid_is_keras2s():
    layer = build_layer(weights=os.path.join(MODELS, "keras2.h5"), layer_name="enc_b")
    assert layer.activation.name == "hard_sigmoid" and layer.keras2
    x = np.array([-2.0, 0.5, 2.0], np.float32)
    assert_close(layer.activation(x), np.clip(0.2 * x + 0.5, 0, 1))


@pytest.mark.parametrize("flavour,filename,layer_name,options", [
    ("keras3", "keras3.weights.h5", "up", dict(layer="Conv3DTranspose", overrides=dict(
        kernel_size=3, strides=2, padding="same", activation="tanh"))),
    ("keras3", "keras3.weights.h5", "head", dict(overrides=dict(use_bias=False))),
    ("keras2", "keras2_weights.h5", "enc_a",
     dict(overrides=dict(padding="same", activation="relu"))),
    ("keras2", "keras2_weights.h5", "up", dict(layer="Conv3DTranspose", overrides=dict(
        strides=2, padding="same", activation="tanh"))),
])
def test_weights_only_files_with_options(flavour, filename, layer_name, options):
    data = outputs(flavour)
    full = {"enc_a": "encoder/enc_a"}.get(layer_name, layer_name)
    layer = build_layer(weights=os.path.join(MODELS, filename), layer_name=layer_name, **options)
    assert_close(layer(data[full + "/x"]), data[full + "/y"])


def test_options_override_and_are_checked(tmp_path):
    path = os.path.join(MODELS, "keras3.keras")
    layer = build_layer(weights=path, layer_name="up", overrides={"activation": "linear"})
    assert layer.activation.name == "linear" and layer.strides == (2, 2, 2)
    with pytest.raises(WeightsError, match="filters=5"):
        build_layer(weights=path, layer_name="up", overrides={"filters": 5})
    with pytest.raises(ValueError, match="contradicts"):
        build_layer(weights=path, layer_name="up", layer="Conv3D")


def test_several_layers_need_a_name_and_unknown_names_list_them():
    path = os.path.join(MODELS, "keras3.keras")
    with pytest.raises(WeightsError, match="choose one with --layer-name: "
                                           "encoder/enc_a, encoder/enc_b, up, head"):
        build_layer(weights=path)
    with pytest.raises(WeightsError, match="--layer-name nope: no such layer"):
        build_layer(weights=path, layer_name="nope")


def test_cli_run_and_layers(tmp_path):
    data = outputs("keras3")
    np.save(tmp_path / "x.npy", data["up/x"])
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                                 "--weights", os.path.join(MODELS, "keras3.keras"),
                                 "--layer-name", "up", "-q"])
    assert r.exit_code == 0, r.output
    assert_close(np.load(tmp_path / "y.npy"), data["up/y"])
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "x.npy"), str(tmp_path / "z.npy"),
                                 "--weights", os.path.join(MODELS, "keras3.keras")])
    assert r.exit_code != 0 and "--layer-name" in r.output and not (tmp_path / "z.npy").exists()
    r = CliRunner().invoke(cli, ["layers", os.path.join(MODELS, "keras2.h5"), "--json"])
    rows = json.loads(r.output)
    assert [row["name"] for row in rows] == NAMES
    assert rows[2]["kernel_shape"] == [3, 3, 3, 3, 4] and rows[2]["strides"] == [2, 2, 2]
    assert rows[1]["activation"] == "hard_sigmoid" and rows[3]["params"] == 6


def test_snake_case_matches_keras():
    assert to_snake_case("Conv3DTranspose") == "conv3d_transpose"
    assert to_snake_case("Conv3D") == "conv3d" and to_snake_case("InputLayer") == "input_layer"


def test_unsafe_and_broken_files(tmp_path):
    src = os.path.join(MODELS, "keras3.keras")
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(tmp_path / "evil.keras", "w") as out:
        for info in z.infolist():
            out.writestr(info, z.read(info))
        out.writestr("../escape.txt", "x")
    with pytest.raises(WeightsError, match="unsafe path"):
        ModelFile(tmp_path / "evil.keras")
    with open(src, "rb") as fh:
        data = fh.read()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        ModelFile(tmp_path / "cut.keras")
    with zipfile.ZipFile(tmp_path / "bomb.keras", "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("config.json", "{}")
        out.writestr("model.weights.h5", b"\0" * (64 << 20))
    with pytest.raises(WeightsError, match="zip bomb"):
        ModelFile(tmp_path / "bomb.keras")
    with h5py.File(tmp_path / "link.weights.h5", "w") as f:
        f.create_group("layers/conv3d/vars")
        f["layers/conv3d/vars/0"] = np.zeros((3, 3, 3, 1, 1), np.float32)
        f["layers/conv3d/vars/1"] = h5py.ExternalLink("other.h5", "/bias")
    model = ModelFile(tmp_path / "link.weights.h5")
    with pytest.raises(WeightsError, match="links are not followed"):
        model.layers[0].load_weights()
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["data"] = np.zeros(3)
    with pytest.raises(WeightsError, match="not one Keras wrote"):
        ModelFile(tmp_path / "plain.h5")
    (tmp_path / "junk.keras").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="neither a Keras .keras archive nor an HDF5 file"):
        ModelFile(tmp_path / "junk.keras")


def test_model_without_convolutions(tmp_path):
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "Dense", "config": {"name": "d", "units": 2}},
        {"class_name": "Lambda", "config": {"name": "l", "function": "evil"}}]}}
    with zipfile.ZipFile(tmp_path / "dense.keras", "w") as z:
        z.writestr("config.json", json.dumps(config))
        z.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        with h5py.File(tmp_path / "w.h5", "w"):
            pass
        z.write(tmp_path / "w.h5", "model.weights.h5")
    with pytest.raises(WeightsError, match="no Conv3D or Conv3DTranspose layer"):
        build_layer(weights=str(tmp_path / "dense.keras"))
