"""The library behind the CLI: build a layer from arguments, apply it to a file.

``build_layer`` merges a Keras layer config, explicit arguments and a
weights file into one layer; ``apply_to_file`` runs it over a volume file
into an output file; ``describe`` is ``conv3d shape`` without printing.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from .apply import apply_to_file, describe  # noqa: F401  (running a layer over a file)
from .errors import ArgumentError, WeightsError
from .layers import conv as convmod
from .weights import load_weights


# A layer config is a few kilobytes; a larger --config file is not one.
MAX_CONFIG_BYTES = 16 << 20


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


def is_model_file(path) -> bool:
    low = os.fspath(path).lower()
    return low.endswith((".keras", ".h5", ".hdf5"))


def _from_model_file(path, layer_name, max_bytes):
    from .io.keras_files import ModelFile
    with ModelFile(path) as model:
        entry = model.find(layer_name)
        return entry, entry.load_weights(max_bytes)


# Bytes per weight while a random initializer fills a kernel: NumPy draws float64
# samples (8), makes a float64 temporary or two on the way (truncated normal:
# |x| and the scaled copy, 16) and casts to the layer's dtype (4 or 8).
INIT_BYTES_PER_WEIGHT = 32


def check_kernel_fits(layer, input_channels, memory_limit=None):
    """Refuse, before anything is allocated, a kernel whose initialization alone
    would take more than ``memory_limit`` (``--filters 30000000`` is four bytes
    of typing and gigabytes of weights)."""
    if layer.built:
        return
    from .engine.plan import parse_memory
    limit = parse_memory(memory_limit)
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
    from .engine.plan import parse_memory
    class_name, cfg = (None, {})
    config_file = None  # the file the layer config came from, named in errors
    from_file = isinstance(config, (str, os.PathLike))
    where = "--config" if from_file else "the config"
    if from_file:
        class_name, cfg = load_config_file(os.fspath(config))
        config_file = f"--config {os.fspath(config)}"
    elif isinstance(config, dict):
        class_name, cfg = convmod.split_serialized(config)
    source = f"class_name in {where}" if class_name is not None else None
    keras2 = convmod.looks_like_keras2(cfg) if cfg else False
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ArgumentError(f"Invalid `seed`: {seed!r}. Expected an integer >= 0 (NumPy's "
                            "random generator takes non-negative seeds).")
    w = weights
    wlabel = "--weights" if kernel is None else f"--kernel {kernel}"
    from_path = isinstance(weights, (str, os.PathLike))
    # what a weights file declares, or a named kernel makes, must fit the limit
    max_bytes = parse_memory(memory_limit) if from_path or kernel is not None else None
    if from_path:
        wlabel = f"--weights {os.fspath(weights)}"
        if is_model_file(weights):
            entry, w = _from_model_file(weights, layer_name, max_bytes)
            wlabel = f"--weights {os.fspath(weights)} (layer {entry.name})"
            if entry.config is not None:
                if class_name is not None or cfg:
                    raise ArgumentError(f"--config and a model file ({weights}) both give the "
                                        "layer's config; use one")
                class_name, cfg, keras2 = entry.class_name, dict(entry.config), entry.keras2
                config_file = wlabel
                source = f"the model file {weights}"
            elif class_name is None and layer is None:
                class_name = entry.class_name
                source = f"the model file {weights}"
        else:
            if layer_name is not None:
                raise ArgumentError("--layer-name needs a Keras model or weights file "
                                    "(.keras, .weights.h5, .h5) as --weights")
            w = load_weights(weights, max_bytes)
    if layer is not None:
        source = "--layer"
    elif class_name is None:
        class_name, source = infer_class(cfg, where)
    try:
        lyr, w, named = _layer_from(layer, class_name, cfg, overrides, w, wlabel, seed, keras2,
                                    kernel, voxel_size, input_channels, max_bytes)
    except WeightsError:
        raise
    except ArgumentError as exc:
        if config_file is None:
            raise
        raise ArgumentError(f"{exc} (in the layer config of {config_file})") from None
    except (TypeError, AttributeError, ValueError) as exc:  # values of the wrong type in a file
        if config_file is None:
            raise
        raise ArgumentError(f"{config_file}: invalid layer config ({exc})") from None
    if w is not None:
        _set_weights(lyr, w, wlabel, apply_constraints)
    lyr.layer_class_source = source
    if named is not None:
        lyr.named_kernel = {"kernel": named.spec, **named.details}
    return lyr


def _layer_from(layer, class_name, cfg, overrides, w, wlabel, seed, keras2, kernel=None,
                voxel_size=None, input_channels=None, max_bytes=None):
    """(layer, weights or None, NamedKernel or None): the class, arguments, a named
    kernel and the weights' shape merged."""
    if layer is not None and class_name is not None and \
            convmod.layer_class(layer) is not convmod.layer_class(class_name):
        raise ArgumentError(f"--layer {layer} contradicts the file's class {class_name}")
    cls = convmod.layer_class(layer or class_name)
    args = {**cfg, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    named = None
    if kernel is not None:  # a named kernel: the weights, and the arguments they fix
        if w is not None:
            raise ArgumentError("--kernel and --weights both give the kernel; use one")
        from .kernels import layer_weights
        from .layers.args import standardize_data_format
        channels = input_channels or 1
        if callable(channels):
            channels = channels(standardize_data_format(args.get("data_format")))
        w, named = layer_weights(kernel, args, cls is convmod.Conv3DTranspose, voxel_size,
                                 channels, max_bytes)
    if w is not None:
        args.pop("weights", None)  # --weights wins over a config's initial weights
    f_axis = -1 if cls is convmod.Conv3D else -2  # filters axis of the kernel
    if w is not None:
        kernel = np.asarray(w["kernel"])
        if kernel.ndim != 5:
            raise WeightsError(f"{wlabel}: the kernel must be 5-D (kd, kh, kw, in, out); "
                               f"got shape {kernel.shape}")
        args.setdefault("filters", int(kernel.shape[f_axis]))
        args.setdefault("kernel_size", tuple(int(n) for n in kernel.shape[:3]))
        if "use_bias" not in args:
            args["use_bias"] = w.get("bias") is not None
    for key in ("filters", "kernel_size"):
        if args.get(key) is None:
            raise ArgumentError(f"`{key}` is required (give --{key.replace('_', '-')}, "
                                "--config or --weights)")
    if seed is not None:
        for key in ("kernel_initializer", "bias_initializer"):
            args[key] = _with_seed(args.get(key, "glorot_uniform" if key[0] == "k" else "zeros"),
                                   seed, key)
    return cls(**args, keras2=keras2), w, named


def _set_weights(lyr, w, wlabel, apply_constraints):
    """Give ``lyr`` the weights ``w`` after checking them against its arguments."""
    kernel = np.asarray(w["kernel"])
    f_axis = -1 if isinstance(lyr, convmod.Conv3D) else -2  # filters axis of the kernel
    want = lyr.kernel_size
    if tuple(kernel.shape[:3]) != want:
        raise WeightsError(f"{wlabel}: kernel spatial shape {kernel.shape[:3]} does not "
                           f"match kernel_size {want}")
    if kernel.shape[f_axis] != lyr.filters:
        raise WeightsError(f"{wlabel}: kernel shape {kernel.shape} does not have "
                           f"filters={lyr.filters} on its output axis")
    bias = w.get("bias")
    if lyr.use_bias and bias is None:
        raise WeightsError(f"{wlabel}: the layer uses a bias (use_bias=True) but the "
                           "file has no 'bias' array; pass --no-use-bias or add it")
    if not lyr.use_bias and bias is not None:
        raise WeightsError(f"{wlabel}: the file has a 'bias' array but use_bias=False")
    try:
        lyr.set_weights([kernel, bias] if lyr.use_bias else [kernel])
    except WeightsError as exc:
        raise WeightsError(f"{wlabel}: {exc}") from None
    if apply_constraints:
        lyr.apply_constraints()


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


def _with_seed(identifier, seed, argument):
    from .layers import initializers
    init = initializers.get(identifier, argument)
    if hasattr(init, "seed") and init.seed is None:
        config = init.get_config()
        config["seed"] = seed
        return type(init)(**config)
    return init
