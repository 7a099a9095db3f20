"""Pure integer math of Keras's 3-D convolutions: no NumPy arrays, no I/O.

Per spatial axis the layer is described by an :class:`AxisGeometry`: input
length ``n``, kernel ``k``, stride ``s``, dilation ``d`` and the offset that
places the output on the input (``pad_before`` for Conv3D, ``crop_left`` for
Conv3DTranspose). Everything else (output lengths, the input region a tile of
output needs, the polyphase split of a transposed convolution, the NIfTI
affine) is derived from it. The formulas are those of
``keras/src/ops/operation_utils.py`` and
``keras/src/backend/common/backend_utils.py``; see ``docs/semantics.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ShapeError

CONV = "conv"
TRANSPOSE = "transpose"


def effective_kernel(k: int, d: int) -> int:
    """Extent of a dilated kernel: ``(k - 1) * d + 1``."""
    return (k - 1) * d + 1


def conv_output_length(n: int, k: int, s: int, d: int, padding: str) -> int:
    """Conv3D output length on one axis (may be <= 0 for 'valid'; callers check)."""
    if padding == "same":
        return -(-n // s)
    return (n - effective_kernel(k, d)) // s + 1


def conv_padding(n: int, k: int, s: int, d: int, padding: str) -> tuple[int, int]:
    """Zeros added (before, after) on one axis; 'same' puts the odd voxel after."""
    if padding != "same":
        return 0, 0
    out = -(-n // s)
    total = max((out - 1) * s + effective_kernel(k, d) - n, 0)
    return total // 2, total - total // 2


def transpose_output_length(n, k, s, d, padding, output_padding=None) -> int:
    """Conv3DTranspose output length on one axis."""
    ke = effective_kernel(k, d)
    if output_padding is None:
        if padding == "same":
            return n * s
        # output_padding defaults to max(ke, s) - ke.
        return (n - 1) * s + max(ke, s)
    if padding == "same":
        return (n - 1) * s + ke % 2 + output_padding
    return (n - 1) * s + ke + output_padding


def transpose_crop_left(k, s, d, padding, output_padding=None) -> int:
    """Where the transposed output window starts in the scattered ('full') signal."""
    ke = effective_kernel(k, d)
    if padding != "same":
        return 0
    if output_padding is None:
        return max((ke - s) // 2, 0)
    return max(ke // 2 - (-(-output_padding // 2)), 0)


@dataclass(frozen=True)
class AxisTerm:
    """One polyphase term of a tile on one axis.

    Output voxels ``out_start + out_step * q`` (local to the tile, q in
    ``range(count)``) receive ``sum_j x[in_start + offset_j + in_step * q] * w[j]``
    over ``taps = ((j, offset_j), ...)``, where x is local to the tile's input
    block. Conv3D has one term with ``in_step = s``; Conv3DTranspose has one
    term per output phase (``s`` of them) with ``in_step = 1``, which is how
    transposed convolution avoids multiplying by inserted zeros.
    """

    out_start: int
    out_step: int
    count: int
    in_start: int
    in_step: int
    taps: tuple


@dataclass(frozen=True)
class AxisGeometry:
    """Geometry of one spatial axis of a Conv3D or Conv3DTranspose."""

    kind: str
    n: int
    k: int
    s: int
    d: int
    offset: int  # pad_before (conv) or crop_left (transpose)
    out: int

    @property
    def ke(self) -> int:
        return effective_kernel(self.k, self.d)

    def terms(self, o0: int, o1: int) -> tuple[int, int, list[AxisTerm]]:
        """Input range ``[i0, i1)`` (may extend past ``[0, n)``) and the terms
        that compute output ``[o0, o1)`` from it."""
        if self.kind == CONV:
            i0 = o0 * self.s - self.offset
            i1 = (o1 - 1) * self.s - self.offset + self.ke
            taps = tuple((j, j * self.d) for j in range(self.k))
            return i0, i1, [AxisTerm(0, 1, o1 - o0, 0, self.s, taps)]
        # Transposed: full position p = o + crop_left = i*s + j*d.
        raw = []
        for r in range(self.s):
            js = [j for j in range(self.k) if (j * self.d - r) % self.s == 0]
            p0, p1 = o0 + self.offset, o1 + self.offset
            q_lo = -(-(p0 - r) // self.s)
            q_hi = -(-(p1 - r) // self.s)
            if not js or q_hi <= q_lo:
                continue
            ts = [(j * self.d - r) // self.s for j in js]
            raw.append((r, js, ts, q_lo, q_hi))
        if not raw:
            return 0, 0, []
        i0 = min(q_lo - max(ts) for _, _, ts, q_lo, _ in raw)
        i1 = max(q_hi - min(ts) for _, _, ts, _, q_hi in raw)
        terms = [
            AxisTerm(
                out_start=q_lo * self.s + r - self.offset - o0,
                out_step=self.s,
                count=q_hi - q_lo,
                in_start=q_lo - i0,
                in_step=1,
                taps=tuple((j, -t) for j, t in zip(js, ts)),
            )
            for r, js, ts, q_lo, q_hi in raw
        ]
        return i0, i1, terms

    def position(self, o: float) -> float:
        """Input voxel coordinate (possibly fractional) where output voxel o sits."""
        c = (self.ke - 1) / 2
        if self.kind == CONV:
            return o * self.s + c - self.offset
        return (o - (c - self.offset)) / self.s


def axis_geometries(kind, spatial_shape, kernel_size, strides, dilation_rate,
                    padding, output_padding=None):
    """Per-axis geometry for a layer applied to ``spatial_shape`` (3 ints)."""
    geoms = []
    for ax, n in enumerate(spatial_shape):
        k, s, d = kernel_size[ax], strides[ax], dilation_rate[ax]
        if kind == CONV:
            before, _ = conv_padding(n, k, s, d, padding)
            out = conv_output_length(n, k, s, d, padding)
            geoms.append(AxisGeometry(CONV, n, k, s, d, before, out))
        else:
            op = None if output_padding is None else output_padding[ax]
            out = transpose_output_length(n, k, s, d, padding, op)
            cl = transpose_crop_left(k, s, d, padding, op)
            geoms.append(AxisGeometry(TRANSPOSE, n, k, s, d, cl, out))
    return tuple(geoms)


def split_layout(shape, data_format):
    """(batch dims, spatial dims, channels) of a Keras-layout shape (rank >= 5)."""
    shape = tuple(shape)
    if data_format == "channels_last":
        return shape[:-4], shape[-4:-1], shape[-1]
    return shape[:-4], shape[-3:], shape[-4]


def join_layout(batch, spatial, channels, data_format):
    if data_format == "channels_last":
        return tuple(batch) + tuple(spatial) + (channels,)
    return tuple(batch) + (channels,) + tuple(spatial)


def output_shape(kind, input_shape, filters, kernel_size, strides, padding,
                 data_format, dilation_rate, output_padding=None):
    """Keras's ``compute_output_shape`` for Conv3D / Conv3DTranspose.

    Unknown (None) dimensions stay unknown. A zero-length input axis is valid:
    a 'same' Conv3D maps it to a zero-length axis, a Conv3DTranspose to
    ``(0 - 1) * s + ke + output_padding`` voxels (the bias alone). Raises
    :class:`ShapeError` with Keras's wording when a 'valid' Conv3D output
    dimension would be zero or negative, and when a transposed one would be
    negative (Keras 3 returns the negative size; tf.keras 2 raises).
    """
    input_shape = tuple(input_shape)
    if len(input_shape) < 5:
        raise ShapeError(
            "Input 0 of layer is incompatible with the layer: expected "
            f"min_ndim=5, found ndim={len(input_shape)}. Full shape received: "
            f"{input_shape}")
    batch, spatial, channels = split_layout(input_shape, data_format)
    if any(n is not None and n < 0 for n in spatial + (channels,)):
        raise ShapeError(f"Input shape {input_shape} has a negative dimension.")
    out_spatial = tuple(
        None if n is None else _output_length(kind, n, kernel_size[ax], strides[ax],
                                              dilation_rate[ax], padding,
                                              None if output_padding is None
                                              else output_padding[ax])
        for ax, n in enumerate(spatial))
    known = [o for o in out_spatial if o is not None]
    if kind == CONV and padding == "valid" and any(o <= 0 for o in known):
        kernel_shape = tuple(kernel_size) + (channels, filters)
        raise ShapeError(
            "Computed output size would be zero or negative. Received "
            f"`inputs shape={input_shape}`, `kernel shape={kernel_shape}`, "
            f"`dilation_rate={tuple(dilation_rate)}`, `strides={tuple(strides)}`, "
            f"`padding={padding}`.")
    if any(o < 0 for o in known):
        raise ShapeError(
            "Computed output size would be negative. Received "
            f"`inputs shape={input_shape}`, `kernel_size={tuple(kernel_size)}`, "
            f"`dilation_rate={tuple(dilation_rate)}`, `strides={tuple(strides)}`, "
            f"`padding={padding}`, `output_padding={output_padding}`.")
    return join_layout(batch, out_spatial, filters, data_format)


def _output_length(kind, n, k, s, d, padding, output_padding):
    if kind == CONV:
        return conv_output_length(n, k, s, d, padding)
    return transpose_output_length(n, k, s, d, padding, output_padding)


def flat_batch(batch_dims) -> int:
    return math.prod(batch_dims) if batch_dims else 1
