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
from dataclasses import replace

import numpy as np

from . import boundary as edges
from . import engine, series, shapes, signals
from .errors import ArgumentError, ShapeError
from .io import VolumeSpec, check_output, create_output, open_volume, output_axes, parse_spec
from .io.dtypes import IntegerSink
from .io.dtypes import output_dtype as resolve_output_dtype
from .layout import CanonicalView, Layout
from .progress import Phases, reporting

__all__ = ["apply_to_file", "describe"]


def describe(layer, input_shape=None, volume=None, method="auto", workers=None,
             memory_limit=None, chunk_shape=None, per_volume=False, boundary="zeros"):
    """(output shape, parameters, per-axis padding and the plan as a dict; the job;
    the plan) for a Keras ``input_shape`` or an opened ``volume``.

    ``per_volume``: the volume's series axis is the batch (:mod:`conv3d_cli.series`).
    ``boundary``: what is read beyond the edges (:mod:`conv3d_cli.boundary`); the
    job is the layer's, the plan is for the job the engine runs."""
    layout = _source_layout(volume, layer, per_volume) if volume is not None else None
    keras_in = _keras_shape(layout, layer) if layout is not None else _given_shape(input_shape)
    if volume is not None and not per_volume:
        _check_series_channels(layer, volume, layout)
    job = _job(layer, keras_in, volume, memory_limit, layout)
    edges.check_boundary(boundary, job, layer.padding)
    plan = _plan(edges.compute_job(job, boundary), volume, method, memory_limit, workers,
                 chunk_shape)
    out = job.out_canonical_shape
    out_keras = shapes.join_layout(job.batch_shape, out[1:4], out[4], layer.data_format)
    info = {"layer": layer.keras_name, "input_shape": list(keras_in),
            "output_shape": list(out_keras), "params": layer.count_params(),
            "padding": _padding(job), "plan": plan.summary(job)}
    if boundary != "zeros":
        info["boundary"] = boundary
    if layout is not None:
        info["file_input_shape"] = list(volume.shape)
        info["file_output_shape"] = list(_output_layouts(layout, out, None, per_volume)[1])
    return info, job, plan


def _source_layout(vol, layer, per_volume):
    """The layout the engine reads ``vol`` in: the file's own, or with
    ``per_volume`` the Keras batch of frames :func:`_source_array` shows."""
    layout = _file_layout(vol, layer)
    if not per_volume:
        return layout
    series.check_series(layout, vol.spec)
    return Layout(series.keras_view_shape(series.input_axes(layout), vol.shape),
                  layout.data_format)


def _source_array(vol, layer, per_volume):
    if not per_volume:
        return vol.array
    return series.AxesView(vol.array, series.input_axes(_file_layout(vol, layer)))


def _output_layouts(layout, canonical_out, data_format, per_volume):
    """(the output's layout as the engine writes it, the output file's shape, the
    :class:`~conv3d_cli.series.AxesView` axes between them or None)."""
    view = layout.output_layout(canonical_out, data_format)
    if not per_volume:
        return view, view.shape, None
    _, axes = series.output_axes(view.channels_first, canonical_out[4])
    return view, series.file_shape(axes, view.shape), axes


def _check_series_channels(layer, vol, layout):
    """A 4-D file whose last axis is not the built layer's input channels: say so
    in the file's terms and point to --per-volume (not Keras's tensor wording)."""
    channels = getattr(layer, "input_channels", None)
    if layer.built and layout.rank == 4 and channels is not None and \
            layout.canonical_shape[4] != channels:
        raise ShapeError(series.mismatch_message(vol.spec, layout, channels))


def _given_shape(input_shape):
    keras_in = tuple(input_shape)
    if len(keras_in) < 5:
        raise ShapeError(f"--input-shape {','.join(map(str, keras_in))}: expected "
                         f"min_ndim=5 (batch, D, H, W, C under channels_last), found "
                         f"ndim={len(keras_in)}")
    return keras_in


