"""Summary statistics of a volume, streamed region by region (``conv3d info --stats``)."""

from __future__ import annotations

import math

import numpy as np

# Bytes of voxels read at a time.
DEFAULT_BLOCK_BYTES = 64 << 20


def volume_stats(vol, block_bytes=DEFAULT_BLOCK_BYTES) -> dict:
    """{min, max, mean, nan_count, voxels} of the opened volume ``vol``.

    The volume is read in slabs along the axis it stores slowest (its first
    spatial axis in ``split_order``; the leading axis for arrays of rank > 3),
    each of at most ``block_bytes`` where a slab one index thick allows, so
    memory stays bounded whatever the volume's size. NaNs are counted and left
    out of min, max and mean; the mean is accumulated in float64. min, max and
    mean are None when every voxel is NaN.
    """
    shape = vol.shape
    axis = _slab_axis(vol)
    per_index = math.prod(shape) // max(shape[axis], 1) * vol.dtype.itemsize
    step = max(1, block_bytes // max(per_index, 1))
    lo = hi = None
    total, count, nans = 0.0, 0, 0
    for start in range(0, shape[axis], step):
        region = [slice(None)] * len(shape)
        region[axis] = slice(start, min(start + step, shape[axis]))
        block = np.asarray(vol.array[tuple(region)])
        if block.dtype.kind == "f":
            finite = ~np.isnan(block)
            missing = int(block.size - np.count_nonzero(finite))
            if missing:
                nans += missing
                block = block[finite]
        if block.size == 0:
            continue
        bmin, bmax = block.min(), block.max()
        lo = bmin if lo is None else min(lo, bmin)
        hi = bmax if hi is None else max(hi, bmax)
        total += float(np.sum(block, dtype=np.float64))
        count += int(block.size)
    return {"min": _number(lo), "max": _number(hi),
            "mean": total / count if count else None, "nan_count": nans,
            "voxels": int(math.prod(shape))}


def _slab_axis(vol):
    """The array axis stored slowest: slabs along it are contiguous runs of the file."""
    rank = len(vol.shape)
    if rank <= 3:
        return vol.split_order[0]
    if rank == 4 and vol.axes == "channels_last":
        return vol.split_order[0]
    if rank == 4 and vol.axes == "channels_first":
        return vol.split_order[0] + 1
    return 0


def _number(value):
    if value is None:
        return None
    value = value.item()
    return value if isinstance(value, int) else float(value)
