"""Conv3D / Conv3DTranspose layers and their weights from files Keras wrote.

- Keras 3 ``.keras``: a zip of ``config.json``, ``metadata.json`` and
  ``model.weights.h5``; weights at ``layers/<snake_case class>[_N]/vars/0``
  (kernel) and ``/1`` (bias), nested models nesting those paths
  (``keras/src/saving/saving_lib.py``); Keras >= 3.6 also records the layer
  name as the ``name`` attribute of each ``vars`` group.
- Keras 3 ``.weights.h5`` (``save_weights``): the same layout, no config.
- Legacy ``.h5`` (``model.save("x.h5")``, Keras 3 or tf.keras 2, or their
  weights-only ``save_weights``): ``model_config`` and ``keras_version``
  attributes, ``model_weights/<layer>`` groups whose ``weight_names``
  attribute lists the datasets (``conv/kernel:0`` in tf.keras 2,
  ``conv/kernel`` in Keras 3).

Nothing in a file is executed: configs are JSON read as data, only the two
convolution classes are built, zip members are checked (no path traversal,
bounded sizes), and HDF5 external links and virtual datasets are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..errors import WeightsError
from ..layers.args import BFLOAT16
from .tempfiles import remove_stale, temp_path

CONV_CLASSES = {"Conv3D": "Conv3D", "Convolution3D": "Conv3D",
                "Conv3DTranspose": "Conv3DTranspose",
                "Convolution3DTranspose": "Conv3DTranspose"}
MODEL_CLASSES = {"Functional", "Sequential", "Model"}
MAX_JSON_BYTES = 64 << 20
MAX_WEIGHTS_BYTES = 64 << 30
MAX_COMPRESSION_RATIO = 200


def to_snake_case(name: str) -> str:
    """Keras's ``naming.to_snake_case`` (``Conv3DTranspose`` -> ``conv3d_transpose``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


@dataclass
class LayerEntry:
    """One Conv3D / Conv3DTranspose layer found in a model file."""

    name: str                     # path of layer names: "encoder/conv3d_2"
    class_name: str | None        # "Conv3D", "Conv3DTranspose", None if the file does not say
    config: dict | None           # the layer's get_config(), None in a weights-only file
    keras2: bool
    _weights: tuple = field(repr=False, default=None)  # (h5 file path, dataset paths)

    def load_weights(self):
        """{"kernel": array, "bias": array or None} read from the file."""
        path, datasets = self._weights
        with _open_h5(path) as f:
            arrays = [_read_dataset(f, p, path) for p in datasets]
        if not arrays:
            raise WeightsError(f"{path}: layer {self.name} has no weights in the file")
        return {"kernel": arrays[0], "bias": arrays[1] if len(arrays) > 1 else None}


