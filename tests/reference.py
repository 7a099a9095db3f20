"""A slow, obviously correct NumPy reference of Keras's Conv3D and Conv3DTranspose.

Written straight from Keras's definitions, loop by loop, sharing no code with
the engine: Conv3D correlates the zero-padded input (``'same'`` puts the odd
padding voxel after; ``keras/src/ops/operation_utils.py``); Conv3DTranspose
scatters ``x[i] @ kernel[j].T`` to ``i * s + j * d`` and crops the result
(``keras/src/backend/common/backend_utils.py``).
"""

import math
from itertools import product

import numpy as np


def _to_cl(x, data_format):
    return x if data_format == "channels_last" else np.moveaxis(x, -4, -1)


def _from_cl(y, data_format):
    return y if data_format == "channels_last" else np.moveaxis(y, -1, -4)


def conv3d(x, kernel, bias=None, strides=(1, 1, 1), padding="valid", dilation=(1, 1, 1),
           groups=1, data_format="channels_last"):
    x = _to_cl(np.asarray(x, np.float64), data_format)
    lead = x.shape[:-4]
    x = x.reshape((-1,) + x.shape[-4:])
    B, n = x.shape[0], x.shape[1:4]
    k = kernel.shape[:3]
    C, F = x.shape[-1], kernel.shape[-1]
    cg, fg = C // groups, F // groups
    ke = [(k[a] - 1) * dilation[a] + 1 for a in range(3)]
    if padding == "same":
        out = [math.ceil(n[a] / strides[a]) for a in range(3)]
        pads = []
        for a in range(3):
            total = max((out[a] - 1) * strides[a] + ke[a] - n[a], 0)
            pads.append((total // 2, total - total // 2))
    else:
        out = [(n[a] - ke[a]) // strides[a] + 1 for a in range(3)]
        pads = [(0, 0)] * 3
    xp = np.pad(x, [(0, 0)] + pads + [(0, 0)])
    y = np.zeros((B, *out, F))
    for o0 in range(out[0]):
        for o1 in range(out[1]):
            for o2 in range(out[2]):
                for j0 in range(k[0]):
                    for j1 in range(k[1]):
                        for j2 in range(k[2]):
                            v = xp[:, o0 * strides[0] + j0 * dilation[0],
                                   o1 * strides[1] + j1 * dilation[1],
                                   o2 * strides[2] + j2 * dilation[2], :]
                            for g in range(groups):
                                y[:, o0, o1, o2, g * fg:(g + 1) * fg] += (
                                    v[:, g * cg:(g + 1) * cg]
                                    @ kernel[j0, j1, j2, :, g * fg:(g + 1) * fg])
    if bias is not None:
        y += bias
    return _from_cl(y.reshape(lead + y.shape[1:]), data_format)


def conv3d_transpose(x, kernel, bias=None, strides=(1, 1, 1), padding="valid",
                     output_padding=None, dilation=(1, 1, 1), data_format="channels_last"):
    x = _to_cl(np.asarray(x, np.float64), data_format)
    lead = x.shape[:-4]
    x = x.reshape((-1,) + x.shape[-4:])
    n = x.shape[1:4]
    k = kernel.shape[:3]
    out, crop = [], []
    for a in range(3):
        op = None if output_padding is None else output_padding[a]
        size, start = _transpose_axis(n[a], k[a], strides[a], dilation[a], padding, op)
        out.append(size)
        crop.append(start)
    acc = _scatter(x, kernel, strides, dilation, crop, out)
    if not np.isfinite(kernel).all():
        _zero_products(acc, kernel, n, strides, dilation, crop, out)
    y = acc[:, crop[0]:crop[0] + out[0], crop[1]:crop[1] + out[1], crop[2]:crop[2] + out[2]]
    if bias is not None:
        y = y + bias
    return _from_cl(y.reshape(lead + y.shape[1:]), data_format)


def _transpose_axis(n, k, s, d, padding, op):
    """Output length of one axis of Conv3DTranspose and where it starts in the full scatter."""
    ke = (k - 1) * d + 1
    if padding == "valid":
        if op is None:
            op = max(ke, s) - ke
        return (n - 1) * s + ke + op, 0
    if op is None:
        return n * s, max((ke - s) // 2, 0)
    return (n - 1) * s + ke % 2 + op, max(ke // 2 - math.ceil(op / 2), 0)


def _scatter(x, kernel, strides, dilation, crop, out):
    """Adds ``x[i] @ kernel[j].T`` at ``i * s + j * d``, into a buffer that also holds the crop."""
    B, n = x.shape[0], x.shape[1:4]
    k, F = kernel.shape[:3], kernel.shape[3]
    full = [(n[a] - 1) * strides[a] + (k[a] - 1) * dilation[a] + 1 for a in range(3)]
    big = [max(full[a], crop[a] + out[a]) for a in range(3)]
    acc = np.zeros((B, *big, F))
    for i0 in range(n[0]):
        for i1 in range(n[1]):
            for i2 in range(n[2]):
                v = x[:, i0, i1, i2, :]
                for j0 in range(k[0]):
                    for j1 in range(k[1]):
                        for j2 in range(k[2]):
                            acc[:, i0 * strides[0] + j0 * dilation[0],
                                i1 * strides[1] + j1 * dilation[1],
                                i2 * strides[2] + j2 * dilation[2], :] += v @ kernel[j0, j1, j2].T
    return acc


def _zero_products(acc, kernel, n, strides, dilation, crop, out):
    """Keras computes the transposed convolution as a convolution of the input with
    zeros inserted between voxels and padded around it: every output also
    multiplies the taps that land on those zeros, which adds nothing unless a
    weight is NaN or Inf (0 * inf = NaN)."""
    k, C = kernel.shape[:3], kernel.shape[4]
    for p in product(*(range(crop[a], crop[a] + out[a]) for a in range(3))):
        for j in product(*(range(k[a]) for a in range(3))):
            q = [p[a] - j[a] * dilation[a] for a in range(3)]
            if any(q[a] % strides[a] or not 0 <= q[a] // strides[a] < n[a] for a in range(3)):
                acc[(slice(None),) + p] += np.zeros(C) @ kernel[j].T
