"""One layer from a class name, a layer config, explicit arguments and weights.

``build_layer`` is what ``conv3d run``, ``shape`` and ``export`` build their
layer with. The pieces come in this order, each step in its own function:

1. the layer config: a ``--config`` JSON file or a dict (``get_config()`` or
   ``{"class_name", "config"}``);
2. the weights: a ``.npz``/``.npy``/NIfTI file, a Keras model file (which may
   bring the config and class too), a dict, or a named ``--kernel``;
3. the class: ``--layer``, else the config's or model file's, else inferred;
4. the arguments: the config, overridden by the explicit ones, completed by
   what the kernel's shape says (``filters``, ``kernel_size``, ``use_bias``),
   with ``seed`` given to the random initializers that have none;
5. the weights set through the layer's own ``set_weights``, which checks their
   shapes (the one place they are checked); here its message only gains the
   option or file they came from.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import ArgumentError, WeightsError
from .layers import conv as convmod

# A layer config is a few kilobytes; a larger --config file is not one.
MAX_CONFIG_BYTES = 16 << 20

# Bytes per weight while a random initializer fills a kernel: NumPy draws float64
# samples (8), makes a float64 temporary or two on the way (truncated normal:
# |x| and the scaled copy, 16) and casts to the layer's dtype (4 or 8).
INIT_BYTES_PER_WEIGHT = 32


@dataclass
class _Origin:
    """Where the layer's class and config come from, for error messages and the report."""

    class_name: str | None = None
    config: dict = field(default_factory=dict)
    keras2: bool = False
    where: str = "the config"    # how errors name the config ("--config", "the config")
    file: str | None = None      # the file the config came from, named in errors
    source: str | None = None    # why this class (the report's ``layer_class_source``)


def build_layer(layer=None, config=None, overrides=None, weights=None, seed=None,
                apply_constraints=False, layer_name=None, kernel=None, voxel_size=None,
                input_channels=None, memory_limit=None):
    """One layer from a class name, a config dict, explicit arguments and weights.

    ``overrides`` win over ``config``; ``weights`` (a dict with ``kernel`` and
    ``bias``, or a path) supply ``filters`` and ``kernel_size`` when neither
    gives them, and are checked against them otherwise. A Keras model file
    (``.keras``, ``.weights.h5``, legacy ``.h5``) as ``weights`` gives the
    layer's config too (``layer_name`` picks one of several). ``seed`` seeds the
    random initializers that have no seed of their own. A weights file whose
    arrays declare more than ``memory_limit`` bytes is refused before it is read.

    ``kernel`` names a kernel instead of ``weights`` (``"gauss:sigma=2mm"``,
    see :mod:`conv3d_cli.kernels`); lengths in mm or um need ``voxel_size``
    (D, H, W in mm, or a string such as ``"1,0.8,2.5"``), and each of the
    ``input_channels`` (default 1; or a function of the layer's data_format)
    is filtered on its own.
    """
    origin = _config_origin(config)
    _check_seed(seed)
    from_path = isinstance(weights, (str, os.PathLike))
    # what a weights file declares, or a named kernel makes, must fit the limit
    max_bytes = _parse_memory(memory_limit) if from_path or kernel is not None else None
    w, wlabel = _read_weights(origin, weights, layer, layer_name, kernel, max_bytes)
    _choose_class(origin, layer)
    named_kernel = (kernel, voxel_size, input_channels, max_bytes)
    lyr, w, named = _construct(origin, layer, overrides, w, wlabel, seed, named_kernel)
    if w is not None:
        _set_weights(lyr, w, wlabel, apply_constraints)
    lyr.layer_class_source = origin.source
    if named is not None:
        lyr.named_kernel = {"kernel": named.spec, **named.details}
    return lyr


# ------------------------------------------------------------------ config
def load_config_file(path):
    """A Keras layer config from JSON: ``get_config()`` or ``{"class_name", "config"}``."""
    from .io.paths import check_input_path
    where = f"--config {path}"
    check_input_path(path, where, ArgumentError)
    try:
        with open(path, "rb") as fh:
            text = fh.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ArgumentError(f"{where}: larger than {MAX_CONFIG_BYTES >> 20} MiB; "
                                "not a Keras layer config")
        data = json.loads(text.decode("utf-8"))
    except RecursionError:
        raise ArgumentError(f"{where}: nested too deeply to be a Keras layer config") from None
    except UnicodeDecodeError:
        raise ArgumentError(f"{where}: not valid JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise ArgumentError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    except ArgumentError:
        raise
    except ValueError as exc:
        raise ArgumentError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"{where}: expected a JSON object (a Keras layer config), "
                            f"got a JSON {_json_kind(data)}")
    if "class_name" in data and "config" in data and not isinstance(data["config"], dict):
        raise ArgumentError(f"{where}: its \"config\" is not a JSON object (a Keras layer config)")
    return convmod.split_serialized(data)


