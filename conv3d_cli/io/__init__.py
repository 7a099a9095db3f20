"""Volumes in and out: ``.npy``, NIfTI, HDF5; atomic outputs.

``open_volume(spec)`` gives an :class:`InputVolume` whose ``array`` is read
region by region; ``OutputTarget(spec, overwrite)`` creates the output under
a temporary name and renames it into place only on ``commit()``, so a failed
or interrupted run leaves no partial file and never touches an existing one.
``read_volume`` / ``write_volume`` are the whole-array conveniences.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import OutputExistsError, VolumeError
from .hdf5 import DEFAULT_DATASET, H5Writer, open_hdf5
from .nifti import create_nifti, gzip_file, open_nifti
from .npy import create_npy, open_npy
from .paths import VolumeSpec, parse_spec, refuse_input

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


def open_volume(spec, role="INPUT", header_only=False) -> InputVolume:
    """Open a volume for region reads (``header_only``: shape, dtype, affine only)."""
    if not isinstance(spec, VolumeSpec):
        spec = parse_spec(spec, role)
    if spec.format == "npy":
        return InputVolume(spec, open_npy(spec.path))
    if spec.format == "hdf5":
        return InputVolume(spec, open_hdf5(spec.path, spec.dataset))
    if spec.format == "zarr":
        from .zarr_io import ZarrVolume
        return InputVolume(spec, ZarrVolume(spec.path, spec.dataset))
    arr, img, affine, tmp = open_nifti(spec.path, header_only=header_only)
    return InputVolume(spec, arr, affine=affine, image=img, temp_files=[tmp] if tmp else [])


class OutputTarget:
    """An output volume written under a temporary name, then renamed into place."""

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
        parent = os.path.dirname(os.path.abspath(spec.path))
        if not os.path.isdir(parent):
            raise VolumeError(f"OUTPUT {spec}: directory {parent} does not exist")
        self._in_existing_h5 = False
        if spec.format == "hdf5" and os.path.exists(spec.path):
            self._check_existing_hdf5()
        elif os.path.exists(spec.path) and not overwrite:
            raise OutputExistsError(f"OUTPUT {spec} exists; pass --overwrite to replace it")
        base = os.path.basename(spec.path)
        self._tmp = os.path.join(parent, f".{base}.conv3d-{os.getpid()}.tmp")
        self._tmp2 = None
        self._writer = None

    def _check_existing_hdf5(self):
        import h5py
        dataset = self.spec.dataset or DEFAULT_DATASET
        try:
            with h5py.File(self.spec.path, "r") as f:
                exists = dataset in f
        except OSError:
            if not self.overwrite:
                raise OutputExistsError(
                    f"OUTPUT {self.spec} exists and is not an HDF5 file; pass --overwrite "
                    "to replace it") from None
            return
        if exists and not self.overwrite:
            raise OutputExistsError(
                f"OUTPUT {self.spec.path}:{dataset} exists; pass --overwrite to replace it")
        self._in_existing_h5 = True

    @property
    def dataset(self):
        return self.spec.dataset or DEFAULT_DATASET

    def create(self, shape, dtype, affine=None, like=None, description="", chunks=None,
               attrs=None):
        """The writable output array (region assignment)."""
        fmt = self.spec.format
        if fmt == "npy":
            self._writer = create_npy(self._tmp, shape, dtype)
        elif fmt == "nifti":
            if affine is None:
                affine = np.eye(4)
            self._writer = create_nifti(self._tmp, shape, dtype, affine, like, description)
        else:
            if self._in_existing_h5:
                self._h5_temp_name = f"{self.dataset}.conv3d-{os.getpid()}.tmp"
                self._writer = H5Writer(self.spec.path, self._h5_temp_name, shape, dtype,
                                        chunks, attrs)
            else:
                self._writer = H5Writer(self._tmp, self.dataset, shape, dtype, chunks, attrs)
        return self._writer

    def commit(self):
        writer, self._writer = self._writer, None
        if self.spec.format == "hdf5" and self._in_existing_h5:
            f = writer.file
            if self.dataset in f:
                del f[self.dataset]
            f.move(self._h5_temp_name, self.dataset)
            writer.close()
            return
        if writer is not None:
            writer.close()
        if self.spec.format == "nifti" and self.spec.gzipped:
            self._tmp2 = self._tmp + ".gz"
            gzip_file(self._tmp, self._tmp2)
            os.replace(self._tmp2, self.spec.path)
            os.unlink(self._tmp)
            return
        os.replace(self._tmp, self.spec.path)

    def abort(self):
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                if self.spec.format == "hdf5" and self._in_existing_h5:
                    if self._h5_temp_name in writer.file:
                        del writer.file[self._h5_temp_name]
                writer.close()
            except Exception:
                pass
        for path in (self._tmp, self._tmp2):
            if path and os.path.exists(path):
                os.unlink(path)


def read_volume(path):
    """The whole volume as a NumPy array (NIfTI scaling applied) and its affine or None."""
    vol = open_volume(path)
    try:
        data = np.asarray(vol.array[tuple(slice(None) for _ in vol.shape)])
        return data, vol.affine
    finally:
        vol.close()


def write_volume(path, array, affine=None, overwrite=False):
    """Write ``array`` to ``path`` (format from the extension), atomically."""
    array = np.asarray(array)
    spec = parse_spec(path, "OUTPUT")
    if spec.format == "zarr":
        from .zarr_io import ZarrOutput
        target = ZarrOutput(spec, overwrite=overwrite)
        target.prepare(array.shape, array.dtype, array.shape, {}, 3)
        target[tuple(slice(None) for _ in array.shape)] = array
        target.commit()
        return
    target = OutputTarget(spec, overwrite=overwrite)
    try:
        out = target.create(array.shape, array.dtype, affine=affine)
        out[tuple(slice(None) for _ in array.shape)] = array
        target.commit()
    except BaseException:
        target.abort()
        raise
