"""Analyze 7.5 and NIfTI-1 pairs (``.hdr`` + ``.img``) through nibabel's headers.

A pair is a header file and a raw voxel file of the same name. nibabel reads
its header: a NIfTI-1 pair (magic ``ni1``, as SPM writes) is placed by the
NIfTI rules (:func:`~conv3d_cli.io.nifti.best_affine`), an Analyze 7.5 header
(with SPM's origin and scale factor where present) by nibabel's affine for
it, which is what SPM and FSL read. Voxels are read from the ``.img`` region
by region (:class:`~conv3d_cli.io.rawfile.RawArrayFile`), Fortran order, the
header's byte order and scaling applied.

Outputs are NIfTI-1 pairs: every Analyze reader reads their header as
Analyze 7.5, and unlike Analyze it holds the whole affine (sform and qform).
The ``.img`` is put in place before the ``.hdr``.
"""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
from nibabel.nifti1 import Nifti1PairHeader

from .. import signals
from ..errors import OutputExistsError, ShapeError, VolumeError
from ..geometry import Geometry
from .base import FileWriter, Volume
from .nifti import (
    _UNITS_IN,
    Scaled,
    _check_shape,
    _placement,
    best_affine,
    header_details,
    output_header,
)
from .npy import check_dtype
from .paths import check_input_path
from .rawfile import RawArrayFile
from .tempfiles import place, temp_path


def pair_paths(path):
    """(header path, image path) of the pair ``path`` names (either file, any case)."""
    stem, ext = os.path.splitext(path)
    hdr, img = (".HDR", ".IMG") if ext.isupper() else (".hdr", ".img")
    return stem + hdr, stem + img


def open_volume(spec, header_only=False, tmp_dir=None) -> Volume:
    hdr_path, img_path = pair_paths(spec.path)
    check_input_path(hdr_path, hdr_path)
    try:
        img = nib.load(hdr_path)
        header = img.header
        shape = tuple(int(n) for n in img.shape)
        dtype = header.get_data_dtype()
        offset = int(img.dataobj.offset)
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    except Exception as exc:  # nibabel raises many types for bad headers
        raise VolumeError(f"{hdr_path}: not a valid Analyze or NIfTI-1 pair header "
                          f"({exc})") from None
    check_dtype(dtype, hdr_path)
    _check_shape(shape, hdr_path)
    affine, unit = _placement_of(img, hdr_path)
    geometry = Geometry(affine, (unit,) * 3, header, "affine")
    if isinstance(header, nib.Nifti1Header):
        details, text = header_details(header, slope, inter)
    else:
        details, text = ({} if slope == 1 and inter == 0 else
                         {"scaling": {"slope": slope, "intercept": inter}}), {}
    if header_only:
        array = _HeaderOnlyScaled(shape, dtype, slope, inter)
    else:
        check_input_path(img_path, img_path)
        array = RawArrayFile(img_path, offset, shape, dtype, fortran_order=True)
        if os.path.getsize(img_path) < offset + math.prod(shape) * np.dtype(dtype).itemsize:
            raise VolumeError(f"{img_path}: file is truncated: the header {hdr_path} says "
                              f"{shape} {dtype}")
        if not (slope == 1 and inter == 0):
            array = Scaled(array, slope, inter)
    return Volume(spec, array, geometry, axes="channels_last", split_order=(2, 1, 0),
                  details=details, details_text=text)


class _HeaderOnlyScaled:
    """Shape and the dtype reads would have (float32 when the header scales)."""

    def __init__(self, shape, dtype, slope, inter):
        self.shape = shape
        self.dtype = np.dtype(dtype) if (slope == 1 and inter == 0) else np.dtype(np.float32)

    def __getitem__(self, idx):
        raise RuntimeError("volume opened with header_only=True")