def _job(layer, keras_in, volume, memory_limit, layout=None):
    """The layer's job on ``keras_in``; a kernel too large for the limit is refused
    before it is allocated. A volume the layer does not fit is refused in the
    user's terms (voxels, channels, file axes) rather than Keras's tensor terms."""
    from .api import check_kernel_fits
    try:
        _check_channels(layer, keras_in, layout, volume)
        _check_kernel_extent(layer, keras_in)
        if not layer.built:
            layer.compute_output_shape(keras_in)
            channels = shapes.split_layout(keras_in, layer.data_format)[2]
            check_kernel_fits(layer, channels, memory_limit)
        return layer.job(keras_in)
    except ShapeError as exc:  # the layer does not fit this file's volume
        if volume is None:
            raise
        raise ShapeError(f"INPUT {volume.spec} {tuple(volume.shape)}: {exc}") from None


def _check_channels(layer, keras_in, layout, volume):
    """A volume with another channel count than the loaded weights take: say which
    file axis holds the channels, and whether ``--data-format`` would fit."""
    if not layer.built or layer.input_channels is None:
        return
    channels = shapes.split_layout(keras_in, layer.data_format)[2]
    expected = layer.input_channels
    if channels == expected:
        return
    where = _channel_axis(layout, layer.data_format)
    message = (f"{where} holds {channels} channel{'s' * (channels != 1)}, but the layer's "
               f"weights (kernel shape {tuple(layer.kernel.shape)}) take {expected} input "
               f"channel{'s' * (expected != 1)}")
    other = _OTHER_SIDE[layer.data_format]
    if layout is not None and volume.axes is None and layout.rank >= 4 \
            and Layout(layout.shape, other).canonical_shape[4] == expected:
        message += f"; if the channels are on the other axis, give --data-format {other}"
    raise ShapeError(message)


_OTHER_SIDE = {"channels_last": "channels_first", "channels_first": "channels_last"}
_CHANNEL_AXIS = {"channels_last": "last", "channels_first": "second"}


def _channel_axis(layout, data_format):
    """Where the channels are, in the file's own axes (or the Keras shape's)."""
    if layout is None:
        return f"the input's {_CHANNEL_AXIS[data_format]} axis"
    if layout.rank == 3:
        return "the 3-D volume (no channel axis)"
    index = layout.rank - 1 if not layout.channels_first else layout.rank - 4
    return f"axis {index} ({layout.data_format})"


def _check_kernel_extent(layer, keras_in):
    """A 'valid' Conv3D whose dilated kernel spans more voxels than the volume
    along some axis has no output there: ``out = floor((n - ke) / s) + 1 <= 0``
    exactly when ``n < ke``, with ``ke = (k - 1) * d + 1``, whatever the stride."""
    if layer.keras_name != "Conv3D" or layer.padding != "valid":
        return
    spatial = shapes.split_layout(keras_in, layer.data_format)[1]
    spans = [(k - 1) * d + 1 for k, d in zip(layer.kernel_size, layer.dilation_rate)]
    short = [name for name, n, ke in zip("DHW", spatial, spans) if n is not None and n < ke]
    if not short:
        return
    dilated = "" if set(layer.dilation_rate) == {1} else \
        f" (kernel_size {_x(layer.kernel_size)} at dilation_rate {_x(layer.dilation_rate)})"
    raise ShapeError(
        f"the kernel spans {_x(spans)} voxels (D, H, W){dilated}, more than the volume's "
        f"{_x(spatial)} along {_names(short)}: with padding valid the output would have zero "
        "or negative size there; give --padding same (the output keeps the volume's size) "
        "or a smaller kernel")


def _x(values):
    return "x".join(map(str, values))


def _names(axes):
    return axes[0] if len(axes) == 1 else ", ".join(axes[:-1]) + " and " + axes[-1]


