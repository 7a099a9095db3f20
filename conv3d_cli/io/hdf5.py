"""HDF5 datasets (``file.h5:/group/dataset``) through h5py.

Reads slice the dataset (h5py reads only the chunks a region touches);
worker processes reopen the file after a fork. Writes go through a single
writer (HDF5 files do not take concurrent writers); the output dataset is
chunked (uncompressed) and its parent groups are created. Links out of the
file (external links, anywhere on a dataset's path), external storage and
virtual datasets are not followed (:func:`lookup`).
"""

from __future__ import annotations

import faulthandler
import math
import os
import select
import signal

import h5py
import numpy as np

from .. import signals
from ..errors import OutputExistsError, VolumeError
from ..geometry import Geometry
from .base import FileWriter, Volume
from .npy import check_dtype
from .ome import is_zyx_scaling, zyx_affine
from .paths import check_input_path
from .tempfiles import FolderLock, place

DEFAULT_DATASET = "/data"


# Soft links followed while resolving one path before it is taken for a loop.
MAX_SOFT_LINKS = 40
# A region read decompresses whole chunks: larger ones are refused.
MAX_CHUNK_BYTES = 1 << 30
# Seconds a file's structure may take to read before it is taken for a loop.
DEFAULT_PROBE_SECONDS = 30.0


def _datasets(f):
    found = []

    def visit(name, obj):  # visits objects reached through hard links only
        if isinstance(obj, h5py.Dataset):
            found.append("/" + name)
    f.visititems(visit)
    return found


def _parts(path):
    return [p for p in path.split("/") if p not in ("", ".")]


def lookup(f, path, where, error=VolumeError):
    """``(hard path, object)`` at ``path`` in the open file ``f``, or None if there is none.

    Opening a path makes HDF5 follow every link on it silently, external links
    into any file on the machine included. So each component is looked at as a
    link first, from the root: an external (or user-defined) link anywhere is
    refused; a soft link is replaced by its target path (absolute, or relative to
    the group holding it), whose components are checked the same way; a soft
    link to nothing is reported. The object is then opened by the path of hard
    links found. ``where`` names the file in messages.
    """
    pending, current, hops, via = _parts(path), "/", 0, None
    while pending:
        name = pending.pop(0)
        group = f[current]
        shown = current.rstrip("/") + "/" + name
        if not isinstance(group, h5py.Group):
            raise error(f"{where}: {path}: {current} is a dataset, not a group")
        link = group.get(name, getlink=True)
        if link is None:
            if via is not None:
                raise error(f"{where}: {path}: the soft link {via[0]} points to {via[1]}, "
                            f"which does not exist (a dangling link; {shown} is missing)")
            return None
        if isinstance(link, h5py.ExternalLink):
            raise error(f"{where}: {shown} is an external link (to {link.filename}:{link.path}); "
                        "external links are not followed")
        if isinstance(link, h5py.SoftLink):
            hops += 1
            if hops > MAX_SOFT_LINKS:
                raise error(f"{where}: {path}: more than {MAX_SOFT_LINKS} soft links on the way "
                            "(a loop?)")
            via = (shown, link.path)
            if link.path.startswith("/"):
                current = "/"
            pending = _parts(link.path) + pending
            continue
        if not isinstance(link, h5py.HardLink):
            raise error(f"{where}: {shown} is a user-defined link; only hard and soft links "
                        "inside the file are followed")
        current = shown
    return current, f[current]


def resolve(f, path, where, error=VolumeError, what="object", holds=None):
    """Like :func:`lookup`, but a missing object is an error (``holds()`` lists what is there)."""
    found = lookup(f, path, where, error)
    if found is None:
        listing = holds() if holds is not None else ""
        raise error(f"{where}: no {what} {path}{listing}")
    return found


def check_plain_dataset(obj, where, error=VolumeError):
    """Refuse what is not a plain dataset of this file: groups, virtual datasets
    (whose data live in other files) and external raw storage."""
    if isinstance(obj, h5py.Group):
        raise error(f"{where} is a group, not a dataset; it holds: "
                    f"{', '.join(sorted(obj.keys())) or 'nothing'}")
    if not isinstance(obj, h5py.Dataset):
        raise error(f"{where} is a named datatype, not a dataset")
    if obj.is_virtual or obj.external:
        raise error(f"{where} is a virtual or externally stored dataset; these are not followed")
    if obj.shape is None:
        raise error(f"{where} is an empty (null) dataset: it holds no array")
    return obj


