"""Orthogonal slices through one world point: the sampling behind ``conv3d preview``.

World coordinates are RAS+ (``x``: left -> right, ``y``: posterior ->
anterior, ``z``: inferior -> superior), in the volume's units (millimetres
for NIfTI). Each volume maps its three spatial voxel indices ``v`` (in the
order of its array axes) to the world by a 4x4 matrix ``A``:

- NIfTI: the image's affine (sform, else qform);
- OME-Zarr: each spatial axis along the world axis it is named after (axes
  ``z, y, x`` give ``x = sx * v[2] + tx``, ``y = sy * v[1] + ty``,
  ``z = sz * v[0] + tz``: level 0 scale and translation);
- anything else (``.npy``, HDF5, plain Zarr): no geometry; the identity
  (array axes 0, 1, 2 are x, y, z in voxels), and the caller says so.

(:attr:`conv3d_cli.io.Volume.geometry` holds that matrix.)

All volumes are sampled on one world grid (isotropic spacing, the finest
voxel size of them all, covering the union of their extents), so the same
world position falls on the same pixel in every row: an input and its strided
or transposed output line up through their geometry, not their indices.
A plane is sampled by nearest neighbour, ``v = round(inv(A) @ world)``: every
pixel shows a stored voxel value, never an interpolated one. Only the voxels a
plane touches are read (a slab for an oblique affine), region by region.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError

# plane -> (world axis held fixed, horizontal world axis, vertical world axis).
# Horizontal axes increase to the right and vertical axes upwards: the
# "neurological" view, in which the subject's left is on the image's left.
PLANES = {"axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}
AXIS_NAMES = "xyz"
AXIS_DIRECTIONS = ("L → R", "P → A", "I → S")
READ_BUDGET = 1 << 24  # voxels per region read (64 MiB of float32)


@dataclass(frozen=True)
class SliceSource:
    """How to read one volume's 3-D spatial data and place it in the world."""

    name: str
    shape: tuple          # the file's array shape
    spatial_axes: tuple   # the three array axes that are space, ascending
    fixed: dict           # array axis -> index, for every non-spatial axis
    affine: np.ndarray    # spatial voxel (in spatial_axes order) -> world
    geometry: str         # "affine", "ome" or "none"
    unit: str = ""
    label: str = ""       # e.g. "channel 2", "frame 1"

    @property
    def spatial_shape(self):
        return tuple(self.shape[a] for a in self.spatial_axes)

    @property
    def voxel_size(self):
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    def world(self, voxel):
        return self.affine[:3, :3] @ np.asarray(voxel, float) + self.affine[:3, 3]

    def voxel(self, world):
        return np.linalg.solve(self.affine[:3, :3], np.asarray(world, float) - self.affine[:3, 3])

    def centre(self):
        return self.world([(n - 1) / 2 for n in self.spatial_shape])

    def corners(self):
        """World positions of the 8 outer corners of the voxel box."""
        lo_hi = [(-0.5, n - 0.5) for n in self.spatial_shape]
        return np.array([self.world(c) for c in np.array(np.meshgrid(*lo_hi)).reshape(3, -1).T])

    def contains(self, world):
        v = np.floor(self.voxel(world) + 0.5)
        return bool(np.all((v >= 0) & (v < np.array(self.spatial_shape))))


def slice_source(vol, channel=None, frame=None, data_format="channels_last"):
    """A :class:`SliceSource` for an open :class:`~conv3d_cli.io.Volume`.

    Non-spatial axes follow the tool's layout rules (rank 3 one volume, rank 4
    with channels, rank >= 5 Keras layout with leading batch axes, counted
    together as frames), with the channels where the format puts them (NIfTI
    ``(X, Y, Z[, C])``, OME-Zarr ``[t,] [c,] z, y, x``), else per
    ``data_format``. A volume with no frame axis takes ``frame`` as its
    channel index (a 4-D NIfTI ``(X, Y, Z, T)`` shows frame T through either
    option). The volume's geometry places it; without one, voxel = world.
    """
    shape = tuple(vol.shape)
    name = os.path.basename(vol.spec.path.rstrip("/")) + (
        f":{vol.spec.dataset}" if vol.spec.dataset else "")
    spatial, channel_axis, frame_axes = _layout_axes(len(shape), vol.axes or data_format)
    geometry = vol.geometry
    if geometry.affine is not None:
        affine, kind, unit = np.asarray(geometry.affine, float), geometry.kind, _unit(geometry)
    else:
        affine, kind, unit = np.eye(4), "none", ""
    fixed, label = _fixed_indices(name, shape, channel_axis, frame_axes, channel, frame)
    return SliceSource(name, shape, spatial, fixed, affine, kind, unit, label)


_SHORT_UNITS = {"millimeter": "mm", "micrometer": "µm", "meter": "m", "nanometer": "nm"}


def _unit(geometry):
    """The unit of the spatial axis that runs along world x, as a label."""
    if not geometry.units:
        return ""
    axis = int(np.argmax(np.abs(geometry.affine[0, :3])))
    unit = geometry.units[axis]
    return _SHORT_UNITS.get(unit, unit) if unit else ""


def _layout_axes(rank, data_format):
    if rank == 3:
        return (0, 1, 2), None, ()
    if rank == 4:
        return ((1, 2, 3), 0, ()) if data_format == "channels_first" else ((0, 1, 2), 3, ())
    batch = tuple(range(rank - 4))
    if data_format == "channels_first":
        return (rank - 3, rank - 2, rank - 1), rank - 4, batch
    return (rank - 4, rank - 3, rank - 2), rank - 1, batch