def _plan(job, volume, method, memory_limit, workers, chunk_shape, tiles=None):
    split_order = volume.split_order if volume is not None else (0, 1, 2)
    try:
        return engine.plan_job(job, method, memory_limit, workers, chunk_shape,
                               split_order=split_order, tiles=tiles)
    except ArgumentError as exc:
        if volume is None:
            raise
        raise ArgumentError(f"INPUT {volume.spec} {tuple(volume.shape)}: {exc}") from None


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
                  workers=None, memory_limit=None, chunk_shape=None, progress=None,
                  on_plan=None, scheduler=None, resume=False, tmp_dir=None,
                  before_commit=None, output_dtype=None, per_volume=False,
                  boundary="zeros"):
    """Run ``layer`` over the volume ``input_spec`` into ``output_spec``; returns a report.

    ``scheduler`` (an address such as ``tcp://10.0.0.5:8786``, or ``"local"``)
    runs the tiles on a Dask cluster; ``resume`` continues an interrupted run
    into a Zarr output, skipping the tiles it already wrote. A ``.nii.gz``
    input is decompressed into ``tmp_dir`` (default: CONV3D_TMPDIR, else
    OUTPUT's directory: the disk the result goes to). ``before_commit(report)``
    runs once the output is complete, before it is put in place.

    ``progress``: bars on stderr for the long phases (decompressing, computing,
    compressing) when stderr is a terminal (None), always (True) or never
    (False). The report's ``phase_seconds`` times each phase (open, with the
    decompress within it; plan; compute; write, with the compress within it;
    total); ``write`` and ``total`` are added once OUTPUT is in place, after
    ``before_commit`` saw the report.

    OUTPUT is checked (directory, ``overwrite``) before any work; a failure or
    a signal leaves it untouched and removes every temporary file; a failed
    Zarr run keeps its partial store for ``resume``, and the exception's notes
    (``__notes__``) say so. The output holds the layer's compute dtype unless
    its format cannot (then float32) or ``output_dtype`` (see
    :mod:`conv3d_cli.io.dtypes`) says otherwise.

    Not Keras, on request: ``per_volume`` applies the layer to each 3-D frame
    of a 4-D series (:mod:`conv3d_cli.series`), ``boundary`` reads beyond the
    edges other than as zeros (:mod:`conv3d_cli.boundary`), and an integer
    ``output_dtype`` rounds and clips the results.
    """
    start = time.perf_counter()
    in_spec = input_spec if isinstance(input_spec, VolumeSpec) else parse_spec(input_spec, "INPUT")
    out_spec = parse_spec(output_spec, "OUTPUT")
    check_output(out_spec, overwrite=overwrite, inputs=[in_spec], resume=resume)
    options = {"method": method, "workers": workers, "memory_limit": memory_limit,
               "chunk_shape": chunk_shape}
    modes = {"per_volume": bool(per_volume), "boundary": boundary}
    vol = writer = None
    phases = Phases(progress)
    try:
        with reporting(phases):
            with phases.phase("open"):
                vol = open_volume(in_spec, tmp_dir=_temp_folder(tmp_dir, out_spec))
            with phases.phase("plan"):
                info, job, plan = describe(layer, volume=vol, **options, **modes)
            if on_plan is not None:
                on_plan(info)
            with phases.phase("plan"):
                writer, sink, plan, dtype_note = _open_output(
                    layer, vol, job, plan, out_spec, options, overwrite, resume, output_dtype,
                    modes)
            source = CanonicalView(_source_array(vol, layer, per_volume),
                                   _source_layout(vol, layer, per_volume))
            stats, skip = _compute(layer, job, edges.extended_source(source, job, boundary),
                                   _final_sink(sink, job, boundary, writer.dtype), writer, plan,
                                   phases, scheduler, boundary)
            report = _report(layer, vol, writer, info, stats, skip, scheduler, start)
            report.update(_dtype_report(layer, job, writer.dtype, dtype_note))
            report.update(_modes_report(modes))
            report["phase_seconds"] = _rounded(phases.seconds)
            if before_commit is not None:
                before_commit(report)
            with phases.phase("write"):
                writer.commit()
    except BaseException as exc:
        _abort(writer, exc)
        raise
    finally:
        if vol is not None:
            with signals.shielded():
                vol.close()
    report["phase_seconds"] = _rounded({**phases.seconds,
                                        "total": time.perf_counter() - start})
    return report


def _rounded(seconds):
    return {name: round(s, 4) for name, s in seconds.items()}