def _placement_of(img, where):
    """(affine, unit) of a pair: the NIfTI rules for ``ni1``, nibabel's for Analyze."""
    header = img.header
    if isinstance(header, nib.Nifti1Header):
        try:
            unit = _UNITS_IN.get(header.get_xyzt_units()[0])
        except Exception:  # a units code nibabel does not know
            unit = None
        return best_affine(header, where), unit
    affine = np.asarray(img.affine, dtype=np.float64)
    if not (np.all(np.isfinite(affine)) and np.linalg.matrix_rank(affine[:3, :3]) == 3):
        zooms = [float(z) for z in header.get_zooms()[:3]]
        raise VolumeError(f"{where}: the voxel sizes {zooms} are not usable (NaN, infinite "
                          "or zero)")
    return affine, "millimeter"  # Analyze 7.5 voxel sizes are millimetres


def create_pair(hdr_tmp, img_tmp, shape, dtype, geometry, description):
    """The NIfTI-1 pair header at ``hdr_tmp``, zeroed voxels at ``img_tmp`` (written by region)."""
    affine, source, unit = _placement(geometry)
    if source is not None and not isinstance(source, nib.Nifti1Header):
        source = None
    series = bool(getattr(geometry, "series", False)) and len(shape) == 4
    header = Nifti1PairHeader.from_header(
        output_header(shape, dtype, affine, source, description, unit or "mm", series))
    header.set_data_offset(0)
    with open(hdr_tmp, "xb") as fh:
        header.write_to(fh)
    with open(img_tmp, "xb") as fh:
        fh.truncate(math.prod(shape) * np.dtype(dtype).itemsize)
    return RawArrayFile(img_tmp, 0, shape, header.get_data_dtype(), fortran_order=True,
                        writable=True)


class Writer(FileWriter):
    """A NIfTI-1 pair ``(X, Y, Z[, C])``, channels last: ``.img`` voxels, ``.hdr`` header."""

    parallel_writes = True

    def __init__(self, spec, *, shape, dtype, geometry=None, description="", overwrite=False,
                 inputs=(), resume=False, **_):
        if len(shape) > 4:
            raise ShapeError(f"OUTPUT {spec}: an Analyze/NIfTI pair holds one volume "
                             f"(X, Y, Z[, C]); this output has shape {tuple(shape)}")
        self.hdr_path, self.img_path = pair_paths(spec.path)
        folder = os.path.dirname(os.path.abspath(spec.path))
        self._tmp_hdr = temp_path(folder, os.path.basename(self.hdr_path))

        def create(tmp):
            return create_pair(self._tmp_hdr, tmp, shape, dtype, geometry, description)
        super().__init__(spec, shape, dtype, create, overwrite, inputs, resume,
                         name=os.path.basename(self.img_path))

    @classmethod
    def _check_existing(cls, spec, overwrite):
        for path in pair_paths(spec.path):
            if os.path.exists(path) and not overwrite:
                raise OutputExistsError(f"OUTPUT {path} exists; pass --overwrite to replace it")

    @classmethod
    def check(cls, spec, overwrite=False, inputs=(), resume=False):
        super().check(spec, overwrite, inputs, resume)
        mine = [p for p in pair_paths(spec.path) if os.path.exists(p)]
        for other in inputs:
            other = getattr(other, "spec", other)
            theirs = pair_paths(other.path) if other.format == "analyze" else (other.path,)
            if any(os.path.exists(t) and os.path.samefile(m, t) for m in mine for t in theirs):
                raise VolumeError(f"OUTPUT {spec} is the input file {other}; write to "
                                  "another file")

    @classmethod
    def output_axes(cls, geometry=None):
        return "channels_last"

    def commit(self):
        """Put the voxels in place, then the header that describes them."""
        self._close()
        what = f"OUTPUT {self.spec}"
        with signals.shielded():
            place(self._tmp, self.img_path, self.overwrite, what)
            place(self._tmp_hdr, self.hdr_path, self.overwrite, what)
            self.committed = True

    def _temporary_files(self):
        return [self._tmp, getattr(self, "_tmp_hdr", None)]
