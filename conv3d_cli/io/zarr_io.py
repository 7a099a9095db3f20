"""Zarr volumes (v2 and v3): ``volume.zarr`` or ``store.zarr:/group/array``; OME-Zarr.

Zarr is the format for volumes that need a cluster: every chunk is its own
object, so workers on different machines read and write regions of a shared
store without locks as long as each chunk has one writer. Output arrays are
therefore chunked exactly like the engine's tiles.

An OME-Zarr image (a group with ``multiscales`` metadata, NGFF 0.4 in Zarr v2
or 0.5 in Zarr v3) is read at level 0 by its ``axes``: ``[t,] [c,] z, y, x``,
t a batch axis, so it is a channels-first volume whatever the layer's
data_format; other axes are refused. The output is written as an OME-Zarr image with
one level whose ``coordinateTransformations`` (scale, translation) are
updated the way the NIfTI affine is (``geometry.voxel_map``).

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

import numpy as np

from .. import signals
from ..errors import ArgumentError, OutputExistsError, VolumeError
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


def _multiscales(attrs):
    """(multiscales, NGFF version) of a group's attributes, or (None, None); the
    multiscales are checked by :func:`_ome_image`."""
    attrs = dict(attrs)
    if "ome" in attrs:  # NGFF 0.5 (Zarr v3)
        ome = attrs["ome"] if isinstance(attrs["ome"], dict) else {}
        return ome.get("multiscales", "missing"), ome.get("version", "0.5")
    if "multiscales" in attrs:  # NGFF 0.4 (Zarr v2)
        ms = attrs["multiscales"]
        first = ms[0] if isinstance(ms, list) and ms and isinstance(ms[0], dict) else {}
        return ms, first.get("version", "0.4")
    return None, None


# NGFF axis types; an axis without a type is known by its name.
_ROLES = {"time": "t", "channel": "c", "space": "s"}
_NAMED = {"t": "t", "time": "t", "c": "c", "channel": "c", "z": "s", "y": "s", "x": "s"}
# NGFF 0.1-0.2 images have no axes: they are always 5-D.
_DEFAULT_AXES = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + \
    [{"name": n, "type": "space"} for n in "zyx"]


def _ome_image(multiscales, version, where):
    """{axes, version, transforms, name, path} of an OME-Zarr image's level 0."""
    if not isinstance(multiscales, list) or not multiscales or \
            not isinstance(multiscales[0], dict):
        raise VolumeError(f"{where}: bad OME-Zarr metadata: 'multiscales' is not a list of images")
    image = multiscales[0]
    datasets = image.get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict) \
            or not isinstance(datasets[0].get("path"), str):
        raise VolumeError(f"{where}: bad OME-Zarr metadata: no 'datasets' with a 'path' "
                          "for level 0")
    axes = image.get("axes")
    if axes is not None:
        if not isinstance(axes, list):
            raise VolumeError(f"{where}: bad OME-Zarr metadata: 'axes' is not a list")
        axes = [{"name": a} if isinstance(a, str) else a for a in axes]  # NGFF 0.3: names
        if not all(isinstance(a, dict) and isinstance(a.get("name"), str) for a in axes):
            raise VolumeError(f"{where}: bad OME-Zarr metadata: an axis has no name")
    transforms = datasets[0].get("coordinateTransformations") or []
    if not isinstance(transforms, list) or not all(isinstance(t, dict) for t in transforms):
        raise VolumeError(f"{where}: bad OME-Zarr metadata: level 0's "
                          "'coordinateTransformations' is not a list of objects")
    name = image.get("name", "image")
    return {"axes": axes, "version": str(version), "transforms": transforms,
            "name": name if isinstance(name, str) else "image", "path": datasets[0]["path"]}


