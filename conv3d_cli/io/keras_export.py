"""Write a layer as a one-layer Keras 3 model (``.keras``) that ``keras.models.load_model``
opens and that computes the same numbers.

The archive is what Keras 3's ``saving_lib`` writes for ``Sequential([Input,
layer])``: ``config.json``, ``metadata.json`` and ``model.weights.h5`` with the
kernel and bias at ``layers/<snake_case class>/vars/0`` and ``/1``.
"""

from __future__ import annotations

import datetime
import json
import os
import zipfile

import h5py

from ..errors import ArgumentError
from ..layers.args import BFLOAT16
from .keras_files import to_snake_case
from .tempfiles import StagedFile, temp_path

KERAS_VERSION = "3.15.1"  # the format written; checked against Keras 3.15


def export_keras(layer, path, input_channels, overwrite=True):
    """Write ``layer`` (built) as ``path`` (.keras), atomically.

    Without ``overwrite``, an existing ``path`` (also one another process
    made while this wrote) is never replaced."""
    path = os.fspath(path)
    if not path.lower().endswith(".keras"):
        raise ArgumentError(f"OUTPUT {path}: expected a .keras file name")
    act = layer.activation
    if act.kwargs or act.name == "custom":
        raise ArgumentError(f"activation {act.name} with arguments cannot be saved in a Keras "
                            "config (Keras serializes activations by name only)")
    if layer.keras2 and act.name == "hard_sigmoid":
        raise ArgumentError("this layer uses tf.keras 2's hard_sigmoid, which Keras 3 defines "
                            "differently: the exported model would compute other numbers")
    if not layer.built:
        raise ArgumentError("the layer has no weights yet (give --weights, or the input "
                            "channels with --input-channels / --input-shape)")
    spatial = [None, None, None]
    batch_shape = [None] + (spatial + [input_channels] if layer.data_format == "channels_last"
                            else [input_channels] + spatial)
    # As Keras writes a model built under the layer's policy: the model and the
    # layer carry the policy; the InputLayer's dtype is the one the layer casts
    # its inputs to.
    dtype = layer.dtype_policy.serialize()
    layer_cfg = {"module": "keras.layers", "class_name": layer.keras_name,
                 "config": _jsonable(layer.get_config()), "registered_name": None,
                 "build_config": {"input_shape": batch_shape}}
    config = {"module": "keras", "class_name": "Sequential", "config": {
        "name": "sequential", "trainable": True, "dtype": dtype,
        "layers": [{"module": "keras.layers", "class_name": "InputLayer", "config": {
            "batch_shape": batch_shape, "dtype": layer.compute_dtype, "sparse": False,
            "ragged": False,
            "name": "input_layer", "optional": False}, "registered_name": None}, layer_cfg],
        "build_input_shape": batch_shape}, "registered_name": None,
        "build_config": {"input_shape": batch_shape}, "compile_config": {}}
    meta = {"keras_version": KERAS_VERSION,
            "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")}
    staged = StagedFile(path, overwrite, f"OUTPUT {path}")
    weights = temp_path(os.path.dirname(os.path.abspath(path)), "model.weights.h5")
    try:
        with h5py.File(weights, "w") as f:
            group = f.create_group(f"layers/{to_snake_case(layer.keras_name)}/vars")
            group.attrs["name"] = layer.name
            for i, w in enumerate(layer.get_weights()):
                group.create_dataset(str(i), data=w)
                if w.dtype == BFLOAT16:  # as Keras 3 saves bfloat16 variables
                    group[str(i)].attrs["dtype"] = "bfloat16"
            f.create_group("vars").attrs["name"] = "sequential"
        with staged.open("wb") as fh, zipfile.ZipFile(fh, "w") as z:
            z.writestr("metadata.json", json.dumps(meta))
            z.writestr("config.json", json.dumps(config))
            z.write(weights, "model.weights.h5")
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    finally:
        if os.path.exists(weights):
            os.unlink(weights)


def _jsonable(value):
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value