class ModelFile:
    """The convolution layers of a model or weights file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._temp = None
        self.layers: list[LayerEntry] = []
        self.kind = ""
        if not os.path.exists(self.path):
            raise WeightsError(f"{self.path}: no such file")
        try:
            if zipfile.is_zipfile(self.path):
                self._read_keras_zip()
            elif h5py.is_hdf5(self.path):
                self._read_h5(self.path)
            else:
                raise WeightsError(f"{self.path}: neither a Keras .keras archive nor an HDF5 file")
        except BaseException:  # no `with` block will close it: remove the unpacked weights now
            self.close()
            raise

    def close(self):
        if self._temp:
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------- selection
    def find(self, name=None) -> LayerEntry:
        if not self.layers:
            raise WeightsError(f"{self.path}: no Conv3D or Conv3DTranspose layer in the file")
        if name is None:
            if len(self.layers) > 1:
                raise WeightsError(
                    f"{self.path} holds {len(self.layers)} convolution layers; choose one with "
                    f"--layer-name: {', '.join(e.name for e in self.layers)}")
            return self.layers[0]
        matches = [e for e in self.layers if e.name == name] or \
            [e for e in self.layers if e.name.split("/")[-1] == name]
        if len(matches) != 1:
            what = "no" if not matches else "several"
            raise WeightsError(
                f"--layer-name {name}: {what} such layer in {self.path}; it holds: "
                f"{', '.join(e.name for e in self.layers)}")
        return matches[0]

    # -------------------------------------------------------------- .keras
    def _read_keras_zip(self):
        self.kind = "keras"
        try:
            with zipfile.ZipFile(self.path) as z:
                members = {i.filename: i for i in z.infolist()}
                for info in members.values():
                    name = info.filename
                    if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
                        raise WeightsError(f"{self.path}: unsafe path in archive: {name!r}")
                    if info.file_size > MAX_WEIGHTS_BYTES or (
                            info.compress_size and info.file_size > 1 << 20
                            and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO):
                        raise WeightsError(f"{self.path}: archive member {name} is too large "
                                           "or too compressed (zip bomb?)")
                for need in ("config.json", "model.weights.h5"):
                    if need not in members:
                        raise WeightsError(f"{self.path}: not a Keras archive (no {need})")
                config = _json(z, members["config.json"], self.path)
                meta = _json(z, members["metadata.json"], self.path) if "metadata.json" in members else {}
                folder = tempfile.gettempdir()
                remove_stale(folder)
                self._temp = temp_path(folder, "keras-" + os.path.basename(self.path))
                os.mkdir(self._temp, 0o700)
                weights = os.path.join(self._temp, "model.weights.h5")
                with z.open(members["model.weights.h5"]) as src, open(weights, "wb") as dst:
                    _copy_bounded(src, dst, MAX_WEIGHTS_BYTES, self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise WeightsError(f"{self.path}: corrupt or truncated Keras archive ({exc})") from None
        keras2 = str(meta.get("keras_version", "3")).startswith("2")
        self._from_config(config, weights, keras2, legacy=False)

    # ---------------------------------------------------------------- HDF5
    def _read_h5(self, path):
        with _open_h5(path) as f:
            attrs = dict(f.attrs)
            version = _text(attrs.get("keras_version", ""))
            keras2 = version.startswith("2")
            if "model_config" in attrs:
                self.kind = "legacy_h5"
                config = json.loads(_text(attrs["model_config"]))
                self._from_config(config, path, keras2, legacy=True)
            elif "layers" in f and isinstance(f["layers"], h5py.Group):
                self.kind = "weights_h5"
                self._from_weights_only(f, path)
            elif "layer_names" in attrs or "model_weights" in f:
                self.kind = "legacy_weights_h5"
                self._from_legacy_weights_only(f, path, keras2)
            else:
                raise WeightsError(f"{path}: an HDF5 file, but not one Keras wrote "
                                   "(no model_config, layers or layer_names)")

    def _from_config(self, config, weights_path, keras2, legacy):
        if legacy:
            with _open_h5(weights_path) as f:
                root = f["model_weights"] if "model_weights" in f else f
                index = {name: [_text(n) for n in root[name].attrs.get("weight_names", [])]
                         for name in root if isinstance(root[name], h5py.Group)}
                root_name = root.name
        for entry, path in _walk_config(config):
            if legacy:
                top = entry["path"][0]
                names = [n for n in index.get(top, [])
                         if _strip(n).split("/")[:-1][-1:] == [entry["path"][-1]]]
                datasets = [f"{root_name}/{top}/{n}".replace("//", "/") for n in names]
                datasets = _order_kernel_bias(datasets)
            else:
                datasets = [f"{path}/vars/0", f"{path}/vars/1"]
            self.layers.append(LayerEntry("/".join(entry["path"]), entry["class_name"],
                                          entry["config"], keras2, (weights_path, datasets)))
        if not legacy:
            # Keras >= 3.6 records each layer's name on its vars group: where it
            # does, that name decides; the class-name path is the fallback.
            with _open_h5(weights_path) as f:
                by_name = {}

                def visit(name, obj):
                    if isinstance(obj, h5py.Group) and name.endswith("vars") and "name" in obj.attrs:
                        by_name.setdefault(_text(obj.attrs["name"]), []).append("/" + name)
                f.visititems(visit)
                for e in self.layers:
                    found = by_name.get(e.name.split("/")[-1], [])
                    base = found[0] if len(found) == 1 else e._weights[1][0].rsplit("/", 1)[0]
                    e._weights = (weights_path, [d for d in (f"{base}/0", f"{base}/1") if d in f])

    def _from_weights_only(self, f, path):
        """Keras 3 .weights.h5 without a config: layers known by their vars' name."""
        def visit(name, obj):
            if isinstance(obj, h5py.Group) and name.endswith("/vars") and "0" in obj:
                kernel = obj["0"]
                if isinstance(kernel, h5py.Dataset) and kernel.ndim == 5:
                    cls = "Conv3DTranspose" if name.split("/")[-2].startswith("conv3d_transpose") else "Conv3D"
                    label = _text(obj.attrs.get("name", name[:-len("/vars")]))
                    datasets = [f"/{name}/0"] + ([f"/{name}/1"] if "1" in obj else [])
                    self.layers.append(LayerEntry(label, cls, None, False, (path, datasets)))
        f.visititems(visit)

    def _from_legacy_weights_only(self, f, path, keras2):
        root = f["model_weights"] if "model_weights" in f else f
        for top in root:
            group = root[top]
            if not isinstance(group, h5py.Group):
                continue
            names = [_text(n) for n in group.attrs.get("weight_names", [])]
            by_layer = {}
            for n in names:
                layer = "/".join(_strip(n).split("/")[:-1])
                by_layer.setdefault(layer, []).append(f"{group.name}/{n}")
            for layer, datasets in by_layer.items():
                datasets = _order_kernel_bias(datasets)
                shape = f[datasets[0]].shape if datasets and datasets[0] in f else ()
                if len(shape) == 5:  # the class is not recorded: --layer tells it
                    self.layers.append(LayerEntry(layer, None, None, keras2, (path, datasets)))


