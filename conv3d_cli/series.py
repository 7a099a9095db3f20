"""``--per-volume``: a 4-D series file as a batch of 3-D frames (as fslmaths does).

A 4-D file ``(X, Y, Z, T)`` (NIfTI; any channels-last 4-D array) or
``(T, X, Y, Z)`` (channels first) is read, without ``--per-volume``, as one
volume whose T values per voxel are the layer's input channels. With it, the
series axis T becomes the *batch* axis of the job: the engine sees an
ordinary Keras batch ``(T, X, Y, Z, 1)``, each frame is convolved on its own
with a one-channel layer, and tiles, workers and the memory limit work as for
any batch (a tile is a run of frames times a spatial box). This is cleaner
than replicating the kernel T times with ``groups=T``: the layer keeps its
own weights, ``filters`` stays per frame, and no frame can leak into another.

:class:`AxesView` presents the file (and the output writer) in that Keras
layout by permuting axes and adding the one-channel axis; it reads and
writes by region, so the file is never loaded whole. The output keeps the
series axis where the input had it: ``(X', Y', Z', T)`` with one filter,
``(X', Y', Z', T, F)`` with several (channels first: ``(T, X', Y', Z')``,
``(T, F, X', Y', Z')``).
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError

SERIES_HINT = ("pass --per-volume to apply the layer to each 3-D frame of the series on "
               "its own")


class AxesView:
    """``array`` seen with its axes permuted and singleton axes added.

    ``axes`` lists, for each axis of the view, the array's axis it shows, or
    None for an added axis of length 1. Region reads (``view[index]``) and
    writes (``view[index] = block``) take basic indices (ints and slices, one
    per view axis) and touch only that region of the array.
    """

    def __init__(self, array, axes):
        self.array = array
        self.axes = tuple(axes)
        shown = sorted(a for a in self.axes if a is not None)
        if shown != list(range(len(array.shape))):
            raise ValueError(f"axes {self.axes} must show each of the {len(array.shape)} "
                             "axes of the array once")
        self.shape = tuple(1 if a is None else int(array.shape[a]) for a in self.axes)
        self.dtype = np.dtype(array.dtype)
        self.parallel_writes = bool(getattr(array, "parallel_writes", False))

    def _split(self, index):
        """(the array's index, the view axes kept in the result, in array order)."""
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (len(self.axes) - len(index))
        source = [slice(None)] * len(self.array.shape)
        for i, a in zip(index, self.axes):
            if a is not None:
                source[a] = i
        kept = [v for v, (i, a) in enumerate(zip(index, self.axes))
                if a is not None and isinstance(i, slice)]
        kept.sort(key=lambda v: self.axes[v])
        added = [v for v, (i, a) in enumerate(zip(index, self.axes))
                 if a is None and isinstance(i, slice)]
        return tuple(source), kept, added

    def __getitem__(self, index):
        source, kept, added = self._split(index)
        block = np.asarray(self.array[source])
        # ``block``'s axes are the kept view axes in array order; put them in view order.
        order = sorted(range(len(kept)), key=lambda j: kept[j])
        block = np.transpose(block, order)
        for v in sorted(added):
            block = np.expand_dims(block, sum(1 for k in kept if k < v) +
                                   sum(1 for a in added if a < v))
        return block

    def __setitem__(self, index, block):
        source, kept, added = self._split(index)
        block = np.asarray(block)
        view_axes = sorted(kept + added)
        block = np.squeeze(block, axis=tuple(view_axes.index(v) for v in added))
        in_view = sorted(kept)
        block = np.transpose(block, [in_view.index(v) for v in kept])
        self.array[source] = block

def series_axis(layout):
    """The axis of a 4-D file that holds its series (where a 4-D file's channels are)."""
    return 0 if layout.channels_first else 3


def check_series(layout, spec):
    """Refuse ``--per-volume`` for a file that is not one 4-D series."""
    if layout.rank != 4:
        raise ShapeError(f"INPUT {spec} {tuple(layout.shape)}: --per-volume needs a 4-D file "
                         f"(X, Y, Z, T) with a series axis; this one has {layout.rank} axes")


def input_axes(layout):
    """The :class:`AxesView` axes that show a 4-D series file as a Keras batch of
    one-channel frames: ``(T, X, Y, Z, 1)`` or, channels first, ``(T, 1, X, Y, Z)``."""
    if layout.channels_first:
        return (0, None, 1, 2, 3)
    return (3, 0, 1, 2, None)


def output_axes(channels_first, filters):
    """(the output file's rank, the :class:`AxesView` axes showing it as the Keras
    output ``(T, X', Y', Z', F)`` / ``(T, F, X', Y', Z')``). The series axis stays
    where the input had it; F adds an axis only when it is above 1."""
    if channels_first:  # file (T, X, Y, Z) or (T, F, X, Y, Z)
        return (4, (0, None, 1, 2, 3)) if filters == 1 else (5, (0, 1, 2, 3, 4))
    # file (X, Y, Z, T) or (X, Y, Z, T, F)
    return (4, (3, 0, 1, 2, None)) if filters == 1 else (5, (3, 0, 1, 2, 4))


def keras_view_shape(axes, shape):
    """The shape an :class:`AxesView` with ``axes`` shows of a file of ``file_shape``."""
    return tuple(1 if a is None else shape[a] for a in axes)


def file_shape(axes, view_shape):
    """The file's shape (or chunk shape) behind a view's (added axes dropped)."""
    out = [0] * sum(a is not None for a in axes)
    for n, a in zip(view_shape, axes):
        if a is not None:
            out[a] = n
    return tuple(out)


def mismatch_message(spec, layout, channels):
    """The error for a 4-D file whose series axis is not the layer's input channels."""
    axis = series_axis(layout)
    place = "first" if layout.channels_first else "last"
    return (f"INPUT {spec} {tuple(layout.shape)}: its {place} axis (axis {axis}, size "
            f"{layout.shape[axis]}: T of a 4-D series) is read as the layer's input "
            f"channels, but the layer takes {channels}; {SERIES_HINT}")
