"""``.npy`` volumes, read and written region by region; never unpickles.

A ``.npy`` has no geometry; a C-ordered file stores its first spatial axis
slowest, a Fortran-ordered one its last.
"""

from __future__ import annotations

import os

import numpy as np
from numpy.lib import format as npformat

from ..errors import VolumeError
from .base import FileWriter, Volume
from .paths import check_input_path
from .rawfile import RawArrayFile


def check_dtype(dtype, where):
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise VolumeError(f"{where}: object arrays are refused (they would need unpickling)")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise VolumeError(f"{where}: expected real numbers (integer or float), got dtype {dtype}")
    return dtype


def open_npy(path) -> RawArrayFile:
    check_input_path(path, path)
    try:
        with open(path, "rb") as fh:
            version = npformat.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(fh, max_header_size=1 << 20)
            else:
                shape, fortran, dtype = npformat.read_array_header_2_0(fh, max_header_size=1 << 20)
            offset = fh.tell()
    except FileNotFoundError:
        raise VolumeError(f"{path}: no such file") from None
    except Exception as exc:  # the header is parsed as a Python literal: any parse error
        raise VolumeError(f"{path}: not a valid .npy file ({exc})") from None
    check_dtype(dtype, path)
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise VolumeError(f"{path}: not a valid .npy file (negative dimension in {shape})")
    arr = RawArrayFile(path, offset, shape, dtype, fortran_order=fortran)
    if os.path.getsize(path) < offset + arr.nbytes:
        raise VolumeError(f"{path}: file is truncated: header says {tuple(shape)} {dtype} "
                          f"({offset + arr.nbytes} bytes) but the file has {os.path.getsize(path)}")
    return arr


def create_npy(path, shape, dtype) -> RawArrayFile:
    """A new zero-filled (sparse) .npy of ``shape``, writable region by region."""
    mm = npformat.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=tuple(shape))
    offset = mm.offset
    del mm  # nothing was touched: the file is sparse until regions are written
    return RawArrayFile(path, offset, shape, dtype, writable=True)


def open_volume(spec, header_only=False, tmp_dir=None) -> Volume:
    array = open_npy(spec.path)
    return Volume(spec, array, split_order=(2, 1, 0) if array.fortran_order else (0, 1, 2))


class Writer(FileWriter):
    """A ``.npy`` written by region; forked and Dask workers write their own regions."""

    parallel_writes = True

    def __init__(self, spec, *, shape, dtype, overwrite=False, inputs=(), resume=False, **_):
        super().__init__(spec, shape, dtype, lambda tmp: create_npy(tmp, shape, dtype),
                         overwrite, inputs, resume)
