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
bounded sizes, no encryption), HDF5 paths are resolved link by link (an
external link anywhere on a path, or a virtual dataset, is refused), and the
size a weights dataset declares is checked before it is read.
"""

from __future__ import annotations

import contextlib
import json
import lzma
import math
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..errors import WeightsError
from ..layers.args import BFLOAT16
from .hdf5 import check_plain_dataset, lookup, probe, resolve
from .paths import check_input_path
from .tempfiles import remove_stale, temp_path

CONV_CLASSES = {"Conv3D": "Conv3D", "Convolution3D": "Conv3D",
                "Conv3DTranspose": "Conv3DTranspose",
                "Convolution3DTranspose": "Conv3DTranspose"}
MODEL_CLASSES = {"Functional", "Sequential", "Model"}
MAX_JSON_BYTES = 64 << 20
MAX_WEIGHTS_BYTES = 64 << 30
MAX_COMPRESSION_RATIO = 200
# Models nested in models deeper than this are taken for a malicious config.
MAX_MODEL_DEPTH = 64
# What a .zip member or an HDF5 file can raise when it is corrupt.
CORRUPT = (OSError, EOFError, KeyError, RuntimeError, TypeError, zipfile.BadZipFile,
           zlib.error, lzma.LZMAError, NotImplementedError)


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
    # (h5 file path, dataset paths, the user's file as named in messages)
    _weights: tuple = field(repr=False, default=None)

    def load_weights(self, max_bytes=None):
        """{"kernel": array, "bias": array or None} read from the file.

        The datasets' declared sizes are checked against ``max_bytes`` first:
        a few compressed megabytes can declare gigabytes."""
        path, datasets, label = self._weights
        with _corrupt_is_an_error(label), _open_h5(path, label) as f:
            found = [_weights_dataset(f, p, label) for p in datasets]
            if not found:
                raise WeightsError(f"{label}: layer {self.name} has no weights in the file")
            declared = sum(_nbytes(ds) for _, ds in found)
            if max_bytes is not None and declared > max_bytes:
                shapes = " and ".join(f"{ds.shape} {ds.dtype}" for _, ds in found)
                raise WeightsError(
                    f"{label}: the weights of layer {self.name} ({shapes}) take "
                    f"{_mib(declared)}, more than the memory limit of {_mib(max_bytes)} "
                    "(--memory-limit)")
            arrays = [_read(ds, p, label) for p, ds in found]
        return {"kernel": arrays[0], "bias": arrays[1] if len(arrays) > 1 else None}

    def weight_shapes(self):
        """{"kernel": shape, "bias": shape or None}, read from the headers only."""
        path, datasets, label = self._weights
        with _corrupt_is_an_error(label), _open_h5(path, label) as f:
            shapes = [tuple(ds.shape) for _, ds in (_weights_dataset(f, p, label)
                                                    for p in datasets)]
        if not shapes:
            raise WeightsError(f"{label}: layer {self.name} has no weights in the file")
        return {"kernel": shapes[0], "bias": shapes[1] if len(shapes) > 1 else None}


class ModelFile:
    """The convolution layers of a model or weights file."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._temp = None
        self.layers: list[LayerEntry] = []
        self.kind = ""
        check_input_path(self.path, self.path, WeightsError)
        try:
            probe(lambda: _list_all(self.path), self.path, WeightsError)
        except WeightsError:  # the child was stopped: remove what it had unpacked
            remove_stale(tempfile.gettempdir())
            raise
        try:
            if zipfile.is_zipfile(self.path):
                self._read_keras_zip()
            elif h5py.is_hdf5(self.path):
                self._read_h5(self.path, self.path)
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
                    if info.flag_bits & 0x1:
                        raise WeightsError(f"{self.path}: archive member {name} is encrypted; "
                                           "Keras archives are not")
                    if info.file_size > MAX_WEIGHTS_BYTES or (
                            info.compress_size and info.file_size > 1 << 20
                            and info.file_size / info.compress_size > MAX_COMPRESSION_RATIO):
                        raise WeightsError(f"{self.path}: archive member {name} is too large "
                                           "or too compressed (zip bomb?)")
                for need in ("config.json", "model.weights.h5"):
                    if need not in members:
                        raise WeightsError(f"{self.path}: not a Keras archive (no {need})")
                config = _json(z, members["config.json"], self.path)
                meta = (_json(z, members["metadata.json"], self.path)
                        if "metadata.json" in members else {})
                folder = tempfile.gettempdir()
                remove_stale(folder)
                self._temp = temp_path(folder, "keras-" + os.path.basename(self.path))
                os.mkdir(self._temp, 0o700)
                weights = os.path.join(self._temp, "model.weights.h5")
                with z.open(members["model.weights.h5"]) as src, open(weights, "wb") as dst:
                    _copy_bounded(src, dst, MAX_WEIGHTS_BYTES, self.path)
        except WeightsError:
            raise
        except (*CORRUPT, ValueError) as exc:
            raise WeightsError(f"{self.path}: corrupt or truncated Keras archive ({exc})") from None
        if not isinstance(config, dict):
            raise WeightsError(f"{self.path}: config.json is not a JSON object "
                               "(a Keras model config)")
        version = meta.get("keras_version", "3") if isinstance(meta, dict) else "3"
        keras2 = str(version).startswith("2")
        label = f"{self.path} (its model.weights.h5)"
        if not h5py.is_hdf5(weights):
            raise WeightsError(f"{label}: not an HDF5 file")
        self._guarded(lambda: self._from_config(config, weights, keras2, legacy=False,
                                                label=label,
                                                config_label=f"{self.path} (config.json)"),
                      label)

    # ---------------------------------------------------------------- HDF5
    def _guarded(self, read, label):
        with _corrupt_is_an_error(label):
            return read()

    def _read_h5(self, path, label):
        self._guarded(lambda: self._read_h5_unguarded(path, label), label)

    def _read_h5_unguarded(self, path, label):
        with _open_h5(path, label) as f:
            attrs = f.attrs
            version = _text(attrs.get("keras_version", ""))
            keras2 = version.startswith("2")
            layers = lookup(f, "/layers", label, WeightsError)
            if "model_config" in attrs:
                self.kind = "legacy_h5"
                config = _parse_json(_text(attrs["model_config"]), f"{label}: model_config")
                if not isinstance(config, dict):
                    raise WeightsError(f"{label}: model_config is not a JSON object "
                                       "(a Keras model config)")
                self._from_config(config, path, keras2, legacy=True, label=label)
            elif layers is not None and isinstance(layers[1], h5py.Group):
                self.kind = "weights_h5"
                self._from_weights_only(f, path, label)
            elif "layer_names" in attrs or lookup(f, "/model_weights", label, WeightsError):
                self.kind = "legacy_weights_h5"
                self._from_legacy_weights_only(f, path, keras2, label)
            else:
                raise WeightsError(f"{label}: an HDF5 file, but not one Keras wrote "
                                   "(no model_config, layers or layer_names)")

    def _from_config(self, config, weights_path, keras2, legacy, label, config_label=None):
        if legacy:
            with _open_h5(weights_path, label) as f:
                root = _legacy_root(f, label)
                index = {name: [_text(n) for n in _names(group.attrs.get("weight_names", []))]
                         for name, group in _groups(f, root, label)}
        for entry, path in _walk_config(config, config_label or label):
            if legacy:
                top = entry["path"][0]
                names = [n for n in index.get(top, [])
                         if _strip(n).split("/")[:-1][-1:] == [entry["path"][-1]]]
                datasets = [f"{root}/{top}/{n}".replace("//", "/") for n in names]
                datasets = _order_kernel_bias(datasets)
            else:
                datasets = [f"{path}/vars/0", f"{path}/vars/1"]
            self.layers.append(LayerEntry("/".join(entry["path"]), entry["class_name"],
                                          entry["config"], keras2,
                                          (weights_path, datasets, label)))
        if not legacy:
            # Keras >= 3.6 records each layer's name on its vars group: where it
            # does, that name decides; the class-name path is the fallback.
            with _open_h5(weights_path, label) as f:
                by_name = {}

                def visit(name, obj):  # objects reached through hard links only
                    if (isinstance(obj, h5py.Group) and name.endswith("vars")
                            and "name" in obj.attrs):
                        by_name.setdefault(_text(obj.attrs["name"]), []).append("/" + name)
                f.visititems(visit)
                for e in self.layers:
                    found = by_name.get(e.name.split("/")[-1], [])
                    base = found[0] if len(found) == 1 else e._weights[1][0].rsplit("/", 1)[0]
                    e._weights = (weights_path, [d for d in (f"{base}/0", f"{base}/1")
                                                 if _listed(f, d, label)], label)

    def _from_weights_only(self, f, path, label):
        """Keras 3 .weights.h5 without a config: layers known by their vars' name."""
        def visit(name, obj):  # objects reached through hard links only
            if isinstance(obj, h5py.Group) and name.endswith("/vars") and "0" in obj:
                kernel = lookup(f, f"/{name}/0", label, WeightsError)
                if kernel is not None and isinstance(kernel[1], h5py.Dataset) \
                        and kernel[1].ndim == 5:
                    transpose = name.split("/")[-2].startswith("conv3d_transpose")
                    cls = "Conv3DTranspose" if transpose else "Conv3D"
                    layer = _text(obj.attrs.get("name", name[:-len("/vars")]))
                    datasets = [f"/{name}/0"] + ([f"/{name}/1"] if "1" in obj else [])
                    self.layers.append(LayerEntry(layer, cls, None, False,
                                                  (path, datasets, label)))
        f.visititems(visit)

    def _from_legacy_weights_only(self, f, path, keras2, label):
        root = _legacy_root(f, label)
        for top, group in _groups(f, root, label):
            names = [_text(n) for n in _names(group.attrs.get("weight_names", []))]
            by_layer = {}
            for n in names:
                layer = "/".join(_strip(n).split("/")[:-1])
                by_layer.setdefault(layer, []).append(f"{group.name}/{n}")
            for layer, datasets in by_layer.items():
                datasets = _order_kernel_bias(datasets)
                found = lookup(f, datasets[0], label, WeightsError) if datasets else None
                shape = found[1].shape if found and isinstance(found[1], h5py.Dataset) else ()
                # the class is not recorded: --layer tells it
                if shape is not None and len(shape) == 5:
                    self.layers.append(LayerEntry(layer, None, None, keras2,
                                                  (path, datasets, label)))