class H5Array:
    """A dataset opened lazily (per process) for region reads.

    ``dataset`` is the dataset's path through hard links (see :func:`lookup`),
    so reopening it in a worker follows no link."""

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
        try:
            return self._ds()[idx]
        except (OSError, KeyError, RuntimeError) as exc:  # corrupt chunks, filters, I/O
            raise VolumeError(f"{self.path}:{self.dataset}: cannot read the data "
                              f"({_reason(exc)})") from None

    def close(self):
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state


def _reason(exc):
    """An h5py/HDF5 error message without its Python class or 'synchronously'."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text.replace("Unable to synchronously ", "unable to ").replace(
        "Can't synchronously ", "can't ")


def open_volume(spec, header_only=False, tmp_dir=None) -> Volume:
    array = open_hdf5(spec.path, spec.dataset)
    geometry = _geometry(array, f"{spec.path}:{array.dataset}")
    details = {"geometry": f"voxel sizes only ({ELEMENT_SIZE}: no origin or orientation)"} \
        if geometry is not None else {}
    return Volume(spec, array, geometry, details=details)


# ilastik, Fiji's HDF5 plugin and BigDataViewer exports calibrate a dataset by
# its ``element_size_um`` attribute: the voxel size along each array axis, in
# micrometres. It is read (and written) for 3-D datasets, whose axes are all
# spatial; array Z, Y, X then run along world z, y, x, as in OME-Zarr.
ELEMENT_SIZE = "element_size_um"


def _geometry(array, where):
    try:
        value = array._ds().attrs.get(ELEMENT_SIZE)
    except (OSError, KeyError, RuntimeError, TypeError, ValueError):
        return None
    if value is None or len(array.shape) != 3:
        return None
    try:
        sizes = np.asarray(value, dtype=np.float64).reshape(-1)
        shown = str(sizes.tolist())[:60]
    except (TypeError, ValueError):
        sizes, shown = np.array([]), repr(value)[:60]
    if sizes.shape != (3,) or not np.all(np.isfinite(sizes)) or np.any(sizes <= 0):
        raise VolumeError(f"{where}: {ELEMENT_SIZE} = {shown}: expected three positive voxel "
                          "sizes (Z, Y, X) in micrometres")
    return Geometry(zyx_affine(sizes), ("micrometer",) * 3, None, "affine")


def element_size(geometry, shape):
    """(``element_size_um`` of an output of ``shape`` placed by ``geometry`` or None,
    a note on what it does not keep or None)."""
    if geometry is None or geometry.affine is None:
        return None, None
    sizes = geometry.voxel_sizes_in("micrometer")
    if len(shape) != 3 or sizes is None:
        why = "3-D datasets only" if len(shape) != 3 else "sizes in known units only"
        return None, (f"HDF5 keeps voxel sizes ({ELEMENT_SIZE}) of {why}: OUTPUT holds "
                      "no geometry")
    if is_zyx_scaling(geometry.affine):
        return [float(v) for v in sizes], None
    return [float(v) for v in sizes], ("HDF5 keeps voxel sizes only (element_size_um): the "
                                       "input's origin and orientation are not kept in OUTPUT")


def open_hdf5(path, dataset=None) -> H5Array:
    check_input_path(path, path)
    probe(lambda: _inspect(path, dataset, corner=True), path, VolumeError)
    return H5Array(path, _inspect(path, dataset))


def _inspect(path, dataset, corner=False):
    """The hard path of the input dataset, after every check (``corner``: and read
    one voxel, which walks the chunk index once)."""
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise VolumeError(f"{path}: not a valid HDF5 file ({_reason(exc)})") from None
    try:
        with f:
            if dataset is None:
                names = _datasets(f)
                if len(names) != 1:
                    raise VolumeError(
                        f"{path}: name the dataset as {path}:/path; the file holds "
                        f"{len(names)} datasets{': ' + ', '.join(names) if names else ''}")
                dataset = names[0]

            def holds():
                return f"; the file holds: {', '.join(_datasets(f)) or 'no datasets'}"
            hard, obj = resolve(f, dataset, path, what="dataset", holds=holds)
            check_plain_dataset(obj, f"{path}:{dataset}")
            check_dtype(obj.dtype, f"{path}:{dataset}")
            if obj.chunks is not None and \
                    math.prod(obj.chunks) * obj.dtype.itemsize > MAX_CHUNK_BYTES:
                raise VolumeError(
                    f"{path}:{dataset}: chunks of {obj.chunks} take more than "
                    f"{MAX_CHUNK_BYTES >> 20} MiB each; a region read decompresses whole "
                    "chunks, so rechunk the dataset (h5repack -l CHUNK=...)")
            if corner and obj.size:
                obj[(0,) * obj.ndim]
    except (OSError, KeyError, RuntimeError, ValueError) as exc:  # a corrupt file's structure
        raise VolumeError(f"{path}: corrupt HDF5 file ({_reason(exc)})") from None
    return hard


def probe_timeout() -> float:
    text = os.environ.get("CONV3D_HDF5_TIMEOUT")
    try:
        value = float(text) if text is not None else DEFAULT_PROBE_SECONDS
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise VolumeError(f"CONV3D_HDF5_TIMEOUT={str(text)[:40]!r}: expected a number of "
                          "seconds greater than 0")
    return value


_IN_PROBE = False


def probe(work, where, error, timeout=None):
    """Run ``work()`` once in a forked child first, and refuse the file if the
    child does not finish within ``timeout`` seconds or crashes.

    libhdf5 loops forever on some damaged files (reading an attribute or a
    B-tree whose links form a cycle: HDFGroup/hdf5 issue 1707) and no signal
    interrupts it; only a separate process can be stopped. The child's own
    errors are ignored: the caller runs ``work`` again and reports them."""
    global _IN_PROBE
    if _IN_PROBE or not hasattr(os, "fork"):
        return
    timeout = probe_timeout() if timeout is None else timeout
    done_r, done_w = os.pipe()  # closed by the child's exit, however it exits
    pid = os.fork()
    if pid == 0:  # the child: no cleanup handlers, no output
        _IN_PROBE = True
        os.close(done_r)
        faulthandler.disable()  # a crash is reported by the parent, in one line
        try:
            work()
        except BaseException:
            pass
        os._exit(0)
    os.close(done_w)
    status = _wait(pid, done_r, timeout)
    if status is None:
        raise error(f"{where}: reading its HDF5 structure did not finish within "
                    f"{timeout:g} s; the file is corrupt (libhdf5 loops on some damaged "
                    "files; CONV3D_HDF5_TIMEOUT sets the wait)")
    if os.WIFSIGNALED(status):
        raise error(f"{where}: libhdf5 crashed reading the file "
                    f"({signal.Signals(os.WTERMSIG(status)).name}); the file is corrupt")


def _wait(pid, done, timeout):
    """The child's exit status, or None (and the child killed) after ``timeout``
    seconds; the child is killed too if this wait is interrupted. ``done`` reads
    end-of-file when the child has exited."""
    status = None
    try:
        if select.select([done], [], [], timeout)[0]:
            status = os.waitpid(pid, 0)[1]
        return status
    finally:
        os.close(done)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


class H5Writer:
    """The output dataset in a new file, written by the parent process only."""

    def __init__(self, path, dataset, shape, dtype, attrs=None):
        self.file = h5py.File(path, "w")
        # Uncompressed, as h5py and BigDataViewer write by default: gzip in the one
        # writing process took 5x the whole run (W8), for 10-15% less disk on float
        # data. `h5repack -f GZIP=4` compresses a finished file.
        self.ds = self.file.create_dataset(dataset, shape=tuple(shape), dtype=np.dtype(dtype),
                                           chunks=True)
        self.ds.attrs.update(attrs or {})
        self.shape, self.dtype = self.ds.shape, self.ds.dtype

    def __setitem__(self, idx, value):
        self.ds[idx] = value

    def close(self):
        self.file.close()


class Writer(FileWriter):
    """An HDF5 dataset (``file.h5:/group/name``, default ``/data``), chunked and
    uncompressed, its parent groups created.

    HDF5 files take one writer: the engine sends every block to this process.
    The dataset is written into a new temporary file beside OUTPUT; committing
    it into an existing file copies it in (:func:`copy_dataset_into`), with
    commits into files of one folder taking turns, so concurrent runs writing
    datasets of one file all keep theirs and no other dataset is touched.
    Chunks are h5py's choice, not the tiles': one process writes them all, and
    a tile-sized chunk could pass HDF5's 4 GiB chunk limit.
    """

    def __init__(self, spec, *, shape, dtype, geometry=None, overwrite=False, inputs=(),
                 resume=False, **_):
        dataset = spec.dataset or DEFAULT_DATASET
        sizes, note = element_size(geometry, shape)
        attrs = {ELEMENT_SIZE: np.array(sizes, np.float32)} if sizes else {}
        super().__init__(spec, shape, dtype,
                         lambda tmp: H5Writer(tmp, dataset, shape, dtype, attrs),
                         overwrite, inputs, resume)
        self.notes = (note,) if note else ()

    @property
    def dataset(self):
        return self.spec.dataset or DEFAULT_DATASET

    @classmethod
    def _check_existing(cls, spec, overwrite):
        dataset = spec.dataset or DEFAULT_DATASET
        if not dataset.strip("/"):
            raise VolumeError(f"OUTPUT {spec} names the file's root group; name a dataset "
                              "(file.h5:/group/name)")
        if not has_hdf5_signature(spec.path):
            if os.path.exists(spec.path) and not overwrite:
                raise OutputExistsError(f"OUTPUT {spec} exists and is not an HDF5 file; pass "
                                        "--overwrite to replace it")
            return
        what = f"OUTPUT {spec.path}:{dataset}"
        found = existing_dataset(spec.path, dataset, what)
        if found == "group":
            raise VolumeError(f"{what} is a group, not a dataset; name a dataset (its members "
                              "are never replaced)")
        if found and not overwrite:
            raise OutputExistsError(f"{what} exists; pass --overwrite to replace it")

    def commit(self):
        """Copy the dataset into an existing HDF5 file, or put the new file in place."""
        self._close()
        path, what = self.spec.path, f"OUTPUT {self.spec}"
        with FolderLock(self.folder):
            if has_hdf5_signature(path):
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
    return ("unable to lock file" in text or "errno = 11" in text
            or ("lock" in text and "unavailable" in text))


def existing_dataset(path, dataset, what):
    """What ``dataset`` is in the existing HDF5 file: "dataset", "group" or None.

    None too when the file cannot be read now because another process holds
    it locked: the commit checks again. The file's structure is read in a
    child process first (:func:`probe`), as an input's is: libhdf5 loops
    forever on some damaged files, and an existing output must not hang the
    run. The dataset's path is resolved link by link (:func:`lookup`): an
    external link on it is refused rather than followed into another file.
    """
    probe(lambda: _existing(path, dataset, what), what, VolumeError)
    return _existing(path, dataset, what)


def _existing(path, dataset, what):
    """:func:`existing_dataset`'s reading: the structure the commit walks."""
    try:
        with h5py.File(path, "r") as f:
            parent_path, _, leaf = dataset.rstrip("/").rpartition("/")
            parent = lookup(f, parent_path or "/", what)
            if parent is None:  # the commit creates the groups
                return None
            if not isinstance(parent[1], h5py.Group):
                raise VolumeError(f"{what}: {parent_path} is a dataset, not a group")
            list(parent[1])  # the commit lists it (for datasets left by killed runs)
            found = lookup(f, f"{parent[0].rstrip('/')}/{leaf}", what)
            if found is None:
                return None
            return "dataset" if isinstance(found[1], h5py.Dataset) else "group"
    except OSError as exc:
        if is_lock_error(exc):
            return None
        raise VolumeError(f"{what}: an HDF5 file that cannot be read ({exc})") from None
    except (KeyError, RuntimeError, ValueError) as exc:  # a corrupt file's structure
        raise VolumeError(f"{what}: corrupt HDF5 file ({_reason(exc)})") from None


def copy_dataset_into(src_path, dataset, dst_path, overwrite, what):
    """Copy ``dataset`` of the file ``src_path`` into the existing file ``dst_path``.

    The space the copy needs is reserved first (the file is extended with
    ``posix_fallocate``; HDF5 trims it to its end on close), so a full disk
    or a file size limit fails here, before HDF5 writes anything. The copy
    goes under a temporary name next to ``dataset`` and is then moved onto
    it; other datasets are never touched.
    """
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
