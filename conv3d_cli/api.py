"""The library behind the CLI: build a layer from arguments, apply it to a file.

``build_layer`` merges a Keras layer config, explicit arguments and a
weights file into one layer; ``apply_to_file`` runs it over a volume file
into an output file; ``describe`` is ``conv3d shape`` without printing.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from . import engine, shapes, signals
from .errors import ArgumentError, ShapeError, WeightsError
from .geometry import output_affine
from .io import OutputTarget, VolumeSpec, open_volume, parse_spec
from .io.dtypes import output_dtype as resolve_output_dtype
from .layers import conv as convmod
from .layout import CanonicalView, Layout
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


def _file_layout(vol, layer):
    # A NIfTI image is (X, Y, Z[, C]) and an OME-Zarr image ([t,] c, z, y, x)
    # whatever the layer's data_format.
    data_format = ("channels_last" if vol.is_nifti else
                   "channels_first" if vol.is_ome else layer.data_format)
    try:
        return Layout(vol.shape, data_format)
    except ShapeError as exc:
        raise ShapeError(f"INPUT {vol.spec}: {exc}") from None


def _keras_shape(layout, layer):
    b, d, h, w, c = layout.canonical_shape
    batch = layout.batch_shape or (1,)
    return shapes.join_layout(batch, (d, h, w), c, layer.data_format)


def _split_order(vol):
    # Split first along the axis the file stores slowest, so tiles read contiguously.
    return (2, 1, 0) if vol is not None and vol.is_nifti else (0, 1, 2)


def describe(layer, input_shape=None, volume=None, method="auto", workers=None,
             memory_limit=None, chunk_shape=None):
    """Output shape, parameters, per-axis padding and the plan, as a dict."""
    if volume is not None:
        layout = _file_layout(volume, layer)
        keras_in = _keras_shape(layout, layer)
    else:
        keras_in = tuple(input_shape)
        layout = None
        if len(keras_in) < 5:
            raise ShapeError(f"--input-shape {','.join(map(str, keras_in))}: expected "
                             f"min_ndim=5 (batch, D, H, W, C under channels_last), found "
                             f"ndim={len(keras_in)}")
    try:
        if not layer.built:  # before the kernel is allocated
            layer.compute_output_shape(keras_in)
            channels = shapes.split_layout(keras_in, layer.data_format)[2]
            check_kernel_fits(layer, channels, memory_limit)
        job = layer.job(keras_in)
    except ShapeError as exc:  # the layer does not fit this file's volume
        if volume is None:
            raise
        raise ShapeError(f"INPUT {volume.spec} {tuple(volume.shape)}: {exc}") from None
    try:
        plan = engine.plan_job(job, method, memory_limit, workers, chunk_shape,
                               split_order=_split_order(volume))
    except ArgumentError as exc:
        if volume is None:
            raise
        raise ArgumentError(f"INPUT {volume.spec} {tuple(volume.shape)}: {exc}") from None
    axes = []
    for name, g in zip("DHW", job.geoms):
        if g.kind == shapes.CONV:
            before = g.offset
            after = (g.out - 1) * g.s + g.ke - g.n - before
            axes.append({"axis": name, "pad_before": before, "pad_after": max(after, 0)})
        else:
            full = (g.n - 1) * g.s + g.ke
            axes.append({"axis": name, "crop_before": g.offset,
                         "crop_after": full - g.offset - g.out})
    out_keras = shapes.join_layout(job.batch_shape, job.out_canonical_shape[1:4],
                                   job.out_canonical_shape[4], layer.data_format)
    info = {"layer": layer.keras_name, "input_shape": list(keras_in),
            "output_shape": list(out_keras), "params": layer.count_params(),
            "padding": axes, "plan": plan.summary(job)}
    if layout is not None:
        info["file_input_shape"] = list(volume.shape)
        info["file_output_shape"] = list(layout.output_shape(job.out_canonical_shape))
    return info, job, plan


def apply_to_file(layer, input_spec, output_spec, overwrite=False, method="auto",
                  workers=None, memory_limit=None, chunk_shape=None, progress=True,
                  on_plan=None, scheduler=None, resume=False, tmp_dir=None,
                  before_commit=None, output_dtype=None):
    """Run ``layer`` over the volume ``input_spec`` into ``output_spec``; returns a report.

    ``scheduler`` (an address such as ``tcp://10.0.0.5:8786``, or ``"local"``)
    runs the tiles on a Dask cluster; ``resume`` continues an interrupted run
    into a Zarr output, skipping the tiles it already wrote. A ``.nii.gz``
    input is decompressed into ``tmp_dir`` (default: CONV3D_TMPDIR, else
    OUTPUT's directory: the disk the result goes to). ``before_commit(report)``
    runs once the output is complete, before it is put in place.

    OUTPUT is checked (directory, ``overwrite``) before any work; a failure or
    a signal leaves it untouched and removes every temporary file; a failed
    Zarr run keeps its partial store for ``resume``, and the exception's notes
    (``__notes__``) say so. The output holds the layer's compute dtype unless
    its format cannot (then float32) or ``output_dtype`` (see
    :mod:`conv3d_cli.io.dtypes`) says otherwise.
    """
    from .progress import progress_bar
    start = time.perf_counter()
    in_spec = input_spec if isinstance(input_spec, VolumeSpec) else parse_spec(input_spec, "INPUT")
    out_spec = parse_spec(output_spec, "OUTPUT")
    zarr_out = out_spec.format == "zarr"
    if resume and not zarr_out:
        raise ArgumentError("--resume needs a Zarr OUTPUT (store.zarr): only Zarr stores "
                            "record which tiles are written")
    if zarr_out:
        from .io.zarr_io import ZarrOutput
        target = ZarrOutput(out_spec, overwrite=overwrite, resume=resume)
    else:
        target = OutputTarget(out_spec, overwrite=overwrite, inputs=[in_spec])
    vol = None
    try:
        vol = open_volume(in_spec, tmp_dir=_temp_folder(tmp_dir, out_spec))
        if zarr_out:
            target.check_input(vol)
        info, job, plan = describe(layer, volume=vol, method=method, workers=workers,
                                   memory_limit=memory_limit, chunk_shape=chunk_shape)
        if on_plan is not None:
            on_plan(info)
        layout = _file_layout(vol, layer)
        out_shape = layout.output_shape(job.out_canonical_shape)
        out_format = "channels_last" if out_spec.format == "nifti" else layout.data_format
        out_layout = Layout(out_shape, out_format)
        if out_spec.format == "nifti" and len(out_shape) > 4:
            raise ShapeError(f"OUTPUT {out_spec}: a NIfTI output holds one volume "
                             f"(X, Y, Z[, C]); this output has shape {out_shape}")
        out_dtype, dtype_note = resolve_output_dtype(output_dtype, layer.compute_dtype,
                                                     vol.dtype, out_spec.format)
        skip = set()
        if zarr_out:
            writer = target
            skip = _prepare_zarr(target, vol, layer, job, plan, out_layout, out_dtype)
        else:
            writer = target.create(out_shape, out_dtype, affine=_nifti_affine(out_spec, vol, job),
                                   like=vol.image if vol.is_nifti else None,
                                   description=_description(layer))
        sink = CanonicalView(writer, out_layout)
        sink.single_writer = target.single_writer
        source = CanonicalView(vol.array, layout)
        remaining = [t for i, t in enumerate(plan.tiles) if i not in skip]
        bar = progress_bar(sum((t.b1 - t.b0) * int(np.prod(t.shape)) for t in remaining),
                           enabled=progress)
        try:
            stats = engine.run(job, source, sink, plan,
                               want_sums=layer.activity_regularizer is not None, progress=bar,
                               skip=skip, on_done=target.mark_done if zarr_out else None,
                               scheduler=scheduler)
        finally:
            bar.close()
        report = _report(layer, vol, target, info, stats, skip, scheduler, start)
        report.update(_dtype_report(layer, job, out_dtype, dtype_note))
        if before_commit is not None:
            before_commit(report)
        target.commit()
    except BaseException as exc:
        with signals.shielded():
            kept = target.abort()
        if kept:
            _add_note(exc, kept)
        raise
    finally:
        if vol is not None:
            with signals.shielded():
                vol.close()
    return report


def _temp_folder(tmp_dir, out_spec):
    """--tmp-dir, else CONV3D_TMPDIR, else OUTPUT's directory."""
    folder = tmp_dir or os.environ.get("CONV3D_TMPDIR")
    if folder:
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise ArgumentError(f"--tmp-dir {folder}: not a writable directory")
        return folder
    return os.path.dirname(os.path.abspath(out_spec.path))


def _report(layer, vol, target, info, stats, skip, scheduler, start):
    losses = layer.regularization_losses(stats.activity_sums,
                                         batch_size=info["input_shape"][0])
    return {
        "input": str(vol.spec), "output": str(target.spec),
        "input_shape": info["input_shape"], "output_shape": info["output_shape"],
        "file_input_shape": info["file_input_shape"],
        "file_output_shape": info["file_output_shape"],
        "params": info["params"], "layer": {"class_name": layer.keras_name,
                                            "config": layer.get_config()},
        "layer_class_source": getattr(layer, "layer_class_source", None),
        "named_kernel": getattr(layer, "named_kernel", None),
        "method": stats.method, "tiles": stats.tiles, "skipped_tiles": len(skip),
        "workers": stats.workers, "scheduler": scheduler,
        "seconds": round(time.perf_counter() - start, 4),
        "compute_seconds": round(stats.seconds, 4),
        "losses": losses, "plan": info["plan"],
    }


def _add_note(exc, text):
    """``exc.add_note(text)`` (Python >= 3.11), by hand before."""
    if hasattr(exc, "add_note"):
        exc.add_note(text)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), text]


