"""What the engine computes: one layer applied to one canonical volume."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ShapeError
from ..shapes import CONV, flat_batch


@dataclass
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
    _taps: np.ndarray | None = field(default=None, repr=False)

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
        (``execute.round_to_compute``)."""
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

    @property
    def out_canonical_shape(self) -> tuple:
        """Canonical output shape after the activation (glu halves Keras's last axis).

        The one place that decides the output shape: ``conv3d shape``, a run
        over a file and a call on an array all use it, so they print, produce
        or refuse the same thing.
        """
        shape = [self.batch, *self.out_spatial, self.filters]
        if self.activation.halves_last_axis:
            if shape[self.act_axis] % 2:
                raise ShapeError(
                    f"The '{self.activation.name}' activation splits the last axis in two "
                    "halves: axis size must be divisible by 2. Received: "
                    f"x.shape={tuple(self.keras_output_shape)} with axis=-1")
            shape[self.act_axis] //= 2
        return tuple(shape)

    @property
    def whole_axis(self) -> int | None:
        """A spatial axis (0..2) that every tile must span whole, if any."""
        if self.activation.axiswise and self.data_format == "channels_first":
            return 2
        return None

    @property
    def taps(self) -> np.ndarray:
        """Weights per kernel tap as ``(kd, kh, kw, G, C_in/G, F/G)`` matrices."""
        if self._taps is None:
            k = np.asarray(self.kernel).astype(self.work_dtype)
            g = self.groups
            if self.kind == CONV:
                kd, kh, kw, cg, f = k.shape
                t = k.reshape(kd, kh, kw, cg, g, f // g).transpose(0, 1, 2, 4, 3, 5)
            else:  # (kd, kh, kw, F, C) -> (kd, kh, kw, 1, C, F)
                t = k.transpose(0, 1, 2, 4, 3)[:, :, :, None]
            self._taps = np.ascontiguousarray(t)
        return self._taps

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
