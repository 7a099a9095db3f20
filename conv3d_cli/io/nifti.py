"""NIfTI-1/2 volumes (``.nii``, ``.nii.gz``) through nibabel's headers.

Voxel data are accessed region by region as a Fortran-ordered
:class:`~conv3d_cli.io.rawfile.RawArrayFile` at the header's data offset, so
an uncompressed ``.nii`` of any size is read and written with bounded memory.
A ``.nii.gz`` cannot be read at random offsets: it is first decompressed, as
a stream, to a temporary ``.nii`` (disk, not memory, holds the volume), and a
``.nii.gz`` output is written as a temporary ``.nii`` and compressed as a
stream at the end.

Geometry: the voxel-to-world affine by the rules of :func:`best_affine`, the
spatial unit of ``xyzt_units`` (unknown read as millimetres, as FSL and
nibabel take it), and the header itself, which an output copies
(:func:`create_nifti`). The image is ``(X, Y, Z[, C])`` whatever the layer's
data_format, stored in Fortran order (X fastest).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import zlib

import nibabel as nib
import numpy as np
from nibabel.nifti1 import extension_codes, xform_codes
from nibabel.volumeutils import native_code

from ..errors import ShapeError, VolumeError
from ..geometry import UNIT_METERS, Geometry
from ..progress import phase
from . import gzipio
from .base import FileWriter, Volume
from .npy import check_dtype
from .paths import check_input_path
from .rawfile import RawArrayFile
from .tempfiles import remove_stale, temp_path

log = logging.getLogger("conv3d_cli")



class Scaled:
    """Applies NIfTI's ``scl_slope`` / ``scl_inter`` on read."""

    def __init__(self, array, slope, inter):
        self.array, self.slope, self.inter = array, slope, inter
        self.shape = array.shape
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, idx):
        return self.array[idx].astype(np.float32) * np.float32(self.slope) + np.float32(self.inter)


class HeaderOnly:
    """Shape and dtype of a volume whose voxels were not made readable."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)

    def __getitem__(self, idx):
        raise RuntimeError("volume opened with header_only=True")


def _decompress(path, folder, limit, offset=0, name=None):
    """Stream ``path`` (.nii.gz; gzip data from byte ``offset``) into a temporary
    file in ``folder``; its path. Messages name the file ``name`` (default ``path``).

    Only the first ``limit`` bytes (header, extensions and voxels, as the
    header says) are written: whatever the stream holds beyond them is never
    read, so a small .nii.gz cannot fill the disk.
    """
    data_path, path = path, name or path
    folder = folder or default_tmp_dir()
    remove_stale(folder)
    free = _free_bytes(folder)
    if free is not None and free < limit:
        raise VolumeError(f"{path}: decompressing it needs {limit} bytes in {folder}, which has "
                          f"{free} free; choose another folder with --tmp-dir or CONV3D_TMPDIR")
    # Named apart from an output of the same name in the same folder (make batch
    # writes OUT/scan.nii.gz from IN/scan.nii.gz and decompresses beside it).
    tmp = temp_path(folder, os.path.basename(path) + ".decompressed")
    log.info("decompressing %s to %s (%d bytes)", path, tmp, limit)
    try:
        with phase("decompress", limit, desc="decompressing") as bar:
            gzipio.decompress_file(data_path, tmp, limit, progress=bar.update, offset=offset)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        _unlink(tmp)
        raise VolumeError(f"{path}: corrupt or truncated gzip data, or {folder} is not "
                          f"writable ({exc})") from None
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def default_tmp_dir():
    """CONV3D_TMPDIR, else the system's temporary folder."""
    return os.environ.get("CONV3D_TMPDIR") or tempfile.gettempdir()


def _free_bytes(folder):
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def open_nifti(path, header_only=False, tmp_dir=None):
    """(array, image header object, affine, temporary file or None).

    A .nii.gz is decompressed into ``tmp_dir`` (default: :func:`default_tmp_dir`)."""
    check_input_path(path, path)
    try:
        img = nib.load(path)
        header = img.header
        # dim[0] = 0 (no dimensions) reads as shape (0,) in nibabel.
        shape = tuple(int(n) for n in img.shape) if int(header["dim"][0]) else ()
        dtype = header.get_data_dtype()
        # The array proxy knows where the data really start (a header's
        # vox_offset may read 0) and the effective scaling.
        offset = int(img.dataobj.offset)
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    except Exception as exc:  # nibabel raises many types for bad headers
        raise VolumeError(f"{path}: not a valid NIfTI file ({exc})") from None
    if not isinstance(header, nib.Nifti1Header):
        raise VolumeError(f"{path}: not a NIfTI-1 or NIfTI-2 image ({type(img).__name__})")
    check_dtype(dtype, path)
    _check_shape(shape, path)
    affine = best_affine(header, path)
    if header_only and path.lower().endswith(".gz"):
        # The dtype reads would have: float32 where the header scales (see Scaled).
        shown = dtype if (slope == 1 and inter == 0) else np.float32
        return HeaderOnly(shape, shown), img, affine, None
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    tmp = _decompress(path, tmp_dir, offset + nbytes) if path.lower().endswith(".gz") else None
    data_path = tmp or path
    arr = RawArrayFile(data_path, offset, shape, dtype, fortran_order=True, name=path)
    if os.path.getsize(data_path) < offset + arr.nbytes:
        if tmp:
            os.unlink(tmp)
        raise VolumeError(f"{path}: file is truncated: the header says {shape} {dtype}")
    if not (slope == 1 and inter == 0):
        arr = Scaled(arr, slope, inter)
    return arr, img, affine, tmp


