"""Volumes in and out: ``.npy``, NIfTI, HDF5; atomic outputs.

``open_volume(spec)`` gives an :class:`InputVolume` whose ``array`` is read
region by region; ``OutputTarget(spec, overwrite)`` creates the output under
a temporary name and puts it in place only on ``commit()``, so a failed or
interrupted run leaves no partial file and never touches an existing one.
``read_volume`` / ``write_volume`` are the whole-array conveniences.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from .. import signals
from ..errors import OutputExistsError, VolumeError
from ..layers.args import is_float_dtype
from .dtypes import output_dtype
from .npy import create_npy, open_npy
from .paths import VolumeSpec, check_input_path, parse_spec, refuse_input
from .tempfiles import FolderLock, check_writable_dir, place, remove_stale, temp_path

# The HDF5 (h5py), NIfTI (nibabel) and Zarr modules are imported where a file of
# their format is opened: each library costs more to import than NumPy.

log = logging.getLogger("conv3d_cli")

__all__ = ["open_volume", "OutputTarget", "read_volume", "write_volume", "parse_spec",
           "VolumeSpec", "InputVolume"]


@dataclass
class InputVolume:
    spec: VolumeSpec
    array: object
    affine: np.ndarray | None = None
    image: object = None  # the nibabel image (header) of a NIfTI input
    temp_files: list = field(default_factory=list)

    @property
    def shape(self):
        return tuple(self.array.shape)

    @property
    def dtype(self):
        return np.dtype(self.array.dtype)

    @property
    def is_nifti(self):
        return self.spec.format == "nifti"

    @property
    def is_ome(self):
        return getattr(self.array, "ome", None) is not None

    def close(self):
        close = getattr(self.array, "close", None) or getattr(getattr(self.array, "array", None), "close", None)
        if close:
            close()
        for path in self.temp_files:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.temp_files = []


def open_volume(spec, role="INPUT", header_only=False, tmp_dir=None) -> InputVolume:
    """Open a volume for region reads (``header_only``: shape, dtype, affine only).

    A ``.nii.gz`` is decompressed into ``tmp_dir`` (default: CONV3D_TMPDIR, else
    the system's temporary folder); the copy is removed by ``close()``.
    """
    if not isinstance(spec, VolumeSpec):
        spec = parse_spec(spec, role)
    check_input_path(spec.path, spec.path, directory=spec.format == "zarr")
    if spec.format == "npy":
        return InputVolume(spec, open_npy(spec.path))
    if spec.format == "hdf5":
        from .hdf5 import open_hdf5
        return InputVolume(spec, open_hdf5(spec.path, spec.dataset))
    if spec.format == "zarr":
        from .zarr_io import ZarrVolume
        return InputVolume(spec, ZarrVolume(spec.path, spec.dataset))
    from .nifti import open_nifti
    arr, img, affine, tmp = open_nifti(spec.path, header_only=header_only, tmp_dir=tmp_dir)
    return InputVolume(spec, arr, affine=affine, image=img, temp_files=[tmp] if tmp else [])


class OutputTarget:
    """An output volume written under a temporary name, then put in place by ``commit()``.

    The temporary file (``.NAME.conv3d-PID-START-HOST.tmp``, see
    :mod:`~conv3d_cli.io.tempfiles`) is beside OUTPUT. ``commit()`` renames it
    into place, and without ``overwrite`` refuses an OUTPUT that another
    process created meanwhile. An HDF5 dataset is always written into a new
    temporary file; committing it into an existing file copies it in (see
    :func:`~conv3d_cli.io.hdf5.copy_dataset_into`), with commits into files
    of one folder taking turns, so concurrent runs writing datasets of one
    file all keep theirs and no other dataset is touched.
    """

    def __init__(self, spec, overwrite=False, inputs=()):
        if not isinstance(spec, VolumeSpec):
            spec = parse_spec(spec, "OUTPUT")
        self.spec = spec
        self.overwrite = overwrite
        self.single_writer = spec.format == "hdf5"
        refuse_input(spec, inputs)
        if spec.format == "zarr":
            raise VolumeError(f"OUTPUT {spec}: Zarr outputs are written through "
                              "conv3d_cli.io.zarr_io.ZarrOutput")
        self.folder = os.path.dirname(os.path.abspath(spec.path))
        check_writable_dir(self.folder, f"OUTPUT {spec}")
        if os.path.isdir(spec.path):
            raise VolumeError(f"OUTPUT {spec} is a directory")
        if spec.format == "hdf5" and not self.dataset.strip("/"):
            raise VolumeError(f"OUTPUT {spec} names the file's root group; name a dataset "
                              "(file.h5:/group/name)")
        remove_stale(self.folder)
        if spec.format == "hdf5" and _has_hdf5_signature(spec.path):
            self._check_existing_hdf5()
        elif os.path.exists(spec.path) and not overwrite:
            what = "exists and is not an HDF5 file" if spec.format == "hdf5" else "exists"
            raise OutputExistsError(f"OUTPUT {spec} {what}; pass --overwrite to replace it")
        base = os.path.basename(spec.path)
        self._tmp = temp_path(self.folder, base[:-3] if spec.gzipped else base)
        self._tmp_gz = temp_path(self.folder, base) if spec.gzipped else None
        self._writer = None
        self.committed = False

    def _check_existing_hdf5(self):
        what = f"OUTPUT {self.spec.path}:{self.dataset}"
        from .hdf5 import existing_dataset
        found = existing_dataset(self.spec.path, self.dataset, what)
        if found == "group":
            raise VolumeError(f"{what} is a group, not a dataset; name a dataset (its members "
                              "are never replaced)")
        if found and not self.overwrite:
            raise OutputExistsError(f"{what} exists; pass --overwrite to replace it")

    @property
    def dataset(self):
        from .hdf5 import DEFAULT_DATASET
        return self.spec.dataset or DEFAULT_DATASET

    def create(self, shape, dtype, affine=None, like=None, description="", chunks=None,
               attrs=None):
        """The writable output array (region assignment)."""
        fmt = self.spec.format
        log.info("writing %s as %s", self.spec, self._tmp)
        if fmt == "npy":
            self._writer = create_npy(self._tmp, shape, dtype)
        elif fmt == "nifti":
            if affine is None:
                affine = np.eye(4)
            from .nifti import create_nifti
            self._writer = create_nifti(self._tmp, shape, dtype, affine, like, description)
        else:
            from .hdf5 import H5Writer
            self._writer = H5Writer(self._tmp, self.dataset, shape, dtype, chunks, attrs)
        return self._writer

    def commit(self):
        """Put the finished output in place (the only step that touches OUTPUT)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        what = f"OUTPUT {self.spec}"
        if self.spec.format == "hdf5":
            self._commit_hdf5(what)
            return
        tmp = self._tmp
        if self.spec.gzipped:
            from .nifti import gzip_file
            gzip_file(self._tmp, self._tmp_gz)
            os.unlink(self._tmp)
            tmp = self._tmp_gz
        with signals.shielded():  # a signal now comes after the rename, not between
            place(tmp, self.spec.path, self.overwrite, what)
            self.committed = True

    def _commit_hdf5(self, what):
        path = self.spec.path
        from .hdf5 import copy_dataset_into
        with FolderLock(self.folder):
            if _has_hdf5_signature(path):
                copy_dataset_into(self._tmp, self.dataset, path, self.overwrite,
                                  f"OUTPUT {path}:{self.dataset}")
                self.committed = True
                os.unlink(self._tmp)
                return
            if os.path.lexists(path) and not self.overwrite:
                raise OutputExistsError(f"{what} exists and is not an HDF5 file; pass "
                                        "--overwrite to replace it")
            with signals.shielded():
                place(self._tmp, path, True, what)
                self.committed = True

    def abort(self):
        """Remove what the run made; OUTPUT is untouched (unless committed). Returns what
        the user should know was kept or written, or None."""
        if self.committed:
            return f"OUTPUT {self.spec} was written"
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        for path in (self._tmp, self._tmp_gz):
            if path and os.path.exists(path):
                os.unlink(path)
        return None


def _has_hdf5_signature(path):
    from .hdf5 import has_hdf5_signature
    return has_hdf5_signature(path)


def read_volume(path):
    """The whole volume as a NumPy array (NIfTI scaling applied) and its affine or None."""
    vol = open_volume(path)
    try:
        data = np.asarray(vol.array[tuple(slice(None) for _ in vol.shape)])
        return data, vol.affine
    finally:
        vol.close()


def write_volume(path, array, affine=None, overwrite=False):
    """Write ``array`` to ``path`` (format from the extension), atomically.

    A float dtype the format cannot store (float16 in NIfTI, bfloat16
    anywhere) is written as float32, which holds it exactly."""
    array = np.asarray(array)
    spec = parse_spec(path, "OUTPUT")
    if is_float_dtype(array.dtype):
        array = array.astype(output_dtype(None, array.dtype.name, array.dtype, spec.format)[0],
                             copy=False)
    if spec.format == "zarr":
        from .zarr_io import ZarrOutput
        target = ZarrOutput(spec, overwrite=overwrite)
        try:
            target.prepare(array.shape, array.dtype, array.shape, {}, 3)
            target[tuple(slice(None) for _ in array.shape)] = array
            target.commit()
        except BaseException:
            target.abort(keep=False)
            raise
        return
    target = OutputTarget(spec, overwrite=overwrite)
    try:
        out = target.create(array.shape, array.dtype, affine=affine)
        out[tuple(slice(None) for _ in array.shape)] = array
        target.commit()
    except BaseException:
        target.abort()
        raise
