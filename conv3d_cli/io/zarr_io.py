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

Resumable runs: the output is written to ``OUTPUT.partial`` first, and every
finished tile leaves a marker file in ``OUTPUT.partial/.conv3d/done``; the
plan it belongs to is recorded in ``.conv3d/plan.json``. ``--resume`` reuses
a partial store whose recorded plan matches and skips the marked tiles; the
store is renamed to OUTPUT when every tile is done.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from ..errors import ArgumentError, OutputExistsError, VolumeError
from .paths import refuse_input


def require_zarr():
    try:
        import zarr
    except ImportError:
        raise ArgumentError(
            "Zarr volumes need the zarr package: pip install \"conv3d-cli[distributed]\"") from None
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
    """The output store: chunked like the tiles, written in place by every worker."""

    single_writer = False

    def __init__(self, spec, overwrite=False, resume=False, inputs=()):
        refuse_input(spec, inputs)
        self.spec = spec
        self.final = spec.path
        self.partial = spec.path.rstrip("/") + ".partial"
        self.array_path = (spec.dataset or "/data").strip("/")
        if os.path.exists(self.final) and not overwrite:
            raise OutputExistsError(f"OUTPUT {spec} exists; pass --overwrite to replace it")
        self.resume = resume
        self.done_dir = os.path.join(self.partial, ".conv3d", "done")

    def prepare(self, shape, dtype, chunks, plan_record, zarr_format=3, ome=None):
        """Create (or, resuming, reopen) the partial store.

        Returns (indices of the tiles already done, the recorded tiles or None).
        The record's ``tiles`` are the tiling the store is chunked for; the
        rest (input, layer, weights, output shape) must match to resume.
        """
        zarr = require_zarr()
        record_path = os.path.join(self.partial, ".conv3d", "plan.json")
        same = {k: v for k, v in plan_record.items() if k != "tiles"}
        if self.resume and os.path.exists(record_path):
            with open(record_path) as fh:
                old = json.load(fh)
            if {k: v for k, v in old.items() if k != "tiles"} != same:
                raise ArgumentError(
                    f"--resume: {self.partial} was written by another job (input, layer, "
                    "weights or output differ); remove it or run without --resume")
            self._array = zarr.open_array(store=self.partial, mode="r+", path=self.array_path)
            return {int(n) for n in os.listdir(self.done_dir)}, old["tiles"]
        if os.path.exists(self.partial):
            shutil.rmtree(self.partial)
        root = zarr.open_group(store=self.partial, mode="w", zarr_format=zarr_format)
        self._array = root.create_array(name=self.array_path, shape=tuple(shape),
                                        chunks=tuple(chunks), dtype=np.dtype(dtype),
                                        fill_value=0)
        if ome is not None:
            root.attrs.update(ome)
        os.makedirs(self.done_dir, exist_ok=True)
        with open(record_path, "w") as fh:
            json.dump(plan_record, fh)
        return set(), None

    def __setitem__(self, idx, value):
        self._array[idx] = value

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._array = require_zarr().open_array(store=self.partial, mode="r+",
                                                path=self.array_path)

    def mark_done(self, index):
        open(os.path.join(self.done_dir, str(index)), "w").close()

    def commit(self):
        shutil.rmtree(os.path.join(self.partial, ".conv3d"), ignore_errors=True)
        if os.path.exists(self.final):
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)

    def abort(self, keep=True):
        """A failed run keeps its partial store for --resume (or removes it)."""
        if not keep:
            shutil.rmtree(self.partial, ignore_errors=True)


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