# xyzt_units -> the geometry's unit names; "unknown" is read as millimetres.
_UNITS_IN = {"meter": "meter", "mm": "millimeter", "micron": "micrometer",
             "unknown": "millimeter"}
_UNITS_OUT = {"meter": "meter", "millimeter": "mm", "micrometer": "micron"}


def open_volume(spec, header_only=False, tmp_dir=None) -> Volume:
    array, img, affine, tmp = open_nifti(spec.path, header_only=header_only, tmp_dir=tmp_dir)
    try:
        unit = _UNITS_IN.get(img.header.get_xyzt_units()[0])
    except Exception:  # a units code nibabel does not know
        unit = None
    geometry = Geometry(affine, (unit,) * 3, img.header, "affine")
    details, text = header_details(img.header, float(img.dataobj.slope),
                                   float(img.dataobj.inter))
    return Volume(spec, array, geometry, axes="channels_last", split_order=(2, 1, 0),
                  temp_files=[tmp] if tmp else [], details=details, details_text=text)


def header_details(header, slope=1.0, inter=0.0):
    """``conv3d info``'s fields of a header: the orientation codes, the header
    extensions (code, name, size on disk, copied or not), the scaling reads apply
    (nibabel keeps it in the image's data proxy: ``slope``, ``inter``) and a 4-D
    series' TR; and each field as text."""
    extensions = [{"code": int(e.get_code()), "name": _label(extension_codes, e.get_code()),
                   "bytes": int(e.get_sizeondisk()), "copied_to_outputs": is_copied(e)}
                  for e in header.extensions]
    details = {"sform_code": int(header["sform_code"]),
               "qform_code": int(header["qform_code"]), "extensions": extensions}
    if not (slope == 1 and inter == 0):
        details["scaling"] = {"slope": float(slope), "intercept": float(inter)}
    try:
        time_unit = header.get_xyzt_units()[1]
    except Exception:  # a units code nibabel does not know
        time_unit = "unknown"
    # A 4th axis is a series only if the header gives it a time unit: this
    # tool's own outputs keep their filters there, with the unit cleared.
    if int(header["dim"][0]) == 4 and time_unit in ("sec", "msec", "usec"):
        details["tr"] = float(header["pixdim"][4])
        details["tr_unit"] = time_unit
    text = {key: f"{details[key]} ({_label(xform_codes, details[key])})"
            for key in ("sform_code", "qform_code")}
    text["extensions"] = ", ".join(
        f"{e['name']} (code {e['code']}, {e['bytes']} bytes"
        f"{'' if e['copied_to_outputs'] else ', not copied to outputs'})"
        for e in extensions) or "none"
    return details, text


def _label(codes, code):
    try:
        return codes.label[int(code)]
    except KeyError:
        return "unknown"


def _check_shape(shape, path):
    if len(shape) not in (3, 4):
        rank = ("no dimensions" if not shape else
                f"{len(shape)} dimension{'s' if len(shape) > 1 else ''}")
        raise VolumeError(f"{path}: expected a NIfTI image of 3 or 4 dimensions (X, Y, Z[, C]); "
                          f"this one has {rank}, shape {shape}")
    if min(shape) < 1:
        raise VolumeError(f"{path}: the image is empty: shape {shape}")


# Which voxel-to-world matrix places the voxels.
#
# NIfTI readers (nibabel's get_best_affine, FSL, the NIfTI reference library)
# use the sform when sform_code > 0, else the qform when qform_code > 0, else
# the voxel sizes pixdim[1:4] alone (nibabel centres that grid on the origin).
# A coded matrix that cannot place voxels (NaN or infinite entries, or a
# singular 3x3 part) is not used: an unusable sform gives way to a usable
# qform, and with neither usable the file is refused.

