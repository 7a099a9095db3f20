"""Run a layer over a volume file into another: what ``conv3d run`` does.

``apply_to_file`` reads INPUT region by region, computes the layer tile by
tile (:mod:`conv3d_cli.engine`) and writes OUTPUT through its format's writer
(:func:`conv3d_cli.io.create_output`); ``describe`` is ``conv3d shape``
without printing. Nothing here asks which format a volume has: the reader
says where its channels are and where its voxels lie, the writer what it can
hold, whether worker processes may write it, what it recorded of an
interrupted run and what it kept of a failed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from . import engine, shapes, signals
from .errors import ArgumentError, ShapeError
from .io import (VolumeSpec, check_output, create_output, open_volume, output_axes,
                 parse_spec)
from .io.dtypes import output_dtype as resolve_output_dtype
from .layout import CanonicalView, Layout

__all__ = ["apply_to_file", "describe"]


def describe(layer, input_shape=None, volume=None, method="auto", workers=None,
             memory_limit=None, chunk_shape=None):
    """(output shape, parameters, per-axis padding and the plan as a dict; the job;
    the plan) for a Keras ``input_shape`` or an opened ``volume``."""
    layout = _file_layout(volume, layer) if volume is not None else None
    keras_in = _keras_shape(layout, layer) if layout is not None else _given_shape(input_shape)
    job = _job(layer, keras_in, volume, memory_limit)
    plan = _plan(job, volume, method, memory_limit, workers, chunk_shape)
    out = job.out_canonical_shape
    out_keras = shapes.join_layout(job.batch_shape, out[1:4], out[4], layer.data_format)
    info = {"layer": layer.keras_name, "input_shape": list(keras_in),
            "output_shape": list(out_keras), "params": layer.count_params(),
            "padding": _padding(job), "plan": plan.summary(job)}
    if layout is not None:
        info["file_input_shape"] = list(volume.shape)
        info["file_output_shape"] = list(layout.output_shape(out))
    return info, job, plan


def _given_shape(input_shape):
    keras_in = tuple(input_shape)
    if len(keras_in) < 5:
        raise ShapeError(f"--input-shape {','.join(map(str, keras_in))}: expected "
                         f"min_ndim=5 (batch, D, H, W, C under channels_last), found "
                         f"ndim={len(keras_in)}")
    return keras_in


def _job(layer, keras_in, volume, memory_limit):
    """The layer's job on ``keras_in``; a kernel too large for the limit is refused
    before it is allocated."""
    from .api import check_kernel_fits
    try:
        if not layer.built:
            layer.compute_output_shape(keras_in)
            channels = shapes.split_layout(keras_in, layer.data_format)[2]
            check_kernel_fits(layer, channels, memory_limit)
        return layer.job(keras_in)
    except ShapeError as exc:  # the layer does not fit this file's volume
        if volume is None:
            raise
        raise ShapeError(f"INPUT {volume.spec} {tuple(volume.shape)}: {exc}") from None


def _plan(job, volume, method, memory_limit, workers, chunk_shape, tiles=None):
    split_order = volume.split_order if volume is not None else (0, 1, 2)
    try:
        return _plan_job(job, method, memory_limit, workers, chunk_shape,
                         split_order=split_order, tiles=tiles)
    except ArgumentError as exc:
        if volume is None:
            raise
        raise ArgumentError(f"INPUT {volume.spec} {tuple(volume.shape)}: {exc}") from None


def _plan_job(*args, tiles=None, **kwargs):
    """``engine.plan_job(..., tiles=)``, with the recorded tiling of a resumed output."""
    plan = engine.plan_job(*args, **kwargs)
    if tiles is not None:  # house-engine: plan_job(tiles=)
        plan.tiles = list(tiles)
    return plan


def _padding(job):
    """Per axis, what 'same' padding adds (Conv3D) or the transposed output crops."""
    axes = []
    for name, g in zip("DHW", job.geoms):
        if g.kind == shapes.CONV:
            after = (g.out - 1) * g.s + g.ke - g.n - g.offset
            axes.append({"axis": name, "pad_before": g.offset, "pad_after": max(after, 0)})
        else:
            full = (g.n - 1) * g.s + g.ke
            axes.append({"axis": name, "crop_before": g.offset,
                         "crop_after": full - g.offset - g.out})
    return axes


def _file_layout(vol, layer):
    # A format may fix where its channels are (NIfTI: last, OME-Zarr: first),
    # whatever the layer's data_format.
    try:
        return Layout(vol.shape, vol.axes or layer.data_format)
    except ShapeError as exc:
        raise ShapeError(f"INPUT {vol.spec}: {exc}") from None


def _keras_shape(layout, layer):
    b, d, h, w, c = layout.canonical_shape
    batch = layout.batch_shape or (1,)
    return shapes.join_layout(batch, (d, h, w), c, layer.data_format)


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
    start = time.perf_counter()
    in_spec = input_spec if isinstance(input_spec, VolumeSpec) else parse_spec(input_spec, "INPUT")
    out_spec = parse_spec(output_spec, "OUTPUT")
    check_output(out_spec, overwrite=overwrite, inputs=[in_spec], resume=resume)
    options = {"method": method, "workers": workers, "memory_limit": memory_limit,
               "chunk_shape": chunk_shape}
    vol = writer = None
    try:
        vol = open_volume(in_spec, tmp_dir=_temp_folder(tmp_dir, out_spec))
        info, job, plan = describe(layer, volume=vol, **options)
        if on_plan is not None:
            on_plan(info)
        writer, out_layout, plan, dtype_note = _open_output(
            layer, vol, job, plan, out_spec, options, overwrite, resume, output_dtype)
        stats, skip = _compute(layer, job, vol, writer, out_layout, plan, progress, scheduler)
        report = _report(layer, vol, writer, info, stats, skip, scheduler, start)
        report.update(_dtype_report(layer, job, writer.dtype, dtype_note))
        if before_commit is not None:
            before_commit(report)
        writer.commit()
    except BaseException as exc:
        _abort(writer, exc)
        raise
    finally:
        if vol is not None:
            with signals.shielded():
                vol.close()
    return report


def _open_output(layer, vol, job, plan, out_spec, options, overwrite, resume, requested_dtype):
    """(the output's writer, its layout, the plan to run, the dtype note).

    The output lies where the layer moves the input's geometry, its channels
    where its format wants them; a resumed output brings the tiling it was
    chunked for, which the plan then keeps."""
    geometry = vol.geometry.moved(job.geoms)
    out_layout = _file_layout(vol, layer).output_layout(job.out_canonical_shape,
                                                        output_axes(out_spec, geometry))
    out_dtype, note = resolve_output_dtype(requested_dtype, layer.compute_dtype, vol.dtype,
                                           out_spec.format)
    writer = create_output(out_spec, shape=out_layout.shape, dtype=out_dtype,
                           chunks=_chunks(job, plan, out_layout), geometry=geometry,
                           description=_description(layer), overwrite=overwrite,
                           inputs=[vol], resume_record=_record(layer, vol, plan, out_layout,
                                                               out_dtype),
                           resume=resume, workers=options["workers"])
    if writer.recorded_tiles is not None:
        plan = _plan(job, vol, tiles=_tiles(writer.recorded_tiles), **options)
    return writer, out_layout, plan, note


def _chunks(job, plan, out_layout):
    """The output's chunk shape: one tile's block, in the output's own axes."""
    tile = tuple(plan.tile_shape)
    f = job.out_canonical_shape[4]
    if job.activation.halves_last_axis and job.act_axis == 3:
        tile = tile[:2] + (job.out_canonical_shape[3],)
    spatial_c = (f,) + tile if out_layout.channels_first else tile + (f,)
    if out_layout.rank >= 5:
        chunks = (1,) * (out_layout.rank - 4) + spatial_c
    elif out_layout.rank == 3:
        chunks = tile
    else:
        chunks = spatial_c
    return tuple(min(c, n) for c, n in zip(chunks, out_layout.shape))


def _record(layer, vol, plan, out_layout, out_dtype):
    """What this run computes (input, layer, weights, output) and its tiles, as JSON:
    a resumable output keeps it, and continues only a run with the same record."""
    digest = hashlib.sha1()
    for w in layer.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return {"input": str(vol.spec), "input_shape": list(vol.shape),
            "layer": json.loads(json.dumps(layer.get_config())), "weights": digest.hexdigest(),
            "output_shape": list(out_layout.shape), "output_dtype": np.dtype(out_dtype).name,
            "method": plan.method,
            "tiles": [[t.b0, t.b1, [list(r) for r in t.out]] for t in plan.tiles]}


def _tiles(recorded):
    from .engine.plan import Tile
    return [Tile(b0, b1, tuple(tuple(r) for r in box)) for b0, b1, box in recorded]


def _compute(layer, job, vol, writer, out_layout, plan, progress, scheduler):
    """Run the plan's tiles but those the writer already holds; (stats, skipped)."""
    from .progress import progress_bar
    skip = writer.done_tiles()
    source = CanonicalView(vol.array, _file_layout(vol, layer))
    sink = CanonicalView(writer, out_layout)
    remaining = [t for i, t in enumerate(plan.tiles) if i not in skip]
    bar = progress_bar(sum((t.b1 - t.b0) * int(np.prod(t.shape)) for t in remaining),
                       enabled=progress)
    try:
        stats = engine.run(job, source, sink, plan,
                           want_sums=layer.activity_regularizer is not None, progress=bar,
                           skip=skip, on_done=writer.mark_done, scheduler=scheduler)
    finally:
        bar.close()
    return stats, skip


def _abort(writer, exc):
    """Remove what the run made; say on ``exc`` what was kept."""
    if writer is None:
        return
    with signals.shielded():
        kept = writer.abort()
    if kept:
        _add_note(exc, kept)


def _temp_folder(tmp_dir, out_spec):
    """--tmp-dir, else CONV3D_TMPDIR, else OUTPUT's directory."""
    folder = tmp_dir or os.environ.get("CONV3D_TMPDIR")
    if folder:
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise ArgumentError(f"--tmp-dir {folder}: not a writable directory")
        return folder
    return os.path.dirname(os.path.abspath(out_spec.path))


def _report(layer, vol, writer, info, stats, skip, scheduler, start):
    losses = layer.regularization_losses(stats.activity_sums,
                                         batch_size=info["input_shape"][0])
    return {
        "input": str(vol.spec), "output": str(writer.spec),
        "input_shape": info["input_shape"], "output_shape": info["output_shape"],
        "file_input_shape": info["file_input_shape"],
        "file_output_shape": list(writer.shape),
        "params": info["params"], "layer": {"class_name": layer.keras_name,
                                            "config": layer.get_config()},
        "layer_class_source": getattr(layer, "layer_class_source", None),
        "named_kernel": getattr(layer, "named_kernel", None),
        "method": stats.method, "tiles": stats.tiles, "skipped_tiles": len(skip),
        "workers": stats.workers, "scheduler": scheduler,
        "seconds": round(time.perf_counter() - start, 4),
        "compute_seconds": round(stats.seconds, 4),
        "losses": losses, "plan": info["plan"], "output_notes": list(writer.notes),
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
