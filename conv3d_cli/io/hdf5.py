"""HDF5 datasets (``file.h5:/group/dataset``) through h5py.

Reads slice the dataset (h5py reads only the chunks a region touches);
worker processes reopen the file after a fork. Writes go through a single
writer (HDF5 files do not take concurrent writers); the output dataset is
chunked and compressed and its parent groups are created. External links,
external storage and virtual datasets are not followed.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from ..errors import VolumeError
from .npy import check_dtype

DEFAULT_DATASET = "/data"


def _datasets(f):
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found.append("/" + name)
    f.visititems(visit)
    return found


class H5Array:
    """A dataset opened lazily (per process) for region reads."""

    def __init__(self, path, dataset):
        self.path, self.dataset = path, dataset
        self._file = None
        self._pid = None
        ds = self._ds()
        self.shape, self.dtype = ds.shape, ds.dtype

    def _ds(self):
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file[self.dataset]

    def __getitem__(self, idx):
        return self._ds()[idx]

    def close(self):
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state


def open_hdf5(path, dataset=None) -> H5Array:
    if not os.path.exists(path):
        raise VolumeError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise VolumeError(f"{path}: not a valid HDF5 file ({exc})") from None
    with f:
        if dataset is None:
            names = _datasets(f)
            if len(names) != 1:
                raise VolumeError(
                    f"{path}: name the dataset as {path}:/path; the file holds "
                    f"{len(names)} datasets{': ' + ', '.join(names) if names else ''}")
            dataset = names[0]
        link = f.get(dataset, getlink=True)
        if link is None:
            names = _datasets(f)
            raise VolumeError(f"{path}: no dataset {dataset}; the file holds: "
                              f"{', '.join(names) or 'no datasets'}")
        if isinstance(link, h5py.ExternalLink):
            raise VolumeError(f"{path}:{dataset} is an external link; external links are not followed")
        obj = f[dataset]
        if not isinstance(obj, h5py.Dataset):
            raise VolumeError(f"{path}:{dataset} is a group, not a dataset; it holds: "
                              f"{', '.join(sorted(obj.keys()))}")
        if obj.is_virtual or obj.external:
            raise VolumeError(f"{path}:{dataset} is a virtual or externally stored dataset; "
                              "these are not followed")
        check_dtype(obj.dtype, f"{path}:{dataset}")
    return H5Array(path, dataset)


class H5Writer:
    """The output dataset, written by the parent process only."""

    single_writer = True

    def __init__(self, path, dataset, shape, dtype, chunks=None, attrs=None):
        self.file = h5py.File(path, "a")
        if dataset in self.file:
            del self.file[dataset]
        chunks = tuple(min(c, n) for c, n in zip(chunks, shape)) if chunks else True
        self.ds = self.file.create_dataset(dataset, shape=tuple(shape), dtype=np.dtype(dtype),
                                           chunks=chunks, compression="gzip",
                                           compression_opts=4, shuffle=True)
        for k, v in (attrs or {}).items():
            self.ds.attrs[k] = v
        self.shape, self.dtype = self.ds.shape, self.ds.dtype

    def __setitem__(self, idx, value):
        self.ds[idx] = value

    def close(self):
        self.file.close()