def _usable(matrix):
    m = np.asarray(matrix, dtype=np.float64)
    return bool(np.all(np.isfinite(m))) and np.linalg.matrix_rank(m[:3, :3]) == 3


def _coded_form(header, form):
    """The ``form`` ('sform' or 'qform') matrix if its code is set and it is usable, else None."""
    if not int(header[f"{form}_code"]):
        return None
    try:
        matrix = header.get_sform() if form == "sform" else header.get_qform()
    except Exception:  # e.g. a quaternion nibabel cannot complete
        return None
    return np.asarray(matrix, dtype=np.float64) if _usable(matrix) else None


def best_affine(header, path):
    """The voxel-to-world matrix of a NIfTI header, by the rules above."""
    for form in ("sform", "qform"):
        matrix = _coded_form(header, form)
        if matrix is not None:
            return matrix
    scode, qcode = int(header["sform_code"]), int(header["qform_code"])
    if scode and qcode:
        raise VolumeError(f"{path}: the sform (sform_code {scode}) and the qform (qform_code "
                          f"{qcode}) are not usable (NaN, infinite or singular)")
    if scode:
        raise VolumeError(f"{path}: the sform (sform_code {scode}) is not usable (NaN, infinite "
                          "or singular) and qform_code is 0: there is no other orientation")
    if qcode:
        raise VolumeError(f"{path}: the qform (qform_code {qcode}) is not usable (NaN, infinite "
                          "or singular) and sform_code is 0: there is no other orientation")
    base = header.get_base_affine()
    if not _usable(base):
        zooms = [float(z) for z in header["pixdim"][1:4]]
        raise VolumeError(f"{path}: sform_code and qform_code are 0 and the voxel sizes "
                          f"pixdim[1:4] = {zooms} are not usable (NaN, infinite or zero)")
    return np.asarray(base, dtype=np.float64)


# AFNI's extension holds AFNI's own attributes of the dataset it was written
# for (grid, sub-brick labels and statistics, NIfTI_nums = dims and datatype);
# AFNI applies them over the header even when the dims no longer match, so it
# would misdescribe a convolved volume. Other extensions (comments, DICOM
# headers, ...) describe the acquisition and are copied byte for byte.
AFNI_ECODE = 4


def is_copied(extension):
    """Whether an input's header extension is copied to outputs."""
    return extension.get_code() != AFNI_ECODE


def copied_extensions(header):
    """The input's header extensions an output keeps."""
    return [e for e in header.extensions if is_copied(e)]