def _open_output(layer, vol, job, plan, out_spec, options, overwrite, resume, requested_dtype,
                 modes):
    """(the output's writer, the canonical view the engine writes it through, the
    plan to run, the dtype note).

    The output lies where the layer moves the input's geometry, its channels
    where its format wants them (with ``per_volume``, its series axis where
    the input had it); a resumed output brings the tiling it was chunked for,
    which the plan then keeps."""
    per_volume = modes["per_volume"]
    geometry = vol.geometry.moved(job.geoms)
    if per_volume:
        geometry = replace(geometry, series=True)
    out_layout, file_shape, axes = _output_layouts(
        _source_layout(vol, layer, per_volume), job.out_canonical_shape,
        output_axes(out_spec, geometry), per_volume)
    out_dtype, note = resolve_output_dtype(requested_dtype, layer.compute_dtype, vol.dtype,
                                           out_spec.format)
    chunks = _chunks(job, plan, out_layout)
    writer = create_output(out_spec, shape=file_shape, dtype=out_dtype,
                           chunks=chunks if axes is None else series.file_shape(axes, chunks),
                           geometry=geometry, description=_description(layer),
                           overwrite=overwrite, inputs=[vol],
                           resume_record=_record(layer, vol, plan, file_shape, out_dtype, modes),
                           resume=resume, workers=options["workers"])
    if writer.recorded_tiles is not None:
        plan = _plan(edges.compute_job(job, modes["boundary"]), vol,
                     tiles=writer.recorded_tiles, **options)
    array = writer if axes is None else series.AxesView(writer, axes)
    return writer, CanonicalView(array, out_layout), plan, note


def _final_sink(sink, job, boundary, dtype):
    """The sink the engine writes: integer outputs rounded and clipped, and under
    ``--boundary renormalize`` the sums rescaled, before the write."""
    if np.dtype(dtype).kind in "iu":
        sink = IntegerSink(sink, dtype)
    if boundary == "renormalize":
        sink = edges.RenormalizedSink(sink, job)
    return sink


def _chunks(job, plan, out_layout):
    """The output's chunk shape: one tile's block, in the output's own axes."""
    tile = tuple(plan.tile_shape)
    f = job.out_canonical_shape[4]
    if job.halved_axis == 3:  # the activation halves W: a tile's block spans it whole
        tile = tile[:2] + (job.out_canonical_shape[3],)
    spatial_c = (f,) + tile if out_layout.channels_first else tile + (f,)
    if out_layout.rank >= 5:
        chunks = (1,) * (out_layout.rank - 4) + spatial_c
    elif out_layout.rank == 3:
        chunks = tile
    else:
        chunks = spatial_c
    return tuple(min(c, n) for c, n in zip(chunks, out_layout.shape))


def _record(layer, vol, plan, out_shape, out_dtype, modes):
    """What this run computes (input, layer, weights, output) and its tiles, as JSON:
    a resumable output keeps it, and continues only a run with the same record."""
    digest = hashlib.sha1()
    for w in layer.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    record = {"input": str(vol.spec), "input_shape": list(vol.shape),
              "layer": json.loads(json.dumps(layer.get_config())),
              "weights": digest.hexdigest(),
              "output_shape": list(out_shape), "output_dtype": np.dtype(out_dtype).name,
              "method": plan.method,
              "tiles": [[t.b0, t.b1, [list(r) for r in t.out]] for t in plan.tiles]}
    # Keras's own runs keep the record they always had.
    record.update({k: v for k, v in modes.items() if v not in (False, "zeros")})
    return record


def _compute(layer, job, source, sink, writer, plan, phases, scheduler, boundary):
    """Run the plan's tiles but those the writer already holds; (stats, skipped)."""
    skip = writer.done_tiles()
    remaining = [t for i, t in enumerate(plan.tiles) if i not in skip]
    voxels = sum((t.b1 - t.b0) * int(np.prod(t.shape)) for t in remaining)
    with phases.phase("compute", voxels, unit="vox", desc="conv3d") as bar:
        stats = engine.run(edges.compute_job(job, boundary), source, sink, plan,
                           want_sums=layer.activity_regularizer is not None, progress=bar,
                           skip=skip, on_done=writer.mark_done, scheduler=scheduler)
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
            where = "--tmp-dir " if tmp_dir else "CONV3D_TMPDIR="
            raise ArgumentError(f"{where}{folder}: not a writable directory")
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


def _modes_report(modes):
    """The run's modes that are not Keras, for the report and the run's notes."""
    notes = []
    if modes["per_volume"]:
        notes.append("--per-volume (not Keras): the layer was applied to each 3-D frame of "
                     "the series on its own")
    if modes["boundary"] != "zeros":
        notes.append(edges.describe(modes["boundary"]))
    return {"per_volume": modes["per_volume"], "boundary": modes["boundary"],
            "not_keras": notes}


def _description(layer):
    return (f"conv3d {layer.keras_name} k{'x'.join(map(str, layer.kernel_size))} "
            f"s{'x'.join(map(str, layer.strides))} "
            f"d{'x'.join(map(str, layer.dilation_rate))} {layer.padding} f{layer.filters}")