@contextlib.contextmanager
def _corrupt_is_an_error(label):
    """Errors h5py raises on a corrupt file (KeyError, RuntimeError, OSError...)
    become one WeightsError naming the user's file."""
    try:
        yield
    except WeightsError:
        raise
    except (*CORRUPT, ValueError, AttributeError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise WeightsError(f"{label}: corrupt HDF5 file ({reason})") from None


def _list_all(path):
    """Everything the readers do with a model file's structure (the probe's work)."""
    with ModelFile(path) as model:
        for entry in model.layers:
            entry.weight_shapes()


def _listed(f, path, label):
    """Whether ``path`` is there to be read; a refused link is kept, so that
    reading this layer (not listing the file) reports it."""
    try:
        return lookup(f, path, label, WeightsError) is not None
    except WeightsError:
        return True


def _legacy_root(f, label):
    """Path of the group holding a legacy file's layer groups."""
    found = lookup(f, "/model_weights", label, WeightsError)
    return found[0] if found is not None and isinstance(found[1], h5py.Group) else "/"


def _groups(f, root, label):
    """(name, group) of the groups directly under ``root``, links checked."""
    for name in f[root]:
        found = lookup(f, f"{root.rstrip('/')}/{name}", label, WeightsError)
        if found is not None and isinstance(found[1], h5py.Group):
            yield name, found[1]


def _names(value):
    """An attribute holding a list of names (an array, or one string)."""
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _walk_config(config, label, prefix=(), weights_prefix=""):
    """Yield ({path, class_name, config}, weights path) for every convolution layer.

    The weights path follows saving_lib: a Functional model's ``layers`` (the
    InputLayer included) or a Sequential's (without it), each named by its
    snake_case class with ``_N`` for repeats. ``label`` names the file in errors."""
    where = "/".join(prefix) or "the model"
    if len(prefix) > MAX_MODEL_DEPTH:
        raise WeightsError(f"{label}: models nested more than {MAX_MODEL_DEPTH} deep")
    if not isinstance(config, dict) or "class_name" not in config:
        raise WeightsError(f"{label}: the config of {where} is not a Keras object "
                           "(a JSON object with a class_name)")
    cls = config["class_name"]
    cfg = _object(config.get("config"), label, where)
    layers = cfg.get("layers") or []
    if not isinstance(layers, list):
        raise WeightsError(f"{label}: the layers of {where} are not a JSON list")
    for layer in layers:
        if not isinstance(layer, dict):
            raise WeightsError(f"{label}: a layer of {where} is not a JSON object")
    if cls == "Sequential":
        layers = [layer for layer in layers if layer.get("class_name") != "InputLayer"]
    used = {}
    for layer in layers:
        lcls = layer.get("class_name", "")
        lcls = lcls if isinstance(lcls, str) else ""
        lcfg = _object(layer.get("config"), label, where)
        name = lcfg.get("name") or layer.get("name") or to_snake_case(lcls)
        name = name if isinstance(name, str) else str(name)
        snake = to_snake_case(lcls)
        n = used.get(snake, 0)
        used[snake] = n + 1
        wpath = f"{weights_prefix}/layers/{snake if n == 0 else f'{snake}_{n}'}"
        if lcls in CONV_CLASSES:
            yield ({"path": list(prefix) + [name], "class_name": CONV_CLASSES[lcls],
                    "config": lcfg}, wpath)
        elif lcls in MODEL_CLASSES or "layers" in lcfg:
            yield from _walk_config(layer, label, prefix + (name,), wpath)


def _object(value, label, where):
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise WeightsError(f"{label}: a layer config in {where} is not a JSON object")
    return value


def _order_kernel_bias(datasets):
    def key(d):
        leaf = _strip(d).split("/")[-1]
        return (0 if leaf.startswith("kernel") else 1 if leaf.startswith("bias") else 2, d)
    return sorted(datasets, key=key)


def _strip(name):
    return re.sub(r":\d+$", "", name)


def _text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_json(text, where):
    try:
        return json.loads(text)
    except RecursionError:
        raise WeightsError(f"{where} is nested too deeply to be a Keras config") from None
    except ValueError as exc:
        raise WeightsError(f"{where} is not valid JSON ({exc})") from None


def _json(z, info, path):
    if info.file_size > MAX_JSON_BYTES:
        raise WeightsError(f"{path}: {info.filename} is too large")
    try:
        text = z.read(info).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightsError(f"{path}: {info.filename} is not valid JSON ({exc})") from None
    return _parse_json(text, f"{path}: {info.filename}")


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


def _open_h5(path, label):
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{label}: not a readable HDF5 file ({exc})") from None


def _weights_dataset(f, dataset, label):
    """(path, dataset) of a weights dataset, every link on its path checked."""
    hard, obj = resolve(f, dataset, label, WeightsError, what="weights dataset")
    check_plain_dataset(obj, f"{label}: {dataset}", WeightsError)
    if _is_bfloat16(obj):
        return hard, obj
    if obj.dtype.kind not in "biuf":
        raise WeightsError(f"{label}: {dataset} does not hold real numbers ({obj.dtype})")
    return hard, obj


def _nbytes(ds):
    return math.prod(ds.shape) * ds.dtype.itemsize


def _is_bfloat16(ds):
    """Keras 3 saves bfloat16 variables as opaque 2-byte values marked so."""
    return ds.dtype.kind == "V" and ds.dtype.itemsize == 2 \
        and _text(ds.attrs.get("dtype", "")) == "bfloat16"


def _read(ds, dataset, label):
    try:
        data = np.asarray(ds[...])
    except (OSError, KeyError, RuntimeError) as exc:
        raise WeightsError(f"{label}: cannot read {dataset} ({exc})") from None
    return data.view(BFLOAT16) if _is_bfloat16(ds) else data


def _mib(n):
    return f"{n / (1 << 20):.0f} MiB"