def create_nifti(path, shape, dtype, affine, header=None, description="", unit="mm",
                 series=False):
    """A new uncompressed NIfTI at ``path`` with ``affine``; data written by region.

    The header is :func:`output_header`'s.
    """
    header = output_header(shape, dtype, affine, header, description, unit, series)
    # The data follow the header and its extensions (each a multiple of 16 bytes).
    offset = header.single_vox_offset + int(header.extensions.get_sizeondisk())
    header.set_data_offset(offset)
    with open(path, "wb") as fh:
        header.write_to(fh)
        fh.write(b"\0" * (offset - fh.tell()))
        fh.truncate(offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return RawArrayFile(path, offset, shape, header.get_data_dtype(), fortran_order=True,
                        writable=True)


def output_header(shape, dtype, affine, header=None, description="", unit="mm", series=False):
    """The NIfTI header of an output of ``shape`` and ``dtype`` placed by ``affine``
    (``series``: its 4th axis is the input's series, whose TR it keeps).

    With ``header`` (the input's), ``affine`` is the output's voxel-to-world
    matrix by :func:`best_affine` of ``header``, and the output header is
    ``header``, native-endian, with both transforms moved the same way.
    Without, both transforms are ``affine`` (code 1, scanner) in ``unit``.
    """
    note = ""
    if header is not None:
        source = header
        header = _output_header(source, affine)
        if len(header.extensions) < len(source.extensions):
            note = "; AFNI extension dropped"
    else:
        header = nib.Nifti1Header()
        header.set_sform(affine, code=1)
        header.set_qform(affine, code=1)
        header.set_xyzt_units(unit)
    header.set_data_shape(shape)
    header.set_data_dtype(np.dtype(dtype))
    header.set_slope_inter(np.nan, np.nan)
    _clear_non_spatial(header, series)
    header["descrip"] = (description[:79 - len(note)] + note).encode()
    return header


def _output_header(src, affine):
    """``src``'s fields and kept extensions, native-endian, transforms moved to ``affine``."""
    klass = nib.Nifti2Header if isinstance(src, nib.Nifti2Header) else nib.Nifti1Header
    header = klass.from_header(src).as_byteswapped(native_code)
    header.extensions = klass.exts_klass(copied_extensions(src))
    # Output voxel -> input voxel: a per-axis scale and shift (conv3d_cli.geometry).
    m = np.linalg.solve(best_affine(src, "input"), np.asarray(affine, dtype=np.float64))
    sform, qform = _coded_form(src, "sform"), _coded_form(src, "qform")
    # Each coded transform is moved by m; its code stays as it is (0 stays 0).
    # One with code 0, or unusable (then written with code 0), gets ``affine``.
    for form, matrix, setter in (("sform", sform, header.set_sform),
                                 ("qform", qform, header.set_qform)):
        if matrix is None:
            setter(affine, code=0)
        else:
            setter(matrix @ m, code=int(src[f"{form}_code"]))
    if qform is None:
        # pixdim[1:4] are the voxel sizes readers use without a qform: the
        # input's, scaled as the grid is.
        scale = np.linalg.norm(m[:3, :3], axis=0)
        header["pixdim"][1:4] = np.abs(np.asarray(src["pixdim"][1:4], np.float64)) * scale
    return header


def _clear_non_spatial(header, series=False):
    """Reset what described the input's values and time axis, not the output's.

    The 4th axis holds the layer's filters (no time step, offset or slice
    timing), unless it is the input's series (``--per-volume``): then its step
    ``pixdim[4]``, time unit and ``toffset`` are kept."""
    if not series:
        header.set_xyzt_units(xyz=header.get_xyzt_units()[0], t="unknown")
        header["pixdim"][4] = 1
        header["toffset"] = 0
    header["pixdim"][5:] = 1
    for field in ("slice_code", "slice_start", "slice_end", "slice_duration"):
        header[field] = 0
    # A display window, statistic or intent of the input's values does not fit the output's.
    header["cal_min"] = header["cal_max"] = 0
    header.set_intent("none")


def gzip_file(src, dst, workers=None):
    """Compress ``src`` into a new ``dst`` (:func:`gzipio.compress_file`, on ``workers``
    threads), shown as the run's "compress" phase."""
    with phase("compress", os.path.getsize(src), desc="compressing") as bar:
        gzipio.compress_file(src, dst, threads=workers, progress=bar.update)


def _placement(geometry):
    """(affine, the input header to copy or None, xyzt unit) of an output of ``geometry``.

    A geometry from a NIfTI input brings its header; one of another format
    gets a new header in the unit of its axes (converted to millimetres where
    NIfTI has no name for it); one without world coordinates lies on its
    input's voxel grid (``to_source``).
    """
    geometry = geometry if geometry is not None else Geometry()
    if isinstance(geometry.header, nib.Nifti1Header):  # NIfTI-2 headers are a subclass
        return geometry.affine, geometry.header, None
    if geometry.affine is None:
        return geometry.to_source, None, "mm"
    units = geometry.units or (None,) * 3
    if len(set(units)) == 1 and units[0] in _UNITS_OUT:
        return geometry.affine, None, _UNITS_OUT[units[0]]
    if all(u in UNIT_METERS for u in units):  # e.g. nanometre axes: written in mm
        affine = np.array(geometry.affine)
        affine[:3, :3] *= [UNIT_METERS[u] / UNIT_METERS["millimeter"] for u in units]
        return affine, None, "mm"
    return geometry.affine, None, "mm"  # unknown units: NIfTI readers take mm


class Writer(FileWriter):
    """A NIfTI output: one volume ``(X, Y, Z[, C])``, channels last; ``.nii.gz``
    written uncompressed first and compressed by ``commit()``."""

    parallel_writes = True

    def __init__(self, spec, *, shape, dtype, geometry=None, description="", overwrite=False,
                 inputs=(), resume=False, workers=None, **_):
        if len(shape) > 4:
            raise ShapeError(f"OUTPUT {spec}: a NIfTI output holds one volume "
                             f"(X, Y, Z[, C]); this output has shape {tuple(shape)}")
        base = os.path.basename(spec.path)
        affine, header, unit = _placement(geometry)
        series = bool(getattr(geometry, "series", False)) and len(shape) == 4

        def create(tmp):
            return create_nifti(tmp, shape, dtype, affine, header, description, unit, series)
        super().__init__(spec, shape, dtype, create, overwrite, inputs, resume,
                         name=base[:-3] if spec.gzipped else base)
        self._tmp_gz = temp_path(self.folder, base) if spec.gzipped else None
        self._workers = workers

    @classmethod
    def output_axes(cls, geometry=None):
        return "channels_last"

    def _finish(self, tmp):
        if not self.spec.gzipped:
            return tmp
        gzip_file(tmp, self._tmp_gz, self._workers)
        os.unlink(tmp)
        return self._tmp_gz

    def _temporary_files(self):
        return [self._tmp, getattr(self, "_tmp_gz", None)]
