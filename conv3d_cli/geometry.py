"""Where voxels lie: a volume's geometry, and how a layer moves it.

A :class:`Geometry` is format-neutral. Its ``affine`` maps a volume's spatial
voxel indices, in the order of its array's spatial axes (the engine's D, H,
W), to world coordinates (x, y, z; RAS+ for NIfTI); ``units`` names the unit
of each spatial axis; ``header`` is what one format needs to write its own
metadata back (a NIfTI header to copy, OME-Zarr axes) and is used only by that
format's writer. Readers make a geometry; :meth:`Geometry.moved` carries it
through a layer; each writer turns the moved geometry into its own metadata.

Per axis, :meth:`conv3d_cli.shapes.AxisGeometry.position` gives the input
voxel coordinate of output voxel ``o``; it is affine in ``o``, so the output's
voxel-to-world matrix is ``A @ M`` with ``M`` that per-axis scale and shift:

- Conv3D: ``o * s + (ke - 1) / 2 - pad_before`` (the centre of the window);
- Conv3DTranspose: ``(o - c) / s`` with ``c = (ke - 1) / 2 - crop_left``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Metres per unit, for the unit names a geometry uses (UDUNITS-2 names, as
# OME-Zarr axes spell them; a NIfTI reader translates xyzt_units into these).
UNIT_METERS = {"meter": 1.0, "centimeter": 1e-2, "millimeter": 1e-3, "micrometer": 1e-6,
               "nanometer": 1e-9, "angstrom": 1e-10}


def voxel_map(geoms) -> np.ndarray:
    """4x4 matrix taking output voxel coordinates to input voxel coordinates."""
    m = np.eye(4)
    for ax, g in enumerate(geoms):
        t = g.position(0)
        m[ax, ax] = g.position(1) - t
        m[ax, 3] = t
    return m


def output_affine(affine, geoms) -> np.ndarray:
    return np.asarray(affine, dtype=np.float64) @ voxel_map(geoms)


def _frozen(matrix):
    if matrix is None:
        return None
    m = np.array(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
    m.flags.writeable = False
    return m


@dataclass(frozen=True, eq=False)
class Geometry:
    """A volume's placement in the world (see the module docstring).

    ``affine``: 4x4 spatial voxel -> world, or None when the file has no world
    coordinates (.npy, HDF5, a plain Zarr array). ``units``: one unit name per
    spatial axis (:data:`UNIT_METERS` keys; None where unknown), or None.
    ``header``: opaque, for the writer of the format it came from. ``kind``:
    what placed the voxels, for display: ``"affine"`` (NIfTI), ``"ome"``
    (OME-Zarr) or ``"none"``. ``to_source``: 4x4 map from this volume's voxel
    indices to those of the file it was computed from (the identity for a
    file as read); a writer that must place voxels somewhere (NIfTI) uses it
    when there is no ``affine``, so an output of a .npy lies on its input's
    voxel grid.
    """

    affine: np.ndarray | None = None
    units: tuple | None = None
    header: object = None
    kind: str = "none"
    to_source: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __post_init__(self):
        object.__setattr__(self, "affine", _frozen(self.affine))
        object.__setattr__(self, "to_source", _frozen(self.to_source))
        if self.units is not None:
            object.__setattr__(self, "units", tuple(self.units))

    def moved(self, geoms) -> Geometry:
        """The geometry of a layer's output, whose per-axis geometry is ``geoms``."""
        m = voxel_map(geoms)
        return Geometry(None if self.affine is None else self.affine @ m, self.units,
                        self.header, self.kind, self.to_source @ m)

    @property
    def voxel_sizes(self):
        """Length of one voxel step along each spatial axis (in ``units``), or None."""
        if self.affine is None:
            return None
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    def voxel_sizes_in(self, unit):
        """Voxel sizes converted to ``unit``, or None where a unit is unknown."""
        sizes = self.voxel_sizes
        if sizes is None or self.units is None or \
                any(u not in UNIT_METERS for u in self.units):
            return None
        return tuple(s * UNIT_METERS[u] / UNIT_METERS[unit] for s, u in zip(sizes, self.units))
