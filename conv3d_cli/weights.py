"""Layer weights from ``.npz`` / ``.npy`` files, and back. Never unpickles."""

from __future__ import annotations

import lzma
import math
import os
import zipfile
import zlib

import numpy as np
from numpy.lib import format as npformat

from .errors import WeightsError
from .io.paths import check_input_path
from .layers.args import BFLOAT16

MAX_HEADER_BYTES = 1 << 20
# What reading a corrupt .npz member can raise.
_CORRUPT = (OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, RuntimeError,
            NotImplementedError, ValueError)


def load_weights(path, max_bytes=None):
    """``{"kernel": array, "bias": array or None}`` from a ``.npz``, ``.npy`` or NIfTI file.

    A ``.npz`` holds ``kernel`` and optionally ``bias`` (``arr_0`` / ``arr_1``,
    as ``np.savez(*layer.get_weights())`` writes, are accepted too); a
    ``.npy`` holds the kernel alone: 5-D in Keras layout, or a 3-D kernel
    image. A kernel image (3-D ``.npy`` (kd, kh, kw), or NIfTI (X, Y, Z) as
    fslmaths ``-kernel file`` reads it) is a one-filter, one-channel kernel
    ``(kd, kh, kw, 1, 1)``, applied as stored: Conv3D correlates with it
    (``out[i] = sum_k in[i + k - c] w[k]``), as fslmaths does; Convert3D's
    ``-conv`` convolves (mirrors the kernel), so flip an asymmetric one to
    match it.

    Each array's header is read first: the dtype must be real numbers
    (nothing is unpickled) and the declared sizes together must fit
    ``max_bytes`` (a few compressed megabytes can declare gigabytes) before
    any data is read.
    """
    path = os.fspath(path)
    where = f"--weights {path}"
    check_input_path(path, where, WeightsError)
    low = path.lower()
    if low.endswith((".nii", ".nii.gz")):
        return {"kernel": _nifti_kernel(path, max_bytes), "bias": None}
    if low.endswith(".npy"):
        with _open(path, where) as fh:
            header = _header(fh, where, "kernel")
            _check_size([header], where, max_bytes)
            kernel = _read_array(fh, header, where, "kernel")
        return {"kernel": _kernel_array(kernel, path), "bias": None}
    if not low.endswith(".npz"):
        raise WeightsError(
            f"{where}: expected a .npz (kernel, bias) or .npy (kernel) file, or a "
            "NIfTI kernel image (.nii, .nii.gz)")
    if not zipfile.is_zipfile(path):
        raise WeightsError(f"{where}: not a zip archive (a .npz is a zip of .npy files, "
                           "as numpy.savez writes)")
    try:
        with zipfile.ZipFile(path) as z:
            members = _members(z, where)
            picked = _pick(members, where)
            headers = {}
            for label, info in picked.items():
                with z.open(info) as fh:
                    headers[label] = _header(fh, where, label)
            _check_size(headers.values(), where, max_bytes)
            arrays = {}
            for label, info in picked.items():
                with z.open(info) as fh:
                    _header(fh, where, label)
                    arrays[label] = _read_array(fh, headers[label], where, label)
    except WeightsError:
        raise
    except _CORRUPT as exc:
        raise WeightsError(f"{where}: corrupt or truncated ({exc})") from None
    return {"kernel": arrays["kernel"], "bias": arrays.get("bias")}


def _open(path, where):
    try:
        return open(path, "rb")
    except OSError as exc:
        raise WeightsError(f"{where}: cannot be read ({exc.strerror})") from None


def _members(z, where):
    """{array name: ZipInfo} of the archive's ``.npy`` members."""
    members = {}
    for info in z.infolist():
        if info.flag_bits & 0x1:
            raise WeightsError(f"{where}: archive member {info.filename} is encrypted; "
                               "numpy.savez does not encrypt")
        name = info.filename
        members[name[:-4] if name.endswith(".npy") else name] = info
    return members


