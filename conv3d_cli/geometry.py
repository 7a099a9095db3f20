"""Where output voxels lie: the NIfTI affine after strides, padding and upsampling.

Per axis, :meth:`conv3d_cli.shapes.AxisGeometry.position` gives the input
voxel coordinate of output voxel ``o``; it is affine in ``o``, so the output's
voxel-to-world matrix is ``A @ M`` with ``M`` that per-axis scale and shift:

- Conv3D: ``o * s + (ke - 1) / 2 - pad_before`` (the centre of the window);
- Conv3DTranspose: ``(o - c) / s`` with ``c = (ke - 1) / 2 - crop_left``.
"""

from __future__ import annotations

import numpy as np


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
