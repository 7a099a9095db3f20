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

MAX_HEADER_BYTES = 1 << 20
# What reading a corrupt .npz member can raise.
_CORRUPT = (OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, RuntimeError,
            NotImplementedError, ValueError)


def load_weights(path, max_bytes=None):
    """``{"kernel": array, "bias": array or None}`` from a ``.npz`` or ``.npy`` file.

    A ``.npz`` holds ``kernel`` and optionally ``bias`` (``arr_0`` / ``arr_1``,
    as ``np.savez(*layer.get_weights())`` writes, are accepted too); a
    ``.npy`` holds the kernel alone. Each array's header is read first: the
    dtype must be real numbers (nothing is unpickled) and the declared sizes
    together must fit ``max_bytes`` (a few compressed megabytes can declare
    gigabytes) before any data is read.
    """
    path = os.fspath(path)
    where = f"--weights {path}"
    check_input_path(path, where, WeightsError)
    low = path.lower()
    if low.endswith(".npy"):
        with open(path, "rb") as fh:
            header = _header(fh, where, "kernel")
            _check_size([header], where, max_bytes)
            return {"kernel": _read_array(fh, header, where, "kernel"), "bias": None}
    if not low.endswith(".npz"):
        raise WeightsError(f"{where}: expected a .npz (kernel, bias) or .npy (kernel) file")
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


def save_weights(path, kernel, bias=None):
    """Write ``kernel`` and ``bias`` to ``path`` (.npz) atomically."""
    path = os.fspath(path)
    if not path.lower().endswith(".npz"):
        raise WeightsError(f"--save-weights {path}: expected a .npz file name")
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.conv3d-{os.getpid()}.tmp")
    arrays = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