def _axis_roles(axes, ndim, where):
    """Each axis as t (time: a batch axis), c (channel) or s (space); refuses what
    is not ``[t,] [c,] z, y, x``, the order NGFF prescribes."""
    if axes is None:
        if ndim != 5:
            raise VolumeError(f"{where}: OME-Zarr image without 'axes' and of rank {ndim}; "
                              "without axes only the 5-D (t, c, z, y, x) of NGFF 0.1-0.2 "
                              "is understood")
        axes = _DEFAULT_AXES
    if len(axes) != ndim:
        raise VolumeError(f"{where}: bad OME-Zarr metadata: {len(axes)} axes for an array "
                          f"of rank {ndim}")
    roles = []
    for a in axes:
        kind = a.get("type")
        role = _ROLES.get(kind) if isinstance(kind, str) else None
        if role is None:
            role = _NAMED.get(a["name"].lower())
        if role is None:
            raise VolumeError(f"{where}: OME-Zarr axis {a['name']!r} (type {kind!r}) cannot "
                              "be mapped; expected time, channel and space axes")
        roles.append(role)
    text = "".join(roles)
    if text not in ("sss", "csss", "tsss", "tcsss"):
        names = ", ".join(a["name"] for a in axes)
        raise VolumeError(f"{where}: OME-Zarr axes ({names}) cannot be mapped to a 3-D "
                          "volume; expected [t,] [c,] z, y, x (three space axes)")
    return axes, text


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
            try:
                multiscales, version = _multiscales(node.attrs)
            except (AttributeError, TypeError, KeyError, IndexError, ValueError):
                raise VolumeError(f"{where}: bad OME-Zarr metadata (no readable "
                                  "'multiscales')") from None
            if multiscales is not None:
                self.ome = _ome_image(multiscales, version, where)
                array_path = "/".join(p for p in ((array_path or "").strip("/"),
                                                  self.ome["path"].strip("/")) if p)
            else:
                try:
                    arrays = [name for name, _ in node.arrays()]
                except Exception as exc:
                    raise VolumeError(f"{where}: cannot list the group's arrays ({exc})") from None
                if len(arrays) != 1:
                    raise VolumeError(f"{path}: name the array as {path}:/path; the group holds "
                                      f"{len(arrays)} arrays{': ' + ', '.join(arrays) if arrays else ''}")
                array_path = "/".join(p for p in ((array_path or "").strip("/"), arrays[0]) if p)
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
            axes, roles = _axis_roles(self.ome["axes"], len(shape), where)
            self.ome["file_axes"] = axes
            self.ome["scale"], self.ome["translation"] = _transforms(self.ome["transforms"],
                                                                     len(shape), where)
            if roles == "tsss":  # a batch of one-channel volumes
                self._insert = 1
                shape = shape[:1] + (1,) + shape[1:]
                axes = axes[:1] + [{"name": "c", "type": "channel"}] + axes[1:]
            self.ome["axes"] = axes
        self.shape, self.dtype = shape, np.dtype(node.dtype)
        self.zarr_format = node.metadata.zarr_format

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

    def scale_translation(self):
        """(scale, translation) of the spatial axes (z, y, x) at level 0, or None."""
        if not self.ome:
            return None
        return self.ome["scale"][-3:], self.ome["translation"][-3:]


def _transforms(transforms, ndim, where):
    """Level 0's (scale, translation), one finite number per axis."""
    scale, trans = [1.0] * ndim, [0.0] * ndim
    for t in transforms:
        kind = t.get("type")
        if kind not in ("scale", "translation"):
            continue
        values = t.get(kind)
        if not isinstance(values, list) or len(values) != ndim or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                for v in values):
            raise VolumeError(f"{where}: bad OME-Zarr metadata: the {kind} of level 0 is not "
                              f"{ndim} finite numbers (got {str(values)[:80]})")
        if kind == "scale":
            scale = [float(v) for v in values]
        else:
            trans = [float(v) for v in values]
    return scale, trans


