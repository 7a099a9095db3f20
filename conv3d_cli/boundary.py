"""``--boundary``: what a 'same' Conv3D reads beyond the volume's edges (not Keras).

Keras pads with zeros (``zeros``, the default). The other modes are for
users who are not reproducing Keras; each is defined on one axis of length
``n`` by the input index ``i`` (outside ``[0, n)``) whose value is read:

============  =========================  ====================================
mode          reads                      as
============  =========================  ====================================
nearest       ``clip(i, 0, n - 1)``      SciPy ``mode='nearest'``, ITK's
                                         ZeroFluxNeumann condition
reflect       ``j = i mod 2n``, then     SciPy ``mode='reflect'`` (d c b a |
              ``j`` if ``j < n`` else    a b c d | d c b a: the edge voxel is
              ``2n - 1 - j``             repeated), NumPy ``pad('symmetric')``,
                                         MATLAB ``imfilter 'symmetric'``
wrap          ``i mod n``                SciPy ``mode='wrap'``, ITK's
                                         Periodic condition
renormalize   zeros, then each output    fslmaths ``-fmean`` at the edges
              rescaled (below)
============  =========================  ====================================

``nearest``, ``reflect`` and ``wrap`` run the layer as a 'valid' Conv3D over
the input extended by ``pad_before`` / ``pad_after`` voxels per axis (the
padding 'same' would add): :class:`ExtendedSource` returns that extended
input for any region, so every tile's halo obeys the mode, and the engine
sees an ordinary job whatever its method.

``renormalize`` divides by the kernel mass inside the volume. For filter
``f`` with kernel ``k[t, c, f]`` (tap ``t``, input channel ``c`` of f's
group), the output before bias and activation is::

    y_f(o) = z_f(o) * M_f / m_f(o),   z_f(o) = sum_{t, c} k[t, c, f] x[o*s + t*d - pad, c]
                                               (zeros outside, as Keras)
                                      M_f    = sum_{t, c} k[t, c, f]
                                      m_f(o) = sum over the taps t inside the volume of
                                               sum_c k[t, c, f]

so a volume whose every channel holds the constant ``v`` gives ``v * M_f``
everywhere, edges included; inside the volume ``m_f = M_f`` and nothing
changes. A filter with ``M_f = 0`` (a derivative) has no mass to keep and is
refused; an output where ``m_f(o) = 0`` (no tap inside carries weight) is 0.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .errors import ArgumentError
from .shapes import CONV, AxisGeometry

BOUNDARIES = ("zeros", "nearest", "reflect", "wrap", "renormalize")
EXTENDED = ("nearest", "reflect", "wrap")


def check_boundary(boundary, job, padding):
    """Refuse a mode that has no meaning for this layer, in one line."""
    if boundary not in BOUNDARIES:
        raise ArgumentError(f"Invalid `boundary`: {boundary!r}. Expected one of "
                            f"{', '.join(BOUNDARIES)}.")
    if boundary == "zeros":
        return
    if job.kind != CONV:
        raise ArgumentError(f"--boundary {boundary}: for Conv3D only (a Conv3DTranspose reads "
                            "no voxel beyond the volume); use --boundary zeros")
    if padding != "same":
        raise ArgumentError(f"--boundary {boundary}: needs padding='same' (padding='valid' "
                            f"reads no voxel beyond the volume). Received: padding={padding!r}")
    if boundary == "renormalize":
        if job.activation.halves_last_axis or job.whole_axis is not None:
            raise ArgumentError(f"--boundary renormalize: not with the "
                                f"'{job.activation.name}' activation along a spatial axis or "
                                "halving the last axis")
        mass = kernel_mass(job)
        if np.any(mass == 0):
            f = int(np.flatnonzero(mass == 0)[0])
            raise ArgumentError(f"--boundary renormalize divides by each filter's kernel sum "
                                f"inside the volume; filter {f}'s kernel sums to 0")


def kernel_mass(job):
    """``M_f``: each filter's kernel summed over its taps and input channels."""
    return np.asarray(job.kernel, np.float64).sum(axis=(0, 1, 2, 3))


def compute_job(job, boundary):
    """The job the engine runs for ``boundary`` (``job`` is the layer's, 'same')."""
    if boundary in EXTENDED:
        return replace(job, geoms=tuple(_valid_on_extended(g) for g in job.geoms))
    if boundary == "renormalize":  # bias and activation come after the rescaling
        from .layers.activations import get
        return replace(job, bias=None, activation=get("linear"))
    return job


def _valid_on_extended(g):
    """The 'valid' geometry over the extended axis (index e is input index e - pad_before)."""
    return AxisGeometry(CONV, (g.out - 1) * g.s + g.ke, g.k, g.s, g.d, 0, g.out)


def source_index(i, n, mode):
    """The input index read at (possibly outside) index ``i`` (arrays), by ``mode``."""
    i = np.asarray(i)
    if mode == "nearest":
        return np.clip(i, 0, n - 1)
    if mode == "wrap":
        return np.mod(i, n)
    if mode == "reflect":
        j = np.mod(i, 2 * n)
        return np.where(j < n, j, 2 * n - 1 - j)
    raise ValueError(mode)


