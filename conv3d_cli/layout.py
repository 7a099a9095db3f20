"""Map an array's own axes to the engine's canonical layout and back.

The engine works on ``(B, D, H, W, C)`` blocks: batch dims flattened, spatial
axes, channels last. A volume array is one of:

- Keras layout, rank >= 5: batch dims, then spatial and channels per
  ``data_format``;
- rank 4: one volume with channels (``(D, H, W, C)`` or ``(C, D, H, W)``);
- rank 3: one volume with one channel.

:class:`Layout` is pure bookkeeping; :class:`CanonicalView` reads and writes
canonical blocks through any object that supports NumPy basic slicing
(``ndarray``, ``h5py.Dataset``, the npy/NIfTI readers in :mod:`conv3d_cli.io`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ShapeError


@dataclass(frozen=True)
class Layout:
    shape: tuple  # the array's own shape
    data_format: str

    def __post_init__(self):
        if len(self.shape) < 3:
            raise ShapeError(
                f"expected a volume of rank >= 3 (D, H, W), got shape {tuple(self.shape)}")
        if any(n <= 0 for n in self.shape):
            raise ShapeError(f"volume shape {tuple(self.shape)} has an empty dimension")

    @property
    def rank(self):
        return len(self.shape)

    @property
    def channels_first(self):
        return self.data_format == "channels_first"

    @property
    def batch_shape(self):
        return tuple(self.shape[:-4]) if self.rank >= 5 else ()

    @property
    def keras_shape(self):
        """The shape Keras sees (rank >= 5)."""
        if self.rank >= 5:
            return tuple(self.shape)
        if self.rank == 3:
            return (1,) + tuple(self.shape) + (1,) if not self.channels_first \
                else (1, 1) + tuple(self.shape)
        return (1,) + tuple(self.shape)

    @property
    def canonical_shape(self):
        ks = self.keras_shape
        b = math.prod(ks[:-4])
        if self.channels_first:
            return (b,) + tuple(ks[-3:]) + (ks[-4],)
        return (b,) + tuple(ks[-4:])

    def output_shape(self, canonical_out, data_format=None):
        """Own-axes shape of the output whose canonical shape is ``canonical_out``.

        Exactly the axes the tool added are dropped: the batch axis of a rank
        3/4 volume, and the channel axis of a rank-3 volume when it has one
        filter. ``data_format`` places the output's channels (default: where
        this layout has them; a format may force its own, e.g. NIfTI's last).
        """
        b, d, h, w, f = canonical_out
        first = self.channels_first if data_format is None else data_format == "channels_first"
        spatial_c = ((f, d, h, w) if first else (d, h, w, f))
        if self.rank >= 5:
            return self.batch_shape + spatial_c
        if self.rank == 3 and f == 1:
            return (d, h, w)
        return spatial_c

    def output_layout(self, canonical_out, data_format=None) -> Layout:
        """The :class:`Layout` of that output (see :meth:`output_shape`)."""
        return Layout(self.output_shape(canonical_out, data_format),
                      data_format or self.data_format)


class CanonicalView:
    """Canonical ``(B, D, H, W, C)`` block access to an array in ``layout``.

    The one way blocks go in and out of volumes: :meth:`read` and
    :meth:`write` (and :meth:`region_view`, for the engine to compute into an
    in-memory output in place). ``parallel_writes`` passes on the array's
    (an output writer's) ``parallel_writes``: whether worker processes may
    write their blocks themselves. An in-memory array says no: a forked
    worker's writes into it would stay in that worker.
    """

    def __init__(self, array, layout: Layout):
        self.array = array
        self.layout = layout
        self.shape = layout.canonical_shape
        self.parallel_writes = bool(getattr(array, "parallel_writes", False))
        self._flat = _flat_batches(array, layout)

    def _inner(self, ranges):
        sp = tuple(slice(a, z) for a, z in ranges)
        if self.layout.rank == 3:
            return sp
        return (slice(None),) + sp if self.layout.channels_first else sp + (slice(None),)

    def _own_index(self, b, ranges):
        """Own-axes index of flat batch element b and spatial ranges."""
        if self.layout.rank < 5:
            return self._inner(ranges)
        return tuple(int(i) for i in np.unravel_index(b, self.layout.batch_shape)) + self._inner(ranges)

    def read(self, b0, b1, ranges):
        """Canonical block ``[b0:b1, ranges..., :]`` (ranges inside the array)."""
        if self._flat is not None:
            block = self._flat[(slice(b0, b1),) + self._inner(ranges)]
        else:
            block = np.stack([np.asarray(self.array[self._own_index(b, ranges)])
                              for b in range(b0, b1)])
        if self.layout.rank == 3:
            return block[..., None]
        return np.moveaxis(block, 1, -1) if self.layout.channels_first else block

    def region_view(self, b0, b1, ranges):
        """A writable canonical view of an in-memory array's region, or None."""
        if self._flat is None or self.layout.channels_first:
            return None
        return self._flat[(slice(b0, b1),) + self._inner(ranges)]

    def write(self, b0, b1, ranges, block):
        """Store a canonical block at ``[b0:b1, ranges..., :]``."""
        dtype = getattr(self.array, "dtype", None)
        if dtype is not None and block.dtype != dtype:  # h5py cannot convert bfloat16
            block = block.astype(dtype)
        if self.layout.rank == 3:
            block = block[..., 0]
        elif self.layout.channels_first:
            block = np.moveaxis(block, -1, 1)
        if self._flat is not None:
            self._flat[(slice(b0, b1),) + self._inner(ranges)] = block
            return
        for i, b in enumerate(range(b0, b1)):
            self.array[self._own_index(b, ranges)] = block[i]


def _flat_batches(array, layout):
    """An in-memory Keras-layout array with its batch dims flattened into one, as a
    view of it, or None.

    The batch dims flatten into a view only when their strides chain (a
    slice such as ``x[:, :3]`` breaks that); NumPy's ``reshape`` then
    returns a copy without a word, and writes into a copy would be lost. A
    copy never shares the array's memory, so it is detected and dropped:
    such arrays are read and written one batch element at a time.
    """
    if not isinstance(array, np.ndarray) or layout.rank < 5:
        return None
    flat = array.reshape((layout.canonical_shape[0],) + tuple(layout.shape[-4:]))
    return flat if np.may_share_memory(flat, array) else None