class ZarrOutput:
    """The output: chunked like the tiles, written in place by every worker.

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
    """

    single_writer = False

    def __init__(self, spec, overwrite=False, resume=False):
        self.spec, self.overwrite, self.resume = spec, overwrite, resume
        store = spec.path.rstrip("/")
        inner = (spec.dataset or "").strip("/")
        folder = os.path.dirname(os.path.abspath(store))
        check_writable_dir(folder, f"OUTPUT {spec}")
        self.in_store = bool(inner) and os.path.isdir(store)
        if self.in_store:  # one array (or OME image group) of an existing store
            self.root, self.node = store, inner + ".partial"
            self.final = os.path.join(store, *inner.split("/"))
            self.partial = self.final + ".partial"
            self.array_path = self.node
            self.shown = f"{store}:/{inner}"
        else:
            self.final = store
            self.root = self.partial = store + ".partial"
            self.node = ""
            self.array_path = inner or "data"
            self.shown = store
        _recover_aside(self.final)
        remove_stale(os.path.dirname(self.final))
        if os.path.lexists(self.final) and not overwrite:
            raise OutputExistsError(f"OUTPUT {spec} exists; pass --overwrite to replace it")
        if self.in_store and os.path.isdir(self.final) and _is_group(self.final):
            raise VolumeError(f"OUTPUT {spec} is a group of {store}, not an array; name an "
                              "array (a group's members are never replaced)")
        self.done_dir = os.path.join(self.partial, ".conv3d", "done")
        self._lock = None
        self._array = None
        self.committed = False

    def check_input(self, volume):
        """Refuse an OUTPUT that is, or holds, the input array (writing it would delete it)."""
        if volume.spec.format != "zarr" or not os.path.exists(self.final):
            return
        array = volume.array
        if self.in_store:
            if not os.path.samefile(array.path, self.root):
                return
            node = self.node[:-len(".partial")]
            inside = array.array_path.strip("/") == node or \
                array.array_path.strip("/").startswith(node + "/")
        else:
            inside = os.path.samefile(array.path, self.final)
        if inside:
            raise VolumeError(f"OUTPUT {self.spec} is or holds the input {volume.spec}; write to "
                              "another store, or to a new array of this one (store.zarr:/name)")

    def prepare(self, shape, dtype, chunks, plan_record, zarr_format=3, ome=None):
        """Create (or, resuming, reopen) the partial store or array.

        Returns (indices of the tiles already done, the recorded tiles or None).
        The record's ``tiles`` are the tiling the store is chunked for; the
        rest (input, layer, weights, output shape) must match to resume.
        """
        zarr = require_zarr()
        record_path = os.path.join(self.partial, ".conv3d", "plan.json")
        same = {k: v for k, v in plan_record.items() if k != "tiles"}
        self._lock_partial()
        if ome is not None:  # an OME-Zarr image: metadata on the group, level 0 at "data"
            self.array_path = "/".join(p for p in (self.node, "data") if p)
        if self.resume and os.path.exists(record_path):
            old = _read_record(record_path, self.partial)
            if {k: v for k, v in old.items() if k != "tiles"} != same:
                raise ArgumentError(
                    f"--resume: {self.partial} was written by another job (input, layer, "
                    "weights or output differ); remove it or run without --resume")
            try:
                self._array = zarr.open_array(store=self.root, mode="r+", path=self.array_path)
                done = {int(n) for n in os.listdir(self.done_dir) if n.isdigit()}
            except Exception as exc:
                raise ArgumentError(f"--resume: {self.partial} cannot be reopened ({exc}); "
                                    "remove it or run without --resume") from None
            return done, old["tiles"]
        _empty_folder(self.partial)
        if self.in_store:
            zarr_format = zarr.open_group(store=self.root, mode="r").metadata.zarr_format
            root = zarr.open_group(store=self.root, mode="r+")
            if ome is not None:
                root = root.create_group(self.node)
        else:
            root = zarr.open_group(store=self.root, mode="w-", zarr_format=zarr_format)
        name = self.array_path[len(self.node):].lstrip("/") if ome is not None or not self.node \
            else self.node
        self._array = root.create_array(name=name, shape=tuple(shape), chunks=tuple(chunks),
                                        dtype=np.dtype(dtype), fill_value=0)
        if ome is not None:
            root.attrs.update(ome)
        os.makedirs(self.done_dir, exist_ok=True)
        with open(record_path, "w") as fh:
            json.dump(plan_record, fh)
        return set(), None

    def _lock_partial(self):
        """Hold an exclusive flock on the partial folder (made if missing) for the run."""
        import fcntl
        os.makedirs(self.partial, exist_ok=True)
        fd = os.open(self.partial, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VolumeError(f"OUTPUT {self.spec} is being written by another run (its "
                              f"partial {self.partial} is locked)") from None
        except OSError:  # no flock here: unlocked, as before
            pass
        self._lock = fd

    def _unlock(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __setitem__(self, idx, value):
        self._array[idx] = value

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = require_zarr().open_array(store=self.root, mode="r+",
                                                path=self.array_path)

    def mark_done(self, index):
        open(os.path.join(self.done_dir, str(index)), "w").close()

    def commit(self):
        """Rename the complete partial store or array to OUTPUT."""
        what = f"OUTPUT {self.spec}"
        self._array = None
        try:
            with signals.shielded():
                if os.path.lexists(self.final):
                    if not self.overwrite:
                        raise OutputExistsError(f"{what} was created by another process while "
                                                "this run computed; pass --overwrite to replace it")
                    aside = temp_path(os.path.dirname(self.final), os.path.basename(self.final))
                    os.rename(self.final, aside)
                    try:
                        place(self.partial, self.final, False, what)
                    except BaseException:
                        os.rename(aside, self.final)
                        raise
                    shutil.rmtree(aside, ignore_errors=True)
                else:
                    place(self.partial, self.final, False, what)
                self.committed = True
        finally:
            self._unlock()
        shutil.rmtree(os.path.join(self.final, ".conv3d"), ignore_errors=True)

    def abort(self, keep=True):
        """A failed run keeps its partial store or array for --resume (or removes it).

        Returns what it kept, as a sentence for the user, or None."""
        self._unlock()
        if self.committed:
            return f"OUTPUT {self.shown} was written"
        if not os.path.exists(os.path.join(self.partial, ".conv3d", "plan.json")):
            if os.path.isdir(self.partial) and not os.listdir(self.partial):
                os.rmdir(self.partial)  # made to be locked, nothing written yet
            return None
        if not keep:
            shutil.rmtree(self.partial, ignore_errors=True)
            return None
        shown = f"{self.root}:/{self.node}" if self.in_store else self.partial
        return (f"its partial output {shown} is kept: run again with --resume to continue, "
                "or delete it")


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


def ome_output_attrs(volume, geoms, shape, version=None):
    """OME-Zarr multiscales metadata for the output (one level, path "data")."""
    st = volume.scale_translation() if volume is not None else None
    scale, trans = st if st else ([1.0] * 3, [0.0] * 3)
    new_scale, new_trans = [], []
    for s, t, g in zip(scale, trans, geoms):
        p0, p1 = g.position(0), g.position(1)
        new_scale.append(s * (p1 - p0))
        new_trans.append(t + s * p0)
    n = len(shape)
    axes = (volume.ome["axes"] if volume is not None and volume.ome and volume.ome["axes"]
            and len(volume.ome["axes"]) == n else
            ([{"name": "c", "type": "channel"}] if n == 4 else []) +
            [{"name": a, "type": "space"} for a in "zyx"])
    full_scale = [1.0] * (n - 3) + new_scale
    full_trans = [0.0] * (n - 3) + new_trans
    ms = [{"version": version or "0.4", "name": "conv3d", "axes": axes,
           "datasets": [{"path": "data", "coordinateTransformations": [
               {"type": "scale", "scale": full_scale},
               {"type": "translation", "translation": full_trans}]}]}]
    if version and version.startswith("0.5"):
        for m in ms:
            m.pop("version")
        return {"ome": {"version": version, "multiscales": ms}}
    return {"multiscales": ms}