def _json_kind(value):
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _config_origin(config) -> _Origin:
    """The class name and config of ``config``: a path to a JSON file, a dict, or None."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        class_name, cfg = load_config_file(path)
        origin = _Origin(class_name, cfg, where="--config", file=f"--config {path}")
    elif isinstance(config, dict):
        origin = _Origin(*convmod.split_serialized(config))
    else:
        return _Origin()
    origin.keras2 = convmod.looks_like_keras2(origin.config) if origin.config else False
    if origin.class_name is not None:
        origin.source = f"class_name in {origin.where}"
    return origin


def infer_class(cfg, where="the config"):
    """(class name, why) for a bare ``get_config()`` dict, which names no class.

    Only Conv3DTranspose has ``output_padding`` (tf.keras 2 writes ``groups: 1``
    into its config too); only Conv3D has ``groups`` otherwise. Neither: Conv3D.
    """
    if "output_padding" in cfg:
        return "Conv3DTranspose", f"inferred from output_padding in {where}"
    if "groups" in cfg:
        return "Conv3D", f"inferred from groups in {where}"
    return "Conv3D", "default (Conv3D)"


def _choose_class(origin, layer):
    """``--layer`` wins (checked against the file's class later); else the file's; else inferred."""
    if layer is not None:
        origin.source = "--layer"
    elif origin.class_name is None:
        origin.class_name, origin.source = infer_class(origin.config, origin.where)


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ArgumentError(f"Invalid `seed`: {seed!r}. Expected an integer >= 0 (NumPy's "
                            "random generator takes non-negative seeds).")


def _parse_memory(memory_limit):
    from .engine.plan import parse_memory
    return parse_memory(memory_limit)


# ----------------------------------------------------------------- weights
def is_model_file(path) -> bool:
    low = os.fspath(path).lower()
    return low.endswith((".keras", ".h5", ".hdf5"))


def _from_model_file(path, layer_name, max_bytes):
    from .io.keras_files import ModelFile
    with ModelFile(path) as model:
        entry = model.find(layer_name)
        return entry, entry.load_weights(max_bytes)


def _read_weights(origin, weights, layer, layer_name, kernel, max_bytes):
    """(weights dict or None, how messages name them); a model file's config goes to ``origin``."""
    if not isinstance(weights, (str, os.PathLike)):
        return weights, "--weights" if kernel is None else f"--kernel {kernel}"
    label = f"--weights {os.fspath(weights)}"
    if not is_model_file(weights):
        if layer_name is not None:
            raise ArgumentError("--layer-name needs a Keras model or weights file "
                                "(.keras, .weights.h5, .h5) as --weights")
        from .weights import load_weights
        return load_weights(weights, max_bytes), label
    entry, w = _from_model_file(weights, layer_name, max_bytes)
    label = f"{label} (layer {entry.name})"
    _take_model_config(origin, entry, weights, layer, label)
    return w, label


def _take_model_config(origin, entry, path, layer, label):
    """A model file's layer config (a .keras or legacy .h5 has one; a .weights.h5 none)."""
    if entry.config is not None:
        if origin.class_name is not None or origin.config:
            raise ArgumentError(f"--config and a model file ({path}) both give the "
                                "layer's config; use one")
        origin.class_name, origin.config = entry.class_name, dict(entry.config)
        origin.keras2, origin.file = entry.keras2, label
        origin.source = f"the model file {path}"
    elif origin.class_name is None and layer is None:
        origin.class_name = entry.class_name
        origin.source = f"the model file {path}"


def _named_kernel_weights(cls, args, kernel, voxel_size, input_channels, max_bytes):
    """(weights dict, NamedKernel) of ``--kernel``; sets the arguments it fixes in ``args``."""
    from .kernels import layer_weights
    from .layers.args import standardize_data_format
    channels = input_channels or 1
    if callable(channels):
        channels = channels(standardize_data_format(args.get("data_format")))
    return layer_weights(kernel, args, cls is convmod.Conv3DTranspose, voxel_size, channels,
                         max_bytes)


def _arguments_from_weights(args, w, wlabel, cls):
    """``filters``, ``kernel_size`` and ``use_bias`` read off the kernel where not given."""
    kernel = np.asarray(w["kernel"])
    if kernel.ndim != 5:
        raise WeightsError(f"{wlabel}: the kernel must be 5-D (kd, kh, kw, in, out); "
                           f"got shape {kernel.shape}")
    f_axis = -1 if cls is convmod.Conv3D else -2  # filters axis of the kernel
    args.pop("weights", None)  # --weights wins over a config's initial weights
    args.setdefault("filters", int(kernel.shape[f_axis]))
    args.setdefault("kernel_size", tuple(int(n) for n in kernel.shape[:3]))
    args.setdefault("use_bias", w.get("bias") is not None)


def _set_weights(lyr, w, wlabel, apply_constraints):
    """Give ``lyr`` the weights ``w``; its ``set_weights`` checks them against its arguments."""
    kernel, bias = np.asarray(w["kernel"]), w.get("bias")
    try:
        lyr.set_weights([kernel] if bias is None else [kernel, bias])
    except WeightsError as exc:
        given = f"kernel {kernel.shape}, " + (
            "no 'bias'" if bias is None else f"bias {np.shape(bias)}")
        groups = f", groups={lyr.groups}" if lyr.groups != 1 else ""
        raise WeightsError(
            f"{wlabel}: {str(exc).rstrip('.')}. The layer has filters={lyr.filters}, "
            f"kernel_size={lyr.kernel_size}{groups}, use_bias={lyr.use_bias}; given: "
            f"{given}") from None
    if apply_constraints:
        lyr.apply_constraints()


# ------------------------------------------------------------------- layer
def _construct(origin, layer, overrides, w, wlabel, seed, named_kernel):
    """(layer, weights or None, NamedKernel or None); errors in a file's config name the file."""
    try:
        return _layer_from(origin, layer, overrides, w, wlabel, seed, named_kernel)
    except WeightsError:
        raise
    except ArgumentError as exc:
        if origin.file is None:
            raise
        raise ArgumentError(f"{exc} (in the layer config of {origin.file})") from None
    except (TypeError, AttributeError, ValueError) as exc:  # values of the wrong type in a file
        if origin.file is None:
            raise
        raise ArgumentError(f"{origin.file}: invalid layer config ({exc})") from None


def _layer_from(origin, layer, overrides, w, wlabel, seed, named_kernel):
    """The class, the config, the explicit arguments and the kernel's shape merged."""
    if layer is not None and origin.class_name is not None and \
            convmod.layer_class(layer) is not convmod.layer_class(origin.class_name):
        raise ArgumentError(f"--layer {layer} contradicts the file's class {origin.class_name}")
    cls = convmod.layer_class(layer or origin.class_name)
    args = {**origin.config, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    kernel, voxel_size, input_channels, max_bytes = named_kernel
    named = None
    if kernel is not None:  # a named kernel: the weights, and the arguments they fix
        if w is not None:
            raise ArgumentError("--kernel and --weights both give the kernel; use one")
        w, named = _named_kernel_weights(cls, args, kernel, voxel_size, input_channels,
                                         max_bytes)
    if w is not None:
        _arguments_from_weights(args, w, wlabel, cls)
    for key in ("filters", "kernel_size"):
        if args.get(key) is None:
            raise ArgumentError(f"`{key}` is required (give --{key.replace('_', '-')}, "
                                "--config or --weights)")
    if seed is not None:
        for key in ("kernel_initializer", "bias_initializer"):
            args[key] = _with_seed(args.get(key, "glorot_uniform" if key[0] == "k" else "zeros"),
                                   seed, key)
    return cls(**args, keras2=origin.keras2), w, named


def _with_seed(identifier, seed, argument):
    from .layers import initializers
    init = initializers.get(identifier, argument)
    if hasattr(init, "seed") and init.seed is None:
        config = init.get_config()
        config["seed"] = seed
        return type(init)(**config)
    return init


def check_kernel_fits(layer, input_channels, memory_limit=None):
    """Refuse, before anything is allocated, a kernel whose initialization alone
    would take more than ``memory_limit`` (``--filters 30000000`` is four bytes
    of typing and gigabytes of weights)."""
    if layer.built:
        return
    limit = _parse_memory(memory_limit)
    shape = layer.kernel_shape(input_channels)
    n = math.prod(shape) + layer.filters
    need = n * INIT_BYTES_PER_WEIGHT
    if need > limit:
        raise ArgumentError(
            f"the kernel {shape} (filters={layer.filters}, kernel_size={layer.kernel_size}, "
            f"{input_channels} input channels) has {n} weights and needs about "
            f"{need / (1 << 20):.0f} MiB to initialize, more than the memory limit of "
            f"{limit / (1 << 20):.0f} MiB (--memory-limit); give fewer --filters or a "
            "smaller --kernel-size")
