"""Zarr volumes (v2 and v3): ``volume.zarr`` or ``store.zarr:/group/array``; OME-Zarr.

Zarr is the format for volumes that need a cluster: every chunk is its own
object, so workers on different machines read and write regions of a shared
store without locks as long as each chunk has one writer. Output arrays are
therefore chunked exactly like the engine's tiles.

An OME-Zarr image (a group with ``multiscales`` metadata, NGFF 0.4 in Zarr v2
or 0.5 in Zarr v3) is read at level 0; its axes are ``[t,] [c,] z, y, x``, so
it is a channels-first volume. The output is written as an OME-Zarr image with
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
import os
import shutil

import numpy as np

from .. import signals
from ..errors import ArgumentError, OutputExistsError, VolumeError
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
    attrs = dict(attrs)
    if "ome" in attrs:  # NGFF 0.5 (Zarr v3)
        return attrs["ome"].get("multiscales"), attrs["ome"].get("version", "0.5")
    if "multiscales" in attrs:  # NGFF 0.4 (Zarr v2)
        ms = attrs["multiscales"]
        return ms, (ms[0].get("version", "0.4") if ms else "0.4")
    return None, None


class ZarrVolume:
    """An input Zarr array (or OME-Zarr level 0) read by region."""

    def __init__(self, path, array_path=None):
        zarr = require_zarr()
        if not os.path.exists(path):
            raise VolumeError(f"{path}: no such Zarr store")
        self.path, self.ome = path, None
        try:
            node = zarr.open(store=path, mode="r", path=(array_path or "").lstrip("/") or None)
        except Exception as exc:
            raise VolumeError(f"{path}{':' + array_path if array_path else ''}: not a readable "
                              f"Zarr array or group ({exc})") from None
        if not hasattr(node, "shape"):  # a group: OME-Zarr image, or the only array
            multiscales, version = _multiscales(node.attrs)
            if multiscales:
                level = multiscales[0]["datasets"][0]
                self.ome = {"axes": multiscales[0].get("axes"), "version": version,
                            "transforms": level.get("coordinateTransformations", []),
                            "name": multiscales[0].get("name", "image")}
                array_path = "/".join(p for p in ((array_path or "").strip("/"), level["path"]) if p)
                node = zarr.open_array(store=path, mode="r", path=array_path)
            else:
                arrays = [name for name, _ in node.arrays()]
                if len(arrays) != 1:
                    raise VolumeError(f"{path}: name the array as {path}:/path; the group holds "
                                      f"{len(arrays)} arrays{': ' + ', '.join(arrays) if arrays else ''}")
                array_path = "/".join(p for p in ((array_path or "").strip("/"), arrays[0]) if p)
                node = zarr.open_array(store=path, mode="r", path=array_path)
        self.array_path = array_path
        self._array = node
        self.shape, self.dtype = tuple(node.shape), np.dtype(node.dtype)
        self.zarr_format = node.metadata.zarr_format

    def __getitem__(self, idx):
        return self._array[idx]

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
        n = len(self.shape)
        scale, trans = [1.0] * n, [0.0] * n
        for t in self.ome["transforms"]:
            if t.get("type") == "scale":
                scale = list(t["scale"])
            elif t.get("type") == "translation":
                trans = list(t["translation"])
        return scale[-3:], trans[-3:]


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
            with open(record_path) as fh:
                old = json.load(fh)
            if {k: v for k, v in old.items() if k != "tiles"} != same:
                raise ArgumentError(
                    f"--resume: {self.partial} was written by another job (input, layer, "
                    "weights or output differ); remove it or run without --resume")
            self._array = zarr.open_array(store=self.root, mode="r+", path=self.array_path)
            return {int(n) for n in os.listdir(self.done_dir)}, old["tiles"]
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
