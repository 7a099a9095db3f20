"""What the engine computes: one layer applied to one canonical volume."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..errors import ShapeError
from ..shapes import CONV, flat_batch


@dataclass(frozen=True, eq=False)
class Job:
    kind: str
    geoms: tuple            # one AxisGeometry per spatial axis
    batch_shape: tuple
    in_channels: int
    filters: int
    groups: int
    kernel: np.ndarray      # Keras layout, in the compute dtype
    bias: np.ndarray | None  # in the compute dtype
    activation: object      # layers.activations.Activation
    data_format: str
    dtype: np.dtype         # the compute dtype: the inputs' and the result's
    keras_output_shape: tuple

    def __post_init__(self):
        object.__setattr__(self, "geoms", tuple(self.geoms))
        object.__setattr__(self, "batch_shape", tuple(self.batch_shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @cached_property
    def taps(self) -> np.ndarray:
        """Weights per kernel tap as ``(kd, kh, kw, G, C_in/G, F/G)`` matrices in the
        work dtype, made on first use (where tiles are computed) and kept."""
        k = np.asarray(self.kernel).astype(self.work_dtype)
        g = self.groups
        if self.kind == CONV:
            kd, kh, kw, cg, f = k.shape
            t = k.reshape(kd, kh, kw, cg, g, f // g).transpose(0, 1, 2, 4, 3, 5)
        else:  # (kd, kh, kw, F, C) -> (kd, kh, kw, 1, C, F)
            t = k.transpose(0, 1, 2, 4, 3)[:, :, :, None]
        return np.ascontiguousarray(t)

    @property
    def work_dtype(self) -> np.dtype:
        """The dtype the convolution sums in.

        float16 and bfloat16 layers sum in float32 and round once: that is
        what Keras's JAX backend gives on CPU (XLA computes a float16/bfloat16
        convolution in float32 and rounds its result; measured against Keras
        3.15, the sums agree with float32 accumulation and not with float16
        accumulation). float32 and float64 layers sum in their own dtype.
        """
        return np.dtype(np.float32) if self.dtype.itemsize < 4 else self.dtype

    @property
    def rounds_result(self) -> bool:
        """Whether the sums are rounded to a narrower compute dtype
        (``task.round_to_compute``)."""
        return self.work_dtype != self.dtype

    @property
    def batch(self) -> int:
        return flat_batch(self.batch_shape)

    @property
    def in_spatial(self) -> tuple:
        return tuple(g.n for g in self.geoms)

    @property
    def out_spatial(self) -> tuple:
        return tuple(g.out for g in self.geoms)

    @property
    def act_axis(self) -> int:
        """Canonical axis that is Keras's axis -1 (channels, or W under channels_first)."""
        return 4 if self.data_format == "channels_last" else 3

    # The activation's effect on shapes: the one place that knows glu halves
    # Keras's last axis (the filters, or W under channels_first).
    @property
    def halved_axis(self) -> int | None:
        """The canonical axis the activation halves, or None."""
        return self.act_axis if self.activation.halves_last_axis else None

    @property
    def out_canonical_shape(self) -> tuple:
        """Canonical output shape after the activation.

        The one place that decides the output shape: ``conv3d shape``, a run
        over a file and a call on an array all use it, so they print, produce
        or refuse the same thing.
        """
        shape = [self.batch, *self.out_spatial, self.filters]
        halved = self.halved_axis
        if halved is not None:
            if shape[halved] % 2:
                raise ShapeError(
                    f"The '{self.activation.name}' activation splits the last axis in two "
                    "halves: axis size must be divisible by 2. Received: "
                    f"x.shape={tuple(self.keras_output_shape)} with axis=-1")
            shape[halved] //= 2
        return tuple(shape)

    def out_ranges(self, ranges) -> tuple:
        """Where the spatial box ``ranges`` (pre-activation output coordinates,
        ``((o0, o1),) * 3``) lands in the canonical output, after the activation:
        halved along W when the activation halves W (a tile then spans W whole,
        see ``whole_axis``)."""
        ranges = tuple(tuple(r) for r in ranges)
        if self.halved_axis == 3:
            (w0, w1) = ranges[2]
            ranges = ranges[:2] + ((w0 // 2, w1 // 2),)
        return ranges

    @property
    def whole_axis(self) -> int | None:
        """A spatial axis (0..2) that every tile must span whole, if any."""
        if self.activation.axiswise and self.data_format == "channels_first":
            return 2
        return None

    def input_extent(self, shape) -> list:
        """Per axis, the most input voxels a tile of output ``shape`` reads, its halo
        included: ``(n - 1) * s + ke`` for Conv3D; for a transposed layer, the
        ``ceil(n / s)`` rows its outputs sit over plus the ``ceil(ke / s) + 1`` rows
        one output phase's taps span."""
        return [(n - 1) * g.s + g.ke if g.kind == CONV else -(-n // g.s) + -(-g.ke // g.s) + 1
                for n, g in zip(shape, self.geoms)]

    def macs_per_output(self) -> float:
        """Multiply-adds per output voxel and filter, averaged (transposed: k^3 / s^3)."""
        per = math.prod(g.k for g in self.geoms) * self.in_channels / self.groups
        if self.kind != CONV:
            per /= math.prod(g.s for g in self.geoms)
        return per

    def flops(self) -> float:
        """Useful floating-point operations (2 per multiply-add)."""
        n_out = self.batch * math.prod(self.out_spatial) * self.filters
        return 2.0 * n_out * self.macs_per_output()

    def __dask_tokenize__(self):
        """What identifies the job for Dask's task keys: its description and a
        digest of its weights (not the arrays themselves)."""
        digest = hashlib.sha1()
        for w in (self.kernel, self.bias):
            if w is not None:
                digest.update(np.ascontiguousarray(w).view(np.uint8).reshape(-1).data)
        act = self.activation
        return ("conv3d-job", self.kind, self.geoms, self.batch_shape, self.in_channels,
                self.filters, self.groups, self.data_format, self.dtype.str,
                act.name, repr(sorted(act.kwargs.items())), act.keras2, digest.hexdigest())

