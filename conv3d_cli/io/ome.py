"""OME-Zarr (OME-NGFF) image metadata: read level 0's axes and transforms, write one level.

Reading: an image group's ``multiscales`` (NGFF 0.4 in Zarr v2, 0.5 under
``ome`` in Zarr v3), level 0's ``axes`` (``[t,] [c,] z, y, x``) and its
``scale`` and ``translation``. Array axis ``k`` of the three spatial ones
lies along the world axis its name says (x, y or z; three spatial axes named
otherwise are taken as z, y, x in array order), so the voxel-to-world affine
is a permutation with scales: ``world[w(k)] = scale[k] * v[k] + translation[k]``.

Writing: the same form, read back from the output's (moved) affine, so an
OME-Zarr input gives an OME-Zarr output whose transforms are moved as a NIfTI
affine is, and a NIfTI input gives one whose spatial axes are named after the
world axes they run along. NGFF 0.4 and 0.5 have only scale and translation:
an affine that is not axis-aligned (an oblique NIfTI) cannot be written, and
the output is then a plain Zarr array (with a note). An axis that runs against
its world axis (x in a LAS image) gets a negative scale.
"""

from __future__ import annotations

import numpy as np

from ..errors import VolumeError


def multiscales_of(attrs):
    """(multiscales, NGFF version) of a group's attributes, or (None, None); the
    multiscales are checked by :func:`image_of`."""
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
WORLD = "xyz"


def image_of(multiscales, version, where):
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


def axis_roles(axes, ndim, where):
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


def level0_transforms(transforms, ndim, where):
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


def world_axes(spatial_axes):
    """The world axis (0 = x, 1 = y, 2 = z) of each of the three spatial axes."""
    names = [a.get("name", "").lower() for a in spatial_axes]
    if sorted(names) == ["x", "y", "z"]:
        return [WORLD.index(n) for n in names]
    return [2, 1, 0]  # z, y, x in array order, as NGFF recommends


def affine_of(axes, scale, translation):
    """The 4x4 spatial voxel -> world matrix of level 0 (the last three axes are space)."""
    a = np.zeros((4, 4))
    a[3, 3] = 1.0
    for k, w in enumerate(world_axes(axes[-3:])):
        a[w, k] = scale[len(scale) - 3 + k]
        a[w, 3] = translation[len(translation) - 3 + k]
    return a


def units_of(axes):
    """The unit of each spatial axis (None where the axis names none)."""
    return tuple(a.get("unit") if isinstance(a.get("unit"), str) else None for a in axes[-3:])


# -------------------------------------------------------------- the output side
# Entries of a column below this fraction of its largest are rounding noise
# (a qform stored in float32), not obliquity.
ALIGNED_RTOL = 1e-6
OBLIQUE_NOTE = ("the input's affine is oblique (not a scaling of the array axes), which "
                "OME-NGFF 0.4/0.5 scale and translation cannot express: OUTPUT is a plain "
                "Zarr array without coordinates")


def aligned_axes(affine):
    """Per spatial array axis (world axis, scale, translation), or None when the
    affine is not axis-aligned."""
    a = np.asarray(affine, dtype=np.float64)
    found = []
    for k in range(3):
        column = np.abs(a[:3, k])
        big = np.flatnonzero(column > ALIGNED_RTOL * column.max())
        if len(big) != 1:
            return None
        w = int(big[0])
        found.append((w, float(a[w, k]), float(a[w, 3])))
    if sorted(w for w, _, _ in found) != [0, 1, 2]:
        return None
    return found


def _default_axes(rank, aligned, units):
    lead = {3: [], 4: [{"name": "c", "type": "channel"}],
            5: [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}]}[rank]
    spatial = []
    for (w, _, _), unit in zip(aligned, units or (None,) * 3):
        axis = {"name": WORLD[w], "type": "space"}
        if unit:
            axis["unit"] = unit
        spatial.append(axis)
    return lead + spatial


def multiscales_for(geometry, rank, header_axes=None):
    """(the ``multiscales`` list of a one-level image at path "data", or None; a note
    or None) for an array of ``rank`` placed by ``geometry``."""
    if geometry is None or geometry.affine is None:
        return None, None
    aligned = aligned_axes(geometry.affine)
    if aligned is None:
        return None, OBLIQUE_NOTE
    if not 3 <= rank <= 5:
        return None, (f"OME-NGFF images have at most 5 axes; OUTPUT (rank {rank}) is a plain "
                      "Zarr array without coordinates")
    axes = header_axes if header_axes and len(header_axes) == rank else \
        _default_axes(rank, aligned, geometry.units)
    scale = [1.0] * (rank - 3) + [s for _, s, _ in aligned]
    translation = [0.0] * (rank - 3) + [t for _, _, t in aligned]
    return [{"name": "conv3d", "axes": axes, "datasets": [{
        "path": "data", "coordinateTransformations": [
            {"type": "scale", "scale": scale},
            {"type": "translation", "translation": translation}]}]}], None


def group_attrs(multiscales, zarr_format):
    """The image group's attributes: NGFF 0.4 in Zarr v2, 0.5 in Zarr v3."""
    if zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **m} for m in multiscales]}
    return {"ome": {"version": "0.5", "multiscales": multiscales}}
