"""``conv3d export`` writes the archive Keras 3 writes, without Keras: compared with
one-layer models saved by Keras 3.15 itself (tools/make_keras_export_fixtures.py).

The layer is read from the Keras file and exported again; the two archives must
have the same members, the same config.json (but for what Keras adds for object
sharing), a metadata.json of the same form, and the same weights HDF5 layout
(groups, attributes, datasets and their shapes, dtypes and values).
"""

import json
import os
import re
import zipfile

import h5py
import pytest

from conftest import FIXTURES
from conv3d_cli.api import build_layer
from conv3d_cli.io.keras_export import KERAS_VERSION, export_keras

REFERENCES = os.path.join(FIXTURES, "keras_export")
NAMES = ["conv3d", "conv3d_transpose"]


def _without_sharing_ids(value):
    """Keras tags an object serialized more than once with ``shared_object_id`` (an
    id() of the saving process); loading does not need it for a single use."""
    if isinstance(value, dict):
        return {k: _without_sharing_ids(v) for k, v in value.items() if k != "shared_object_id"}
    if isinstance(value, list):
        return [_without_sharing_ids(v) for v in value]
    return value


def _h5_layout(path):
    """Every group and dataset: its attributes, and shape, dtype and values of datasets."""
    layout = {}
    with h5py.File(path, "r") as f:
        layout["/"] = ("group", dict(f.attrs))

        def visit(name, obj):
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                layout[name] = ("dataset", attrs, obj.shape, str(obj.dtype), obj[()].tolist())
            else:
                layout[name] = ("group", attrs)
        f.visititems(visit)
    return layout


def _archive(path, tmp_path, tag):
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, i.compress_type) for i in z.infolist()]
        config = json.loads(z.read("config.json"))
        metadata = json.loads(z.read("metadata.json"))
        weights = tmp_path / f"{tag}.weights.h5"
        weights.write_bytes(z.read("model.weights.h5"))
    return members, config, metadata, _h5_layout(weights)


@pytest.fixture(params=NAMES)
def archives(request, tmp_path):
    reference = os.path.join(REFERENCES, request.param + ".keras")
    layer = build_layer(weights=reference)
    ours = tmp_path / "ours.keras"
    export_keras(layer, ours, layer.input_channels)
    return _archive(reference, tmp_path, "keras"), _archive(ours, tmp_path, "ours")


def test_same_members_in_the_same_order(archives):
    (keras_members, *_), (our_members, *_) = archives
    assert our_members == keras_members


def test_same_config(archives):
    (_, keras_config, _, _), (_, our_config, _, _) = archives
    assert _without_sharing_ids(our_config) == _without_sharing_ids(keras_config)


def test_same_metadata_form(archives):
    (_, _, keras_meta, _), (_, _, our_meta, _) = archives
    assert set(our_meta) == set(keras_meta) == {"keras_version", "date_saved"}
    assert our_meta["keras_version"] == keras_meta["keras_version"] == KERAS_VERSION
    assert re.fullmatch(r"\d{4}-\d\d-\d\d@\d\d:\d\d:\d\d", our_meta["date_saved"])


def test_same_weights_layout_and_values(archives):
    (*_, keras_weights), (*_, our_weights) = archives
    assert our_weights == keras_weights
