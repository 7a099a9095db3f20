"""FreeSurfer MGH volumes (``.mgh``, ``.mgz``) through nibabel's header.

An MGH file is a 284-byte big-endian header, the voxels in Fortran order
(width fastest) and an optional footer (TR, flip angle, TE, TI). Voxels are
read and written region by region as a
:class:`~conv3d_cli.io.rawfile.RawArrayFile`, as an uncompressed NIfTI's are;
a ``.mgz`` (the same bytes gzipped) is decompressed as a stream to a
temporary file first, and a ``.mgz`` output is compressed at the end
(:mod:`conv3d_cli.io.nifti` does both).

Geometry: nibabel's ``vox2ras`` (zooms, direction cosines and the RAS of the
volume centre), in millimetres; the image is ``(X, Y, Z[, frames])``, the
frames read as channels, as NIfTI's 4th axis is. MGH stores uint8, int16,
uint16, int32 and float32, so outputs are float32 (a float64 result is
rounded, with a note); the header keeps float32 matrices.
"""

from __future__ import annotations

import gzip
import math
import os

import nibabel as nib
import numpy as np
from nibabel.freesurfer.mghformat import MGHHeader

from ..errors import ShapeError, VolumeError
from ..geometry import UNIT_METERS, Geometry
from .base import FileWriter, Volume
from .nifti import HeaderOnly, _decompress, gzip_file
from .npy import check_dtype
from .paths import check_input_path
from .rawfile import RawArrayFile
from .tempfiles import temp_path

# The acquisition parameters of the footer, copied from an MGH input to its outputs.
FOOTER = ("tr", "flip_angle", "te", "ti")


def open_volume(spec, header_only=False, tmp_dir=None) -> Volume:
    path = spec.path
    check_input_path(path, path)
    gz = path.lower().endswith((".mgz", ".gz"))
    try:
        # nibabel's loader leaves the file open; the header (and footer) are read here.
        with (gzip.open if gz else open)(path, "rb") as fh:
            header = MGHHeader.from_fileobj(fh)
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
        affine = np.asarray(header.get_affine(), dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for bad headers and gzip streams
        raise VolumeError(f"{path}: not a valid MGH file ({exc})") from None
    check_dtype(dtype, path)
    if min(shape) < 1:
        raise VolumeError(f"{path}: the image is empty: shape {shape}")
    if not (np.all(np.isfinite(affine)) and np.linalg.matrix_rank(affine[:3, :3]) == 3):
        raise VolumeError(f"{path}: the vox2ras matrix is not usable (NaN, infinite or "
                          "singular zooms or direction cosines)")
    geometry = Geometry(affine, ("millimeter",) * 3, header, "affine")
    details = {"tr": float(header["tr"]), "tr_unit": "msec"} if len(shape) == 4 else {}
    if header_only and gz:
        return Volume(spec, HeaderOnly(shape, dtype), geometry, axes="channels_last",
                      split_order=(2, 1, 0), details=details)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    tmp = _decompress(path, tmp_dir, offset + nbytes) if gz else None
    data_path = tmp or path
    array = RawArrayFile(data_path, offset, shape, dtype, fortran_order=True, name=path)
    if os.path.getsize(data_path) < offset + nbytes:
        if tmp:
            os.unlink(tmp)
        raise VolumeError(f"{path}: file is truncated: the header says {shape} {dtype}")
    return Volume(spec, array, geometry, axes="channels_last", split_order=(2, 1, 0),
                  temp_files=[tmp] if tmp else [], details=details)


def mgh_affine(geometry, shape):
    """The output's vox2ras: the geometry's affine in millimetres (its input's voxel
    grid where it has none). World coordinates in one unit are converted whole;
    axes of different units scale their own columns."""
    if geometry is None or geometry.affine is None:
        return np.asarray(geometry.to_source if geometry is not None else np.eye(4))
    affine = np.array(geometry.affine)
    units = geometry.units or (None,) * 3
    if len(set(units)) == 1 and units[0] in UNIT_METERS:
        affine[:3] *= UNIT_METERS[units[0]] / UNIT_METERS["millimeter"]
    elif all(u in UNIT_METERS for u in units):
        affine[:3, :3] *= [UNIT_METERS[u] / UNIT_METERS["millimeter"] for u in units]
    return affine


def create_mgh(path, shape, dtype, affine, source=None):
    """A new uncompressed MGH at ``path`` (header, zeroed voxels, footer); its voxels
    written by region."""
    # nibabel turns an affine into zooms, direction cosines and the centre's RAS
    # from the image's shape alone: a broadcast zero stands for the voxels.
    img = nib.MGHImage(np.broadcast_to(np.zeros((), dtype), shape), affine)
    img.update_header()
    header = img.header
    header.set_data_dtype(np.dtype(dtype))
    if isinstance(source, MGHHeader):
        for field in FOOTER:
            header[field] = source[field]
    offset = header.get_data_offset()
    with open(path, "wb") as fh:
        header.writehdr_to(fh)
        header.writeftr_to(fh)  # after the voxels, which stay zero until written
    dtype = header.get_data_dtype()
    return RawArrayFile(path, offset, shape, dtype, fortran_order=True, writable=True)


class Writer(FileWriter):
    """An MGH output ``(X, Y, Z[, C])``, channels last, float32; ``.mgz`` written
    uncompressed first and compressed by ``commit()``."""

    parallel_writes = True

    def __init__(self, spec, *, shape, dtype, geometry=None, overwrite=False, inputs=(),
                 resume=False, workers=None, **_):
        if not 3 <= len(shape) <= 4:
            raise ShapeError(f"OUTPUT {spec}: an MGH output holds one volume (X, Y, Z[, C]); "
                             f"this output has shape {tuple(shape)}")
        affine = mgh_affine(geometry, shape)
        source = geometry.header if geometry is not None else None
        base = os.path.basename(spec.path)
        self._gz = base.lower().endswith(".mgz")
        self._workers = workers

        def create(tmp):
            return create_mgh(tmp, shape, dtype, affine, source)
        super().__init__(spec, shape, dtype, create, overwrite, inputs, resume,
                         name=base[:-4] + ".mgh" if self._gz else base)
        self._tmp_gz = temp_path(self.folder, base) if self._gz else None

    @classmethod
    def output_axes(cls, geometry=None):
        return "channels_last"

    def _finish(self, tmp):
        if not self._gz:
            return tmp
        gzip_file(tmp, self._tmp_gz, self._workers)
        os.unlink(tmp)
        return self._tmp_gz

    def _temporary_files(self):
        return [self._tmp, getattr(self, "_tmp_gz", None)]