def _fixed_indices(name, shape, channel_axis, frame_axes, channel, frame):
    """Index of every non-spatial axis, checked against its length."""
    fixed, label = {}, []
    if not frame_axes and frame is not None:  # the 4th axis of (X, Y, Z, T) is the frame
        if channel is not None and channel != frame:
            raise ArgumentError(f"{name}: --channel {channel} and --frame {frame} both index "
                                f"its only non-spatial axis; give one")
        channel = frame
        frame = None
    if channel_axis is not None:
        c = 0 if channel is None else channel
        n = shape[channel_axis]
        if not 0 <= c < n:
            raise ArgumentError(f"--channel {c}: {name} has {n} channel(s) on axis "
                                f"{channel_axis} (shape {shape}); expected 0 to {n - 1}")
        fixed[channel_axis] = c
        if n > 1:
            label.append(f"channel {c} (0-{n - 1})")
    if frame_axes:
        f = 0 if frame is None else frame
        counts = tuple(shape[a] for a in frame_axes)
        total = math.prod(counts)
        if not 0 <= f < total:
            raise ArgumentError(f"--frame {f}: {name} has {total} frame(s) (shape {shape}); "
                                f"expected 0 to {total - 1}")
        fixed.update(zip(frame_axes, (int(i) for i in np.unravel_index(f, counts))))
        if total > 1:
            label.append(f"frame {f} (0-{total - 1})")
    return fixed, ", ".join(label)


@dataclass(frozen=True)
class WorldGrid:
    """Sample centres ``lo + (k + 1/2) * spacing``, ``k < size``, per world axis."""

    lo: tuple
    spacing: float
    size: tuple

    def centres(self, axis):
        return self.lo[axis] + (np.arange(self.size[axis]) + 0.5) * self.spacing

    def extent(self, axis):
        return (float(self.lo[axis]), float(self.lo[axis] + self.size[axis] * self.spacing))


def world_grid(sources, max_size=512):
    """One grid over the union of the volumes' extents, at the finest voxel size
    (coarser if a side would exceed ``max_size`` samples)."""
    corners = np.concatenate([s.corners() for s in sources])
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    finest = min(min(s.voxel_size) for s in sources)
    spacing = max(finest, float((hi - lo).max()) / max_size)
    size = tuple(max(1, int(math.ceil(round((b - a) / spacing, 6)))) for a, b in zip(lo, hi))
    return WorldGrid(tuple(float(v) for v in lo), float(spacing), size)


def plane_voxels(source, grid, plane, point):
    """Voxel indices (rows, cols, 3) of the plane's samples and where they are inside.

    Row 0 is the lowest vertical coordinate (the image is drawn with the
    origin at the bottom)."""
    fixed_axis, h_axis, v_axis = PLANES[plane]
    hs, vs = grid.centres(h_axis), grid.centres(v_axis)
    world = np.empty((len(vs), len(hs), 3))
    world[..., fixed_axis] = point[fixed_axis]
    world[..., h_axis] = hs[None, :]
    world[..., v_axis] = vs[:, None]
    inv = np.linalg.inv(source.affine)
    voxel = world @ inv[:3, :3].T + inv[:3, 3]
    index = np.floor(voxel + 0.5).astype(np.int64)  # nearest neighbour
    inside = np.all((index >= 0) & (index < np.array(source.spatial_shape)), axis=-1)
    return index, inside


def sample_plane(array, source, grid, plane, point, budget=READ_BUDGET):
    """The plane's samples (rows, cols) as float32; NaN outside the volume."""
    index, inside = plane_voxels(source, grid, plane, point)
    return _gather(array, source, index, inside, budget)


def _gather(array, source, index, inside, budget):
    out = np.full(index.shape[:2], np.nan, np.float32)
    if not inside.any():
        return out
    chosen = index[inside]
    lo, hi = chosen.min(axis=0), chosen.max(axis=0) + 1
    rows, cols = index.shape[:2]
    if math.prod(hi - lo) > budget and rows * cols > 1:
        # An oblique plane crosses a thick slab: read it in halves of the grid.
        if rows >= cols:
            h = rows // 2
            out[:h] = _gather(array, source, index[:h], inside[:h], budget)
            out[h:] = _gather(array, source, index[h:], inside[h:], budget)
        else:
            h = cols // 2
            out[:, :h] = _gather(array, source, index[:, :h], inside[:, :h], budget)
            out[:, h:] = _gather(array, source, index[:, h:], inside[:, h:], budget)
        return out
    region = _read_region(array, source, lo, hi)
    local = chosen - lo
    out[inside] = region[local[:, 0], local[:, 1], local[:, 2]]
    return out


def _read_region(array, source, lo, hi):
    idx = [None] * len(source.shape)
    for axis, index in source.fixed.items():
        idx[axis] = index
    for k, axis in enumerate(source.spatial_axes):
        idx[axis] = slice(int(lo[k]), int(hi[k]))
    return np.asarray(array[tuple(idx)], dtype=np.float32)


def intensity_window(planes, percentiles=(1.0, 99.0), vmin=None, vmax=None):
    """(vmin, vmax): percentiles of the finite samples of ``planes`` unless given.

    A window that collapses (mostly constant planes, e.g. one bright voxel in
    zeros) widens to the samples' full range, so the outlier still shows."""
    values = np.concatenate([p[np.isfinite(p)].ravel() for p in planes])
    if values.size == 0:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
        if hi <= lo:
            lo, hi = float(values.min()), float(values.max())
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi
