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

from .. import signals
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
    """The output dataset in a new file, written by the parent process only."""

    single_writer = True

    def __init__(self, path, dataset, shape, dtype, chunks=None, attrs=None):
        self.file = h5py.File(path, "w")
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


# ------------------------------------------------------------------ output side
# A run writes its dataset into a new temporary file; only the commit touches an
# existing file: it copies the finished dataset in (raw chunks, no recompression)
# under a temporary name and moves it into place, so a run that fails, is
# interrupted or killed while computing never changes the existing file.

_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def has_hdf5_signature(path) -> bool:
    """The HDF5 superblock signature at offset 0, 512, 1024, 2048, ... (read without HDF5,
    which fails on a file another process holds locked)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            offset = 0
            while offset + 8 <= size:
                fh.seek(offset)
                if fh.read(8) == _SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return False
    return False


def is_lock_error(exc) -> bool:
    """An h5py OSError raised because another process holds the file locked."""
    text = str(exc).lower()
    return "unable to lock file" in text or "errno = 11" in text or "lock" in text and "unavailable" in text


def existing_dataset(path, dataset, what):
    """What ``dataset`` is in the existing HDF5 file: "dataset", "group" or None.

    None too when the file cannot be read now because another process holds
    it locked: the commit checks again.
    """
    try:
        with h5py.File(path, "r") as f:
            obj = f.get(dataset, getlink=True)
            if obj is None:
                return None
            return "dataset" if isinstance(f.get(dataset), h5py.Dataset) else "group"
    except OSError as exc:
        if is_lock_error(exc):
            return None
        raise VolumeError(f"{what}: an HDF5 file that cannot be read ({exc})") from None


def copy_dataset_into(src_path, dataset, dst_path, overwrite, what):
    """Copy ``dataset`` of the file ``src_path`` into the existing file ``dst_path``.

    The space the copy needs is reserved first (the file is extended with
    ``posix_fallocate``; HDF5 trims it to its end on close), so a full disk
    or a file size limit fails here, before HDF5 writes anything. The copy
    goes under a temporary name next to ``dataset`` and is then moved onto
    it; other datasets are never touched.
    """
    from ..errors import OutputExistsError
    from .tempfiles import is_stale, token
    with h5py.File(src_path, "r") as src:
        ds = src[dataset]
        need = ds.id.get_storage_size() + 128 * _nchunks(ds) + (1 << 20)
        size = _reserve(dst_path, need, what)
        try:
            dst = h5py.File(dst_path, "r+")
        except OSError as exc:
            _unreserve(dst_path, size, need)
            if is_lock_error(exc):
                raise VolumeError(f"{what}: {dst_path} is open in another process (HDF5 file "
                                  "lock); close it there or write to another file") from None
            raise VolumeError(f"{what}: cannot open {dst_path} for writing ({exc})") from None
        with dst:
            parent, _, leaf = dataset.rstrip("/").rpartition("/")
            group = dst.require_group(parent or "/")
            for name in [n for n in group if is_stale(f".{n}")]:  # left by killed runs
                del group[name]
            if leaf in group:
                if not isinstance(group.get(leaf), h5py.Dataset):
                    raise VolumeError(f"{what} is a group in {dst_path}, not a dataset; name a "
                                      "dataset (its members are never replaced)")
                if not overwrite:
                    raise OutputExistsError(f"{what} exists; pass --overwrite to replace it")
            temp = f"{leaf}.conv3d-{token()}.tmp"
            try:
                src.copy(ds, group, name=temp)
                with signals.shielded():  # the old dataset goes only with the new one in place
                    if leaf in group:
                        del group[leaf]
                    group.move(temp, leaf)
            except BaseException:
                if temp in group:
                    del group[temp]
                raise


def _nchunks(ds):
    if ds.chunks is None:
        return 1
    return int(np.prod([-(-n // c) for n, c in zip(ds.shape, ds.chunks)]))


def _reserve(path, nbytes, what):
    """Extend ``path`` by ``nbytes`` of allocated space; its size before."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, size, nbytes)
        except OSError as exc:
            os.ftruncate(fd, size)
            raise VolumeError(f"{what}: no room to add the dataset to {path} (needs about "
                              f"{nbytes} bytes: {exc.strerror}); the file is unchanged") from None
        except AttributeError:  # no posix_fallocate on this system
            pass
        return size
    finally:
        os.close(fd)


def _unreserve(path, size, nbytes):
    """Undo :func:`_reserve` when HDF5 did not open the file (so will not trim it)."""
    try:
        if os.path.getsize(path) == size + nbytes:
            os.truncate(path, size)
    except OSError:
        pass
