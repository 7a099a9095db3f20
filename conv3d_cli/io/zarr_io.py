"""Zarr volumes (v2 and v3): ``volume.zarr`` or ``store.zarr:/group/array``; OME-Zarr.

Zarr is the format for volumes that need a cluster: every chunk is its own
object, so workers on different machines read and write regions of a shared
store without locks as long as each chunk has one writer. Output arrays are
therefore chunked exactly like the engine's tiles.

An OME-Zarr image (a group with ``multiscales`` metadata, NGFF 0.4 in Zarr v2
or 0.5 in Zarr v3) is read at level 0 by its ``axes``: ``[t,] [c,] z, y, x``,
t a batch axis, so it is a channels-first volume whatever the layer's
data_format; other axes are refused. An output placed by an axis-aligned
affine (from an OME-Zarr or a NIfTI input) is written as an OME-Zarr image
with one level whose ``coordinateTransformations`` (scale, translation) come
from the moved affine (:mod:`conv3d_cli.io.ome`).

Resumable runs: the output is written to ``OUTPUT.partial`` first (an array
of an existing store: ``store.zarr/group/new.partial``), and every finished
tile leaves a marker file in ``.conv3d/done`` there; the plan it belongs to is
recorded in ``.conv3d/plan.json``. ``--resume`` reuses a partial store whose
recorded plan matches and skips the marked tiles; the store is renamed to
OUTPUT when every tile is done. A failed run keeps it and says so.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np

from .. import signals
from ..errors import ArgumentError, OutputExistsError, VolumeError
from ..geometry import Geometry
from . import ome
from .base import Volume, VolumeWriter
from .npy import check_dtype
from .paths import check_input_path
from .tempfiles import check_writable_dir, is_stale, place, remove_stale, temp_path


def require_zarr():
    try:
        import zarr
    except ImportError:
        raise ArgumentError(
            "Zarr volumes need the zarr package: pip install zarr (or pip install "
            "\".[distributed]\" in the conv3d clone)") from None
    return zarr


def _refuse_pickle(node, where):
    """Refuse arrays whose codecs unpickle chunks (numcodecs' Pickle runs code)."""
    try:
        meta = json.dumps(node.metadata.to_dict(), default=str)
    except Exception:  # metadata that does not serialize carries no codec to check
        return
    if "pickle" in meta.lower():
        raise VolumeError(f"{where}: the array's codecs unpickle data; refused")


def _check_links(root, where):
    """Refuse symbolic links inside the store that lead out of it: Zarr reads a
    chunk or metadata file wherever its link points, so a store could carry any
    file on the machine into the output (as an HDF5 external link would)."""
    top = os.path.realpath(root)
    todo = [root]
    while todo:
        with os.scandir(todo.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if os.path.commonpath([top, target]) != top:
                        raise VolumeError(
                            f"{where}: {os.path.relpath(entry.path, root)} is a link to "
                            f"{target}, outside the store; links out of a store are not "
                            "followed")
                elif entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)


def _check_chunks(node, where):
    """A region read decodes whole chunks: refuse chunks larger than the HDF5 bound."""
    from .hdf5 import MAX_CHUNK_BYTES
    try:
        nbytes = math.prod(int(n) for n in node.chunks) * np.dtype(node.dtype).itemsize
    except (TypeError, ValueError, AttributeError):
        return
    if nbytes > MAX_CHUNK_BYTES:
        raise VolumeError(f"{where}: chunks of {tuple(node.chunks)} take more than "
                          f"{MAX_CHUNK_BYTES >> 20} MiB each; a region read decodes whole "
                          "chunks, so rechunk the array")


class ZarrVolume:
    """An input Zarr array (or OME-Zarr level 0) read by region.

    An OME-Zarr image is read by its axes: ``(z, y, x)``, ``(c, z, y, x)``,
    ``(t, z, y, x)`` and ``(t, c, z, y, x)``, with t as the batch axis; the
    volume is then channels-first whatever the layer's data_format, and a
    ``(t, z, y, x)`` image gets a channel axis of one (``shape`` and reads are
    ``(t, 1, z, y, x)``)."""

    def __init__(self, path, array_path=None):
        zarr = require_zarr()
        where = f"{path}{':' + array_path if array_path else ''}"
        check_input_path(path, path, directory=True)
        _check_links(path, path)
        self.path, self.ome = path, None
        try:
            node = zarr.open(store=path, mode="r", path=(array_path or "").lstrip("/") or None)
        except Exception as exc:
            raise VolumeError(f"{where}: not a readable Zarr array or group ({exc})") from None
        if not hasattr(node, "shape"):  # a group: OME-Zarr image, or the only array
            array_path = self._array_in_group(node, array_path, where)
            try:
                node = zarr.open_array(store=path, mode="r", path=array_path)
            except Exception as exc:
                raise VolumeError(f"{path}:/{array_path}: not a readable Zarr array "
                                  f"({exc})") from None
        where = f"{path}:/{array_path}" if array_path else path
        self.array_path = array_path
        self._array = node
        self.where = where
        check_dtype(node.dtype, where)
        _refuse_pickle(node, where)
        _check_chunks(node, where)
        shape = tuple(int(n) for n in node.shape)
        self._insert = None  # position of an added channel axis of one
        if self.ome is not None:
            axes, roles = ome.axis_roles(self.ome["axes"], len(shape), where)
            self.ome["file_axes"] = axes
            self.ome["scale"], self.ome["translation"] = ome.level0_transforms(
                self.ome["transforms"], len(shape), where)
            if roles == "tsss":  # a batch of one-channel volumes
                self._insert = 1
                shape = shape[:1] + (1,) + shape[1:]
                axes = axes[:1] + [{"name": "c", "type": "channel"}] + axes[1:]
            self.ome["axes"] = axes
        self.shape, self.dtype = shape, np.dtype(node.dtype)
        self.zarr_format = node.metadata.zarr_format

    def _array_in_group(self, group, array_path, where):
        """The path of the array a group stands for: an OME-Zarr image's level 0
        (``self.ome`` set), else the group's only array."""
        path = self.path
        try:
            multiscales, version = ome.multiscales_of(group.attrs)
        except (AttributeError, TypeError, KeyError, IndexError, ValueError):
            raise VolumeError(f"{where}: bad OME-Zarr metadata (no readable "
                              "'multiscales')") from None
        if multiscales is not None:
            self.ome = ome.image_of(multiscales, version, where)
            inner = self.ome["path"].strip("/")
        else:
            try:
                arrays = [name for name, _ in group.arrays()]
            except Exception as exc:
                raise VolumeError(f"{where}: cannot list the group's arrays ({exc})") from None
            if len(arrays) != 1:
                listed = ": " + ", ".join(arrays) if arrays else ""
                raise VolumeError(f"{path}: name the array as {path}:/path; the group holds "
                                  f"{len(arrays)} arrays{listed}")
            inner = arrays[0]
        return "/".join(p for p in ((array_path or "").strip("/"), inner) if p)

    @property
    def channels_first(self):
        """True for an OME-Zarr image (its channel axis precedes z, y, x)."""
        return self.ome is not None

    def __getitem__(self, idx):
        if self._insert is None:
            return self._read(idx)
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = idx + (slice(None),) * (len(self.shape) - len(idx))
        out = self._read(idx[:self._insert] + idx[self._insert + 1:])
        if isinstance(idx[self._insert], slice):  # keep the added axis
            out = np.expand_dims(out, sum(isinstance(i, slice) for i in idx[:self._insert]))
        return out

    def _read(self, idx):
        try:
            return self._array[idx]
        except Exception as exc:  # codecs raise their own types for corrupt chunks
            raise VolumeError(f"{self.where}: cannot read the data (corrupt chunk? "
                              f"{exc})") from None

    def __getstate__(self):  # reopened in each process
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = require_zarr().open_array(store=self.path, mode="r", path=self.array_path)

    def geometry(self) -> Geometry:
        """An OME-Zarr image's placement (level 0); for any array the Zarr format, which
        an output follows."""
        if not self.ome:
            return Geometry(header=ZarrHeader(self.zarr_format))
        axes = self.ome["axes"]
        return Geometry(ome.affine_of(axes, self.ome["scale"], self.ome["translation"]),
                        ome.units_of(axes), ZarrHeader(self.zarr_format, axes), "ome")


@dataclass(frozen=True, eq=False)
class ZarrHeader:
    """What a Zarr output copies from a Zarr input: its Zarr format and OME axes."""

    zarr_format: int = 3
    axes: list | None = None


def open_volume(spec, header_only=False, tmp_dir=None) -> Volume:
    array = ZarrVolume(spec.path, spec.dataset)
    return Volume(spec, array, array.geometry(),
                  axes="channels_first" if array.channels_first else None)


@dataclass(frozen=True)
class _Location:
    """Where a Zarr OUTPUT goes (see :class:`Writer`)."""

    spec: object
    in_store: bool   # an array of an existing store
    root: str        # the store the partial output is written in
    node: str        # the partial node's path in ``root`` ("" when it is the store)
    final: str       # the folder OUTPUT ends up as
    partial: str     # the folder written first
    shown: str       # OUTPUT, as messages show it

    @classmethod
    def of(cls, spec):
        store = spec.path.rstrip("/")
        inner = (spec.dataset or "").strip("/")
        if inner and os.path.isdir(store):  # one array (or OME image group) of a store
            final = os.path.join(store, *inner.split("/"))
            return cls(spec, True, store, inner + ".partial", final, final + ".partial",
                       f"{store}:/{inner}")
        return cls(spec, False, store + ".partial", "", store, store + ".partial", store)

    @property
    def inner(self):
        """The array's path under the image or store: the spec's, else "data"."""
        return (self.spec.dataset or "").strip("/") or "data"


class Writer(VolumeWriter):
    """A Zarr output: chunked like the tiles, written in place by every worker.

    Two cases. OUTPUT names a store (``out.zarr``, or an array of a store that
    does not exist yet): the store is the output, built as ``OUTPUT.partial``.
    OUTPUT names an array of an existing store (``store.zarr:/group/new``):
    only that array is, built as ``group/new.partial`` inside the store; the
    store's other arrays are never touched. ``commit()`` renames the partial
    store or array into place; one it replaces is first moved aside and
    removed only after the rename, and a run killed between the two renames
    leaves it to be moved back by the next run. The partial store or array is
    locked (``flock``) while a run writes it: a second run to the same OUTPUT
    is refused instead of overwriting the first one's tiles.

    With a ``resume_record`` (what the run computes, and its ``tiles``), the
    record is kept in ``.conv3d/plan.json`` and every finished tile leaves a
    marker: a failed run keeps the partial output, and ``resume`` reuses one
    whose record matches but for the tiles (``recorded_tiles``,
    ``done_tiles()``). The Zarr format follows the input's; a geometry with an
    axis-aligned affine makes the output an OME-Zarr image (:mod:`.ome`).
    """

    parallel_writes = True
    resumable = True

    def __init__(self, spec, *, shape, dtype, chunks=None, geometry=None, overwrite=False,
                 inputs=(), resume_record=None, resume=False, **_):
        super().__init__(spec, shape, dtype)
        self.check(spec, overwrite, inputs, resume)
        self.loc = _Location.of(spec)
        self.overwrite = overwrite
        self.done_dir = os.path.join(self.loc.partial, ".conv3d", "done")
        self.array_path = self.loc.inner if not self.loc.in_store else self.loc.node
        self._keep = resume_record is not None
        self._lock = self._array = None
        self._done = set()
        chunks = split_chunks(tuple(min(int(c), n) for c, n in zip(chunks or self.shape,
                                                                  self.shape)), self.dtype)
        multiscales, note = ome.multiscales_for(geometry, len(self.shape), _header_axes(geometry))
        self.notes = (note,) if note else ()
        try:
            self._lock_partial()
            if not (resume and self._reopen(resume_record or {}, multiscales)):
                self._create(chunks, geometry, multiscales, resume_record)
        except BaseException:
            self._unlock()
            raise

    @classmethod
    def check(cls, spec, overwrite=False, inputs=(), resume=False):
        super().check(spec, overwrite, inputs, resume)
        loc = _Location.of(spec)
        check_writable_dir(os.path.dirname(os.path.abspath(spec.path.rstrip("/"))),
                           f"OUTPUT {spec}")
        _recover_aside(loc.final)
        remove_stale(os.path.dirname(loc.final))
        if os.path.lexists(loc.final) and not overwrite:
            raise OutputExistsError(f"OUTPUT {spec} exists; pass --overwrite to replace it")
        if loc.in_store and os.path.isdir(loc.final) and _is_group(loc.final):
            raise VolumeError(f"OUTPUT {spec} is a group of {loc.root}, not an array; name an "
                              "array (a group's members are never replaced)")
        for source in inputs:
            _refuse_input(loc, source)

    @classmethod
    def output_axes(cls, geometry=None):
        """Channels first for an OME-Zarr output (NGFF puts channels before z, y, x)."""
        if geometry is not None and geometry.affine is not None and \
                ome.aligned_axes(geometry.affine) is not None:
            return "channels_first"
        return None

    def _image_path(self, multiscales):
        """The array's path in ``loc.root``: an OME image's level 0 is "data" in its group."""
        if multiscales is None:
            return self.loc.node or self.loc.inner
        return "/".join(p for p in (self.loc.node, "data") if p)

    def _reopen(self, record, multiscales):
        """Reopen a partial output written for ``record`` (but its tiles); False if none."""
        record_path = os.path.join(self.loc.partial, ".conv3d", "plan.json")
        if not os.path.exists(record_path):
            return False
        old = _read_record(record_path, self.loc.partial)
        if {k: v for k, v in old.items() if k != "tiles"} != \
                {k: v for k, v in record.items() if k != "tiles"}:
            raise ArgumentError(
                f"--resume: {self.loc.partial} was written by another job (input, layer, "
                "weights or output differ); remove it or run without --resume")
        self.array_path = self._image_path(multiscales)
        try:
            self._array = require_zarr().open_array(store=self.loc.root, mode="r+",
                                                    path=self.array_path)
            self._done = {int(n) for n in os.listdir(self.done_dir) if n.isdigit()}
        except Exception as exc:
            raise ArgumentError(f"--resume: {self.loc.partial} cannot be reopened ({exc}); "
                                "remove it or run without --resume") from None
        self.recorded_tiles = tuple((b0, b1, tuple(tuple(r) for r in box))
                                    for b0, b1, box in old["tiles"])
        return True

    def _create(self, chunks, geometry, multiscales, record):
        """Create the partial store or array (emptied first), and record ``record``."""
        zarr = require_zarr()
        loc = self.loc
        _empty_folder(loc.partial)
        if loc.in_store:
            zarr_format = zarr.open_group(store=loc.root, mode="r").metadata.zarr_format
            root = zarr.open_group(store=loc.root, mode="r+")
            if multiscales is not None:
                root = root.create_group(loc.node)
        else:
            header = geometry.header if geometry is not None else None
            zarr_format = header.zarr_format if isinstance(header, ZarrHeader) else 3
            root = zarr.open_group(store=loc.root, mode="w-", zarr_format=zarr_format)
        self.array_path = self._image_path(multiscales)
        name = "data" if multiscales is not None else (loc.node or loc.inner)
        self._array = root.create_array(name=name, shape=self.shape, chunks=chunks,
                                        dtype=self.dtype, fill_value=0)
        if multiscales is not None:
            root.attrs.update(ome.group_attrs(multiscales, zarr_format))
        os.makedirs(self.done_dir, exist_ok=True)
        if record is not None:
            with open(os.path.join(loc.partial, ".conv3d", "plan.json"), "w") as fh:
                json.dump(record, fh)

    def _lock_partial(self):
        """Hold an exclusive flock on the partial folder (made if missing) for the run."""
        import fcntl
        os.makedirs(self.loc.partial, exist_ok=True)
        fd = os.open(self.loc.partial, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VolumeError(f"OUTPUT {self.spec} is being written by another run (its "
                              f"partial {self.loc.partial} is locked)") from None
        except OSError:  # no flock here: unlocked, as before
            pass
        self._lock = fd

    def _unlock(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __setitem__(self, idx, value):
        self._array[idx] = value

    def __getstate__(self):  # reopened in each worker process
        state = dict(self.__dict__)
        state["_array"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = require_zarr().open_array(store=self.loc.root, mode="r+",
                                                path=self.array_path)

    def done_tiles(self) -> set:
        return set(self._done)

    def mark_done(self, index):
        open(os.path.join(self.done_dir, str(index)), "w").close()

    def commit(self):
        """Rename the complete partial store or array to OUTPUT."""
        what, final = f"OUTPUT {self.spec}", self.loc.final
        self._array = None
        try:
            with signals.shielded():
                if os.path.lexists(final):
                    if not self.overwrite:
                        raise OutputExistsError(f"{what} was created by another process while "
                                                "this run computed; pass --overwrite to replace it")
                    aside = temp_path(os.path.dirname(final), os.path.basename(final))
                    os.rename(final, aside)
                    try:
                        place(self.loc.partial, final, False, what)
                    except BaseException:
                        os.rename(aside, final)
                        raise
                    shutil.rmtree(aside, ignore_errors=True)
                else:
                    place(self.loc.partial, final, False, what)
                self.committed = True
        finally:
            self._unlock()
        shutil.rmtree(os.path.join(final, ".conv3d"), ignore_errors=True)

    def abort(self):
        """A failed run keeps a partial output that records its plan (for resume);
        otherwise removes it. Returns what it kept, as a sentence for the user, or None."""
        self._unlock()
        if self.committed:
            return f"OUTPUT {self.loc.shown} was written"
        partial = self.loc.partial
        if not (self._keep and os.path.exists(os.path.join(partial, ".conv3d", "plan.json"))):
            shutil.rmtree(partial, ignore_errors=True)
            return None
        shown = f"{self.loc.root}:/{self.loc.node}" if self.loc.in_store else partial
        return (f"its partial output {shown} is kept: run again with --resume to continue, "
                "or delete it")


# Output chunks: a tile is one writer's block, so any chunk shape that divides
# the tile shape axis by axis keeps one writer per chunk (tiles start at
# multiples of the tile shape). A tile-sized chunk is encoded by one thread
# (a 64 MiB zstd chunk takes ~0.3 s, several times the convolution's own time
# for a 3^3 kernel); chunks of at most CHUNK_BYTES are encoded concurrently by
# zarr's threads and read back by region with less waste.
CHUNK_BYTES = 8 << 20
_MAX_CUT = 7  # an axis is cut into 2, 3, 5 or 7 parts (never a long prime side into slices)


def split_chunks(chunks, dtype, limit=None):
    """``chunks`` cut, the longest axis first, into equal parts (2, 3, 5 or 7 of
    them) until a chunk holds at most ``limit`` bytes (default: CHUNK_BYTES) or
    no axis can be cut."""
    chunks, limit = list(chunks), limit or CHUNK_BYTES
    while math.prod(chunks) * np.dtype(dtype).itemsize > limit:
        cuts = [(n, i, _smallest_factor(n)) for i, n in enumerate(chunks)]
        cuts = [(n, i, f) for n, i, f in cuts if 1 < f <= _MAX_CUT]
        if not cuts:
            break
        n, i, f = max(cuts)
        chunks[i] = n // f
    return tuple(chunks)


def _smallest_factor(n):
    """The smallest factor of ``n`` above 1 (``n`` itself when prime)."""
    f = 2
    while f * f <= n:
        if n % f == 0:
            return f
        f += 1
    return max(n, 1)


def _header_axes(geometry):
    header = geometry.header if geometry is not None else None
    return header.axes if isinstance(header, ZarrHeader) else None


def _refuse_input(loc, source):
    """Refuse an OUTPUT that is, or holds, the input array (writing it would delete it).

    ``source`` is an input's spec, or the opened input (whose array path is
    resolved: a store's only array, an OME image's level 0)."""
    array = getattr(source, "array", None)
    spec = getattr(source, "spec", source)
    if isinstance(array, ZarrVolume):
        store, path = array.path, array.array_path or ""
    elif spec.format == "zarr":
        store, path = spec.path, spec.dataset or ""
    else:
        return
    if not os.path.exists(loc.final) or not os.path.exists(store):
        return
    if loc.in_store:
        if not os.path.samefile(store, loc.root):
            return
        node, path = loc.node[:-len(".partial")], path.strip("/")
        inside = path == node or path.startswith(node + "/")
    else:
        inside = os.path.samefile(store, loc.final)
    if inside:
        raise VolumeError(f"OUTPUT {loc.spec} is or holds the input {spec}; write to "
                          "another store, or to a new array of this one (store.zarr:/name)")


def _is_group(path):
    """Whether the Zarr node at ``path`` (a folder) is a group (v2 .zgroup or v3 zarr.json)."""
    if os.path.exists(os.path.join(path, ".zgroup")):
        return True
    try:
        with open(os.path.join(path, "zarr.json")) as fh:
            return json.load(fh).get("node_type") == "group"
    except (OSError, ValueError):
        return False


def _empty_folder(path):
    """Remove what ``path`` holds (not the folder itself: it is locked)."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _recover_aside(final):
    """Move back an OUTPUT a killed run had moved aside to replace it (see ZarrOutput)."""
    if os.path.lexists(final):
        return
    folder, base = os.path.split(final)
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return
    for name in names:
        if name.startswith(f".{base[:100]}.conv3d-") and is_stale(name):
            os.rename(os.path.join(folder, name), final)
            return


def _read_record(path, partial):
    """The plan record of a partial store, checked enough to be compared and reused."""
    junk = ArgumentError(f"--resume: {path} is not a plan record this tool wrote; remove "
                         f"{partial} or run without --resume")
    try:
        with open(path, "rb") as fh:
            record = json.loads(fh.read(64 << 20).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        raise junk from None
    tiles = record.get("tiles") if isinstance(record, dict) else None
    if not isinstance(tiles, list) or not all(
            isinstance(t, list) and len(t) == 3 and all(isinstance(v, int) for v in t[:2])
            and isinstance(t[2], list) and len(t[2]) == 3
            and all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r)
                    for r in t[2]) for t in tiles):
        raise junk
    return record