def _pick(members, where):
    """{"kernel": info, "bias": info} by numpy.savez's names."""
    names = list(members)
    if "kernel" in names:
        keys = {"kernel": "kernel", "bias": "bias"}
    elif "arr_0" in names and set(names) <= {"arr_0", "arr_1"}:
        keys = {"kernel": "arr_0", "bias": "arr_1"}
    else:
        shown = ", ".join(n[:60] for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise WeightsError(
            f"{where}: expected arrays named 'kernel' and optionally "
            f"'bias'; the file holds: {shown or 'nothing'}")
    return {label: members[key] for label, key in keys.items() if key in members}


def _header(fh, where, name):
    """(shape, fortran order, dtype) of the .npy stream ``fh``, positioned at its data."""
    try:
        version = npformat.read_magic(fh)
        read = npformat.read_array_header_1_0 if version == (1, 0) else \
            npformat.read_array_header_2_0
        shape, fortran, dtype = read(fh, max_header_size=MAX_HEADER_BYTES)
    except Exception as exc:  # the header is parsed as a Python literal: any parse error
        raise WeightsError(f"{where}: '{name}' is not a valid .npy array ({exc})") from None
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise WeightsError(f"{where}: '{name}' is not a valid .npy array (negative dimension "
                           f"in {shape})")
    if dtype.hasobject:
        raise WeightsError(f"{where}: '{name}' holds pickled objects, which are refused")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise WeightsError(f"{where}: '{name}' must hold real numbers, got dtype {dtype}")
    return shape, fortran, dtype


def _check_size(headers, where, max_bytes):
    declared = sum(math.prod(shape) * dtype.itemsize for shape, _, dtype in headers)
    if max_bytes is not None and declared > max_bytes:
        arrays = " and ".join(f"{shape} {dtype}" for shape, _, dtype in headers)
        raise WeightsError(
            f"{where}: the arrays ({arrays}) take {declared / (1 << 20):.0f} MiB, more than "
            f"the memory limit of {max_bytes / (1 << 20):.0f} MiB (--memory-limit)")


def _read_array(fh, header, where, name):
    """The data after the header, exactly as many bytes as the header declares."""
    shape, fortran, dtype = header
    count = math.prod(shape)
    data = fh.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise WeightsError(f"{where}: '{name}' is truncated: its header says {shape} {dtype}")
    a = np.frombuffer(data, dtype=dtype, count=count)
    return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)


def _kernel_array(a, path):
    """A .npy kernel: 5-D as it is, a 3-D kernel image as (kd, kh, kw, 1, 1)."""
    a = _real(a, path, "kernel")
    if a.ndim == 3:
        return a.reshape(a.shape + (1, 1))
    if a.ndim != 5:
        raise WeightsError(f"--weights {path}: expected a 5-D Keras kernel (kd, kh, kw, in, out) "
                           f"or a 3-D kernel image (kd, kh, kw); got shape {a.shape}")
    return a


def _nifti_kernel(path, max_bytes=None):
    """A NIfTI kernel image (X, Y, Z), scaled by scl_slope/scl_inter, in voxel order as
    stored; the size its header declares is checked against ``max_bytes`` first."""
    import nibabel as nib
    where = f"--weights {path}"
    try:
        img = nib.load(path)
        declared = (tuple(int(n) for n in img.shape), False, np.dtype(img.get_data_dtype()))
        _check_size([declared], where, max_bytes)
        data = np.asanyarray(img.dataobj)
    except WeightsError:
        raise
    except Exception as exc:  # nibabel raises many types for bad files
        raise WeightsError(f"{where}: not a valid NIfTI file ({exc})") from None
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:  # (X, Y, Z, 1): one volume
        data = data[..., 0]
    if data.ndim != 3:
        raise WeightsError(f"{where}: a NIfTI kernel image must be 3-D (X, Y, Z); "
                           f"got shape {shape}")
    data = _real(np.asarray(data), path, "kernel")
    return data.reshape(data.shape + (1, 1))


def _real(a, path, name):
    if a.dtype.hasobject or a.dtype.kind not in "biuf":
        raise WeightsError(
            f"--weights {path}: '{name}' must hold real numbers, got dtype {a.dtype}")
    return a


def save_weights(path, kernel, bias=None, overwrite=True):
    """Write ``kernel`` and ``bias`` to ``path`` (.npz) atomically."""
    staged = stage_weights(path, kernel, bias, overwrite)
    try:
        staged.commit()
    except BaseException:
        staged.abort()
        raise


def check_weights_path(path, overwrite=True):
    """A :class:`~conv3d_cli.io.tempfiles.StagedFile` for ``--save-weights path`` (checked now)."""
    from .io.tempfiles import StagedFile
    path = os.fspath(path)
    if not path.lower().endswith(".npz"):
        raise WeightsError(f"--save-weights {path}: expected a .npz file name")
    return StagedFile(path, overwrite, f"--save-weights {path}")


def stage_weights(path_or_staged, kernel, bias=None, overwrite=True):
    """Write the .npz under its temporary name; ``commit()`` the result to put it in place."""
    staged = path_or_staged if hasattr(path_or_staged, "commit") else \
        check_weights_path(path_or_staged, overwrite)
    arrays = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    # .npz has no bfloat16 type (it would store raw 2-byte voids): bfloat16
    # weights are written as float32, which holds each of them exactly.
    arrays = {k: v.astype(np.float32) if v.dtype == BFLOAT16 else v for k, v in arrays.items()}
    try:
        with staged.open("wb") as fh:
            np.savez(fh, **arrays)
    except BaseException:
        staged.abort()
        raise
    return staged
