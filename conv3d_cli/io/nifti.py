"""NIfTI-1/2 volumes (``.nii``, ``.nii.gz``) through nibabel's headers.

Voxel data are accessed region by region as a Fortran-ordered
:class:`~conv3d_cli.io.rawfile.RawArrayFile` at the header's data offset, so
an uncompressed ``.nii`` of any size is read and written with bounded memory.
A ``.nii.gz`` cannot be read at random offsets: it is first decompressed, as
a stream, to a temporary ``.nii`` (disk, not memory, holds the volume), and a
``.nii.gz`` output is written as a temporary ``.nii`` and compressed as a
stream at the end.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile

import nibabel as nib
import numpy as np

from ..errors import VolumeError
from .npy import check_dtype
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


def _decompress(path, folder, limit):
    """Stream ``path`` (.nii.gz) into a temporary .nii in ``folder``; its path.

    Only the first ``limit`` bytes (header, extensions and voxels, as the
    header says) are written: whatever the stream holds beyond them is never
    read, so a small .nii.gz cannot fill the disk.
    """
    folder = folder or default_tmp_dir()
    remove_stale(folder)
    free = _free_bytes(folder)
    if free is not None and free < limit:
        raise VolumeError(f"{path}: decompressing it needs {limit} bytes in {folder}, which has "
                          f"{free} free; choose another folder with --tmp-dir or CONV3D_TMPDIR")
    name = os.path.basename(path)
    tmp = temp_path(folder, name[:-3] if name.lower().endswith(".gz") else name)
    log.info("decompressing %s to %s (%d bytes)", path, tmp, limit)
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            left = limit
            while left > 0:
                chunk = src.read(min(16 << 20, left))
                if not chunk:
                    break
                dst.write(chunk)
                left -= len(chunk)
    except (OSError, EOFError) as exc:
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
    if not os.path.exists(path):
        raise VolumeError(f"{path}: no such file")
    try:
        img = nib.load(path)
        header = img.header
        shape = tuple(int(n) for n in img.shape)
        dtype = header.get_data_dtype()
        # The array proxy knows where the data really start (a header's
        # vox_offset may read 0) and the effective scaling.
        offset = int(img.dataobj.offset)
        slope, inter = float(img.dataobj.slope), float(img.dataobj.inter)
    except Exception as exc:  # nibabel raises many types for bad headers
        raise VolumeError(f"{path}: not a valid NIfTI file ({exc})") from None
    check_dtype(dtype, path)
    if not 3 <= len(shape) <= 4:
        raise VolumeError(f"{path}: expected a NIfTI image of 3 or 4 dimensions (X, Y, Z[, C]), "
                          f"got shape {shape}")
    if header_only and path.lower().endswith(".gz"):
        return HeaderOnly(shape, dtype), img, np.asarray(img.affine, dtype=np.float64), None
    arr = RawArrayFile(path, offset, shape, dtype, fortran_order=True)
    tmp = _decompress(path, tmp_dir, offset + arr.nbytes) if path.lower().endswith(".gz") else None
    data_path = tmp or path
    arr = RawArrayFile(data_path, offset, shape, dtype, fortran_order=True)
    if os.path.getsize(data_path) < offset + arr.nbytes:
        if tmp:
            os.unlink(tmp)
        raise VolumeError(f"{path}: file is truncated: the header says {shape} {dtype}")
    if not (slope == 1 and inter == 0):
        arr = Scaled(arr, slope, inter)
    return arr, img, np.asarray(img.affine, dtype=np.float64), tmp


def create_nifti(path, shape, dtype, affine, like=None, description=""):
    """A new uncompressed NIfTI at ``path`` with ``affine``; data written by region."""
    if like is not None and isinstance(like.header, nib.Nifti2Header):
        header = nib.Nifti2Header.from_header(like.header)
    elif like is not None:
        header = nib.Nifti1Header.from_header(like.header)
    else:
        header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.dtype(dtype))
    sform_code = int(like.header["sform_code"]) if like is not None else 1
    qform_code = int(like.header["qform_code"]) if like is not None else 1
    header.set_sform(affine, code=sform_code or 1)
    header.set_qform(affine, code=qform_code or 1)
    header.set_slope_inter(np.nan, np.nan)
    header["descrip"] = description[:79].encode()
    header.set_xyzt_units(*(like.header.get_xyzt_units() if like is not None else ("mm", "sec")))
    offset = header.single_vox_offset if hasattr(header, "single_vox_offset") else 352
    header.set_data_offset(offset)
    with open(path, "wb") as fh:
        header.write_to(fh)
        fh.write(b"\0" * (offset - fh.tell()))
        fh.truncate(offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return RawArrayFile(path, offset, shape, header.get_data_dtype(), fortran_order=True,
                        writable=True)


def gzip_file(src, dst):
    with open(src, "rb") as fin, gzip.open(dst, "wb", compresslevel=6) as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