def _dtype_report(layer, job, out_dtype, note):
    """What was computed in what: the policy, the weights', the computation's
    (inputs, weights and result), the sums' and the file's dtypes."""
    return {"dtype_policy": layer.dtype_policy.name, "variable_dtype": layer.variable_dtype,
            "compute_dtype": layer.compute_dtype, "accumulation_dtype": job.work_dtype.name,
            "output_dtype": np.dtype(out_dtype).name, "output_dtype_note": note}


def _description(layer):
    return (f"conv3d {layer.keras_name} k{'x'.join(map(str, layer.kernel_size))} "
            f"s{'x'.join(map(str, layer.strides))} "
            f"d{'x'.join(map(str, layer.dilation_rate))} {layer.padding} f{layer.filters}")


def _nifti_affine(out_spec, vol, job):
    if out_spec.format != "nifti":
        return None
    return output_affine(vol.affine if vol.affine is not None else np.eye(4), job.geoms)


def _prepare_zarr(target, vol, layer, job, plan, out_layout, out_dtype):
    """Create or reopen the Zarr output (chunked like the tiles); the done tile indices.

    Resuming reuses the recorded tiling (whatever --workers now asks) after
    checking that input, layer, weights and output shape are the same."""
    import hashlib
    from .engine.plan import Tile
    from .io.zarr_io import ome_output_attrs
    digest = hashlib.sha1()
    for w in layer.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    record = {"input": str(vol.spec), "input_shape": list(vol.shape),
              "layer": json.loads(json.dumps(layer.get_config())), "weights": digest.hexdigest(),
              "output_shape": list(out_layout.shape), "output_dtype": np.dtype(out_dtype).name,
              "method": plan.method,
              "tiles": [[t.b0, t.b1, [list(r) for r in t.out]] for t in plan.tiles]}
    tile = plan.tile_shape
    f = job.out_canonical_shape[4]
    if job.activation.halves_last_axis and job.act_axis == 3:
        tile = tile[:2] + (job.out_canonical_shape[3],)
    spatial_c = (f,) + tuple(tile) if out_layout.channels_first else tuple(tile) + (f,)
    if out_layout.rank >= 5:
        chunks = (1,) * (out_layout.rank - 4) + spatial_c
    elif out_layout.rank == 3:
        chunks = tuple(tile)
    else:
        chunks = spatial_c
    chunks = tuple(min(c, n) for c, n in zip(chunks, out_layout.shape))
    ome = None
    if vol.is_ome:  # OME-Zarr in, OME-Zarr out (one level, at "data")
        ome = ome_output_attrs(vol.array, job.geoms, out_layout.shape, vol.array.ome["version"])
    zarr_format = vol.array.zarr_format if vol.spec.format == "zarr" else 3
    done, recorded = target.prepare(out_layout.shape, out_dtype, chunks, record, zarr_format, ome)
    if recorded is not None:  # resuming: the tiles the store was chunked for
        # Transitional (house-io plans with engine.plan_job(..., tiles=recorded) instead).
        object.__setattr__(plan, "tiles", tuple(Tile(b0, b1, tuple(tuple(r) for r in box))
                                                for b0, b1, box in recorded))
    return done