def _runs(idx):
    """``idx`` cut into runs of step -1, 0 or +1: ``(start, stop, first, step)``."""
    runs, start = [], 0
    for j in range(1, len(idx) + 1):
        step = idx[start + 1] - idx[start] if j - start >= 2 else None
        if j < len(idx) and abs(idx[j] - idx[j - 1]) <= 1 and \
                (step is None or idx[j] - idx[j - 1] == step):
            continue
        runs.append((start, j, int(idx[start]), 0 if step is None else int(step)))
        start = j
    return runs


def _piece(block, axis, count, step):
    """A read run of the source (ascending) as the run it stands for."""
    if step < 0:
        return np.flip(block, axis=axis)
    if step == 0:
        return np.repeat(block, count, axis=axis)
    return block


class ExtendedSource:
    """A canonical source ``(B, D, H, W, C)`` seen extended by ``pads`` per axis.

    Extended index ``e`` on an axis stands for input index ``e - pad_before``,
    read by ``mode`` (:func:`source_index`). ``read`` touches only the input
    voxels a region needs: each axis is cut into runs of consecutive input
    indices (at most three: below, inside, above), read as boxes.
    """

    def __init__(self, source, mode, pads, extended):
        self.source = source
        self.mode = mode
        self.pads = tuple(pads)
        b, *spatial, c = source.shape
        self.inner = tuple(spatial)
        self.shape = (b, *extended, c)
        self.parallel_writes = getattr(source, "parallel_writes", False)

    def read(self, b0, b1, ranges):
        per_axis = []
        for (a, z), pad, n in zip(ranges, self.pads, self.inner):
            idx = source_index(np.arange(a - pad, z - pad), n, self.mode)
            per_axis.append([(s0, s1, first, step) for s0, s1, first, step in _runs(idx)])
        out = None
        for combo in _product(per_axis):
            box = [(min(f, f + st * (s1 - s0 - 1)), max(f, f + st * (s1 - s0 - 1)) + 1)
                   for s0, s1, f, st in combo]
            block = np.asarray(self.source.read(b0, b1, box))
            for ax, (s0, s1, _, st) in enumerate(combo):
                block = _piece(block, ax + 1, s1 - s0, st)
            if out is None:
                out = np.empty((b1 - b0,) + tuple(z - a for a, z in ranges) + block.shape[4:],
                               block.dtype)
            out[(slice(None),) + tuple(slice(s0, s1) for s0, s1, _, _ in combo)] = block
        return out


def _product(lists):
    result = [()]
    for options in lists:
        result = [r + (o,) for r in result for o in options]
    return result


def _inside(g, o0, o1):
    """``(o, tap)`` indicator: whether output ``o`` in ``[o0, o1)`` reads tap ``t``
    from inside the axis."""
    pos = np.arange(o0, o1)[:, None] * g.s + np.arange(g.k)[None, :] * g.d - g.offset
    return ((pos >= 0) & (pos < g.n)).astype(np.float64)


class RenormalizedSink:
    """A canonical sink that rescales the zero-padded sums by the kernel mass inside
    the volume, then adds the bias and applies the activation (see the module
    docstring), before passing the block on."""

    def __init__(self, sink, job):
        self.sink = sink
        self.job = job  # the layer's job: its bias, activation and dtype
        self.shape = sink.shape
        self.parallel_writes = getattr(sink, "parallel_writes", False)
        taps = np.asarray(job.kernel, np.float64).sum(axis=3)  # (kd, kh, kw, F)
        self.taps = taps
        self.total = taps.sum(axis=(0, 1, 2))

    def mass(self, ranges):
        """``m_f(o)`` over the output region ``ranges``: (D, H, W, F)."""
        ind = [_inside(g, o0, o1) for g, (o0, o1) in zip(self.job.geoms, ranges)]
        return np.einsum("at,bu,cv,tuvf->abcf", *ind, self.taps, optimize=True)

    def write(self, b0, b1, ranges, block):
        job = self.job
        m = self.mass(ranges)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(m != 0, self.total / np.where(m != 0, m, 1), 0.0)
        y = np.asarray(block, np.float64) * scale
        y = y.astype(job.dtype)
        if job.bias is not None:
            y = y + job.bias
        y = job.activation(y, axis=job.act_axis)
        self.sink.write(b0, b1, ranges, y)


def extended_source(source, job, boundary):
    """The source the engine reads for ``boundary`` (``job`` is the layer's)."""
    if boundary not in EXTENDED:
        return source
    ext = [(g.out - 1) * g.s + g.ke for g in job.geoms]
    return ExtendedSource(source, boundary, [g.offset for g in job.geoms], ext)


def describe(boundary):
    """A line for the run's notes and report, or None for Keras's zeros."""
    if boundary == "zeros":
        return None
    return (f"--boundary {boundary} (not Keras: Keras pads with zeros): see "
            "`conv3d run --help`")