def _walk_config(config, prefix=(), weights_prefix=""):
    """Yield ({path, class_name, config}, weights path) for every convolution layer.

    The weights path follows saving_lib: a Functional model's ``layers`` (the
    InputLayer included) or a Sequential's (without it), each named by its
    snake_case class with ``_N`` for repeats."""
    if "class_name" not in config:
        raise WeightsError("model config without a class_name")
    cls = config["class_name"]
    cfg = config.get("config") or {}
    layers = cfg.get("layers") or []
    if cls == "Sequential":
        layers = [layer for layer in layers if layer.get("class_name") != "InputLayer"]
    used = {}
    for layer in layers:
        lcls = layer.get("class_name", "")
        lcfg = layer.get("config") or {}
        name = lcfg.get("name") or layer.get("name") or to_snake_case(lcls)
        snake = to_snake_case(lcls)
        n = used.get(snake, 0)
        used[snake] = n + 1
        wpath = f"{weights_prefix}/layers/{snake if n == 0 else f'{snake}_{n}'}"
        if lcls in CONV_CLASSES:
            yield ({"path": list(prefix) + [name], "class_name": CONV_CLASSES[lcls],
                    "config": lcfg}, wpath)
        elif lcls in MODEL_CLASSES or "layers" in lcfg:
            yield from _walk_config(layer, prefix + (name,), wpath)


def _order_kernel_bias(datasets):
    def key(d):
        leaf = _strip(d).split("/")[-1]
        return (0 if leaf.startswith("kernel") else 1 if leaf.startswith("bias") else 2, d)
    return sorted(datasets, key=key)


def _strip(name):
    return re.sub(r":\d+$", "", name)


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _json(z, info, path):
    if info.file_size > MAX_JSON_BYTES:
        raise WeightsError(f"{path}: {info.filename} is too large")
    try:
        return json.loads(z.read(info).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: {info.filename} is not valid JSON ({exc})") from None


def _copy_bounded(src, dst, limit, path):
    total = 0
    while True:
        chunk = src.read(16 << 20)
        if not chunk:
            return
        total += len(chunk)
        if total > limit:
            raise WeightsError(f"{path}: archive member is larger than {limit} bytes")
        dst.write(chunk)


def _open_h5(path):
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise WeightsError(f"{path}: not a readable HDF5 file ({exc})") from None


def _read_dataset(f, dataset, path):
    parent, _, leaf = dataset.rpartition("/")
    link = f[parent or "/"].get(leaf, getlink=True) if leaf else None
    if link is None:
        raise WeightsError(f"{path}: missing weights dataset {dataset}")
    if isinstance(link, (h5py.ExternalLink, h5py.SoftLink)):
        raise WeightsError(f"{path}: {dataset} is a link; links are not followed")
    obj = f[dataset]
    if not isinstance(obj, h5py.Dataset) or obj.is_virtual or obj.external:
        raise WeightsError(f"{path}: {dataset} is not a plain dataset")
    if obj.dtype.kind == "V" and obj.dtype.itemsize == 2 \
            and _text(obj.attrs.get("dtype", "")) == "bfloat16":
        # Keras 3 saves bfloat16 variables as opaque 2-byte values marked so.
        return np.asarray(obj[...]).view(BFLOAT16)
    if obj.dtype.kind not in "biuf":
        raise WeightsError(f"{path}: {dataset} does not hold real numbers ({obj.dtype})")
    return np.asarray(obj[...])
