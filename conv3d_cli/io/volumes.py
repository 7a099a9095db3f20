"""The entry points: open a volume, create an output, whatever the format.

The format comes from the path's extension (:mod:`conv3d_cli.io.registry`);
callers never ask which one they got. As with ``rasterio.open(path, "w",
...)``, an output is created with its shape, dtype and geometry, written by
region, and committed (or aborted): nothing appears at OUTPUT before
``commit()``.
"""

from __future__ import annotations

import numpy as np

from ..geometry import Geometry
from ..layers.args import is_float_dtype
from .base import Volume, VolumeWriter
from .dtypes import output_dtype
from .paths import VolumeSpec, parse_spec
from .registry import module


def _spec(spec, role):
    return spec if isinstance(spec, VolumeSpec) else parse_spec(spec, role)


def open_volume(spec, role="INPUT", header_only=False, tmp_dir=None) -> Volume:
    """Open a volume for region reads (``header_only``: shape, dtype, geometry only).

    A ``.nii.gz`` is decompressed into ``tmp_dir`` (default: CONV3D_TMPDIR, else
    the system's temporary folder); the copy is removed by ``close()``.
    """
    spec = _spec(spec, role)
    return module(spec.format).open_volume(spec, header_only=header_only, tmp_dir=tmp_dir)


def writer_class(spec) -> type[VolumeWriter]:
    """The writer class of OUTPUT ``spec``'s format."""
    return module(_spec(spec, "OUTPUT").format).Writer


def check_output(spec, *, overwrite=False, inputs=(), resume=False):
    """Refuse, before any work, an OUTPUT that cannot be written or would not be
    replaced, one that is one of ``inputs``, or ``resume`` where the format keeps
    no record of finished tiles. :func:`create_output` checks it again."""
    spec = _spec(spec, "OUTPUT")
    writer_class(spec).check(spec, overwrite=overwrite, inputs=inputs, resume=resume)


def output_axes(spec, geometry=None):
    """The ``data_format`` OUTPUT's format fixes for an output placed by ``geometry``
    (NIfTI: channels last; OME-Zarr: channels first), or None (free)."""
    return writer_class(spec).output_axes(geometry)


def create_output(spec, *, shape, dtype, chunks=None, geometry=None, description="",
                  overwrite=False, inputs=(), resume_record=None, resume=False,
                  tmp_dir=None, workers=None) -> VolumeWriter:
    """A new output volume of ``shape`` and ``dtype``, written by region.

    ``chunks``: the block shape the writes come in (the tiles); a format whose
    chunks need one writer each (Zarr) is chunked so. ``geometry``: where the
    voxels lie (:class:`~conv3d_cli.geometry.Geometry`, already moved through
    the layer); each format writes it as its own metadata. ``description``: a
    line for formats with a place for one (NIfTI ``descrip``). ``inputs``: the
    volumes the run reads, which OUTPUT must not be. ``resume_record``: what
    the run computes (JSON), kept by resumable formats; with ``resume``, a
    partial output written for the same record is continued. ``tmp_dir``: for
    scratch files (temporary outputs are always beside OUTPUT, so the final
    rename is atomic). ``workers``: the cores the run uses, which a format
    may use to finish the output (compress a ``.nii.gz``; default: the usable
    cores). The writer refuses, in one line, a shape its format cannot hold.
    """
    spec = _spec(spec, "OUTPUT")
    return writer_class(spec)(spec, shape=tuple(shape), dtype=np.dtype(dtype), chunks=chunks,
                              geometry=geometry, description=description,
                              overwrite=overwrite, inputs=inputs,
                              resume_record=resume_record, resume=resume, tmp_dir=tmp_dir,
                              workers=workers)


def read_volume(path):
    """The whole volume as a NumPy array (NIfTI scaling applied) and its affine or None."""
    with open_volume(path) as vol:
        data = np.asarray(vol.array[tuple(slice(None) for _ in vol.shape)])
        return data, vol.affine


def write_volume(path, array, affine=None, overwrite=False):
    """Write ``array`` to ``path`` (format from the extension), atomically.

    A float dtype the format cannot store (float16 in NIfTI, bfloat16
    anywhere) is written as float32, which holds it exactly. ``affine`` (4x4,
    voxel to world) places the voxels in a NIfTI output (its sform and qform)
    and makes a Zarr output an OME-Zarr image (its spatial axes last)."""
    array = np.asarray(array)
    spec = parse_spec(path, "OUTPUT")
    if is_float_dtype(array.dtype):
        array = array.astype(output_dtype(None, array.dtype.name, array.dtype, spec.format)[0],
                             copy=False)
    geometry = Geometry(affine, kind="affine") if affine is not None else None
    with create_output(spec, shape=array.shape, dtype=array.dtype, chunks=array.shape,
                       geometry=geometry, overwrite=overwrite) as out:
        out[tuple(slice(None) for _ in array.shape)] = array
        out.commit()
