"""Named kernels: ``--kernel NAME[:ARGS]`` as a layer's Keras weights.

Each name gives one or more 3-D filters, in voxels along the input's spatial
axes (D, H, W) = the file's spatial axes in order (NIfTI: X, Y, Z), applied as
Conv3D applies its kernel (a correlation: ``out[i] = sum_k in[i + k - r] w[k]``
about the centre ``r``), so that with ``padding="same"`` (zeros beyond the
edge) each matches SciPy's ``scipy.ndimage`` filter with ``mode="constant"``:

========================  =====================================================
``gauss:sigma=2mm``       ``gaussian_filter``: per axis ``exp(-x**2 / 2s**2)``
(``gauss:2mm``,           summed to 1, ``s`` the sigma in that axis's voxels,
``gauss:2vox``)           radius ``int(truncate * s + 0.5)`` (``truncate=4``;
                          ``gauss:sigma=2mm,truncate=3``); the 3-D kernel is
                          the product of the three, so it sums to 1
``box:3``, ``mean:5``     ``uniform_filter``: an N x N x N box of 1 / N**3 (N
``box:6mm``,              odd voxels, or ``3x3x1``); a length gives per axis
``box:3x3x1``             the voxels whose centres lie within half of it of
                          the centre: ``2 * floor(L / 2dx) + 1`` (fslmaths
                          ``-kernel box``), the nearest odd count
``sphere:4mm``            the voxels whose centres lie within the radius (an
                          ellipsoid in voxels where they are anisotropic, as
                          fslmaths ``-kernel sphere``), each 1 / their count
``sobel``                 ``sobel(axis=a)`` for a = 0, 1, 2: three filters,
                          ``[-1, 0, 1]`` along axis a times ``[1, 2, 1]`` along
                          the others (positive where values grow with the index)
``laplace``               ``laplace``: ``[1, -2, 1]`` along each axis, summed
========================  =====================================================

Lengths take a unit: ``mm``, ``um`` (or ``µm``) or ``vox``; ``AxBxC`` gives one
per axis. Physical units use the input's voxel sizes (the NIfTI affine's column
lengths, OME-Zarr scales with their axis units, or ``--voxel-size``), so
anisotropic voxels give anisotropic kernels. A bare number is a voxel count for
``box``/``mean`` (as fslmaths ``boxv``) and refused for a sigma or a radius,
whose unit differs between tools (fslmaths: mm; SciPy: voxels).

Smoothing kernels sum to 1: inside the volume the result is fslmaths's
``-fmean``; within the kernel's radius of an edge it is SciPy's
``mode="constant"`` (zeros beyond the edge), where fslmaths divides by the
part of the kernel inside the volume instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from .errors import ArgumentError, ShapeError

NAMES = ("gauss", "box", "mean", "sphere", "sobel", "laplace")

# Millimetres per unit; "vox" is handled apart.
_MM_PER_UNIT = {"mm": 1.0, "um": 1e-3, "µm": 1e-3}
_NUMBER = r"[0-9.eE+-]+"
_LENGTH = re.compile(rf"^\s*({_NUMBER}(?:\s*x\s*{_NUMBER})*)\s*(mm|um|µm|vox)?\s*$",
                     re.IGNORECASE)
# Slack for lengths that are whole multiples of the voxel size in exact
# arithmetic but not in floating point: 2.4 mm / 0.8 mm = 2.9999999999999996, and
# NIfTI stores voxel sizes in float32 (0.8 reads as 0.800000011920929).
_EPS = 1e-6


@dataclass(frozen=True)
class NamedKernel:
    """The filters of a ``--kernel`` spec: 3-D float64 arrays, applied as Conv3D applies them."""

    spec: str
    filters: tuple
    details: dict = field(default_factory=dict)

    @property
    def kernel_size(self) -> tuple:
        return tuple(int(n) for n in self.filters[0].shape)


@dataclass(frozen=True)
class _Length:
    values: tuple   # 1 or 3 numbers
    unit: str       # "mm", "um", "µm", "vox" or "" (bare)
    text: str

    def in_voxels(self, voxel_size, option, spec):
        """Per-axis (D, H, W) length in voxels."""
        values = self.values * 3 if len(self.values) == 1 else self.values
        if self.unit in ("vox", ""):
            return tuple(float(v) for v in values)
        if voxel_size is None:
            raise ArgumentError(
                f"--kernel {spec}: {self.text} needs the input's voxel size, and none is "
                "known (NIfTI and OME-Zarr inputs have one; .npy, HDF5 and plain Zarr do "
                f"not): give {option} in voxels ({_as_vox(self)}) or pass --voxel-size D,H,W")
        mm = _MM_PER_UNIT[self.unit.lower()]
        return tuple(float(v) * mm / float(d) for v, d in zip(values, voxel_size))


def _as_vox(length):
    return "x".join(f"{v:g}" for v in length.values) + "vox"


def _parse_length(text, spec, what):
    match = _LENGTH.match(text)
    values = None
    if match:
        try:
            values = tuple(float(p) for p in re.split("x", match.group(1), flags=re.I))
        except ValueError:
            values = None
    if not values or len(values) not in (1, 3) or \
            not all(math.isfinite(v) and v >= 0 for v in values):
        raise ArgumentError(
            f"--kernel {spec}: expected {what} as a non-negative length with a unit (2mm, "
            f"0.5um, 3vox) or three of them (2x2x1mm). Received: {text!r}")
    return _Length(values, (match.group(2) or "").lower(), text.strip())


def parse_spec(spec):
    """``NAME[:ARG,KEY=VALUE,...]`` -> (name, [positional], {keyword}), names case-insensitive."""
    text = str(spec).strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in NAMES:
        raise ArgumentError(f"--kernel {spec}: unknown kernel {name!r}; expected one of "
                            f"{', '.join(NAMES)} (NAME or NAME:ARGS, e.g. gauss:sigma=2mm)")
    positional, keyword = [], {}
    for part in (p.strip() for p in rest.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if not eq:
            if keyword:
                raise ArgumentError(f"--kernel {spec}: a positional argument ({part!r}) "
                                    "after a KEY=VALUE one")
            positional.append(part)
            continue
        key = key.strip().lower()
        if key in keyword:
            raise ArgumentError(f"--kernel {spec}: {key} given twice")
        keyword[key] = value.strip()
    return name, positional, keyword


def _arguments(spec, name, positional, keyword, allowed):
    """Map positional then keyword arguments onto ``allowed`` (their names, in order)."""
    if len(positional) > len(allowed):
        takes = ("takes no arguments" if not allowed else
                 f"takes {', '.join(allowed)} (one length per axis: 2x2x1mm)")
        raise ArgumentError(f"--kernel {spec}: {name} {takes}. Received: {len(positional)} "
                            "positional arguments")
    args = dict(zip(allowed, positional))
    for key, value in keyword.items():
        if key not in allowed:
            expected = ", ".join(allowed) if allowed else "no arguments"
            raise ArgumentError(f"--kernel {spec}: {name} has no argument {key!r}; "
                                f"expected {expected}")
        if key in args:
            raise ArgumentError(f"--kernel {spec}: {key} given twice")
        args[key] = value
    return args


def named_kernel(spec, voxel_size=None, max_bytes=None) -> NamedKernel:
    """The filters ``spec`` names, with lengths in the (D, H, W) ``voxel_size`` (mm)
    given; a filter larger than ``max_bytes`` is refused before it is made."""
    name, positional, keyword = parse_spec(spec)
    voxel_size = None if voxel_size is None else parse_voxel_size(voxel_size)
    build, allowed = _BUILDERS[name]
    args = _arguments(spec, name, positional, keyword, allowed)
    if allowed and allowed[0] not in args:
        raise ArgumentError(f"--kernel {spec}: {name} needs its {allowed[0]} "
                            f"(e.g. {_EXAMPLES[name]})")
    filters, details = build(spec, args, voxel_size, max_bytes)
    details = {"name": name, **details}
    if voxel_size is not None:
        details["voxel_size_mm"] = list(voxel_size)
    return NamedKernel(str(spec), tuple(filters), details)


_EXAMPLES = {"gauss": "gauss:sigma=2mm", "box": "box:3", "mean": "mean:5",
             "sphere": "sphere:4mm"}


# ------------------------------------------------------------------ the kernels
def _gauss(spec, args, voxel_size, max_bytes=None):
    sigma = _parse_length(args["sigma"], spec, "sigma")
    if sigma.unit == "":
        raise ArgumentError(f"--kernel {spec}: give sigma a unit: {sigma.text}mm or "
                            f"{sigma.text}vox")
    try:
        truncate = float(args.get("truncate", 4.0))
    except ValueError:
        truncate = -1.0
    if not (math.isfinite(truncate) and truncate > 0):
        raise ArgumentError(f"--kernel {spec}: truncate must be a positive number. "
                            f"Received: {args.get('truncate')!r}")
    sigmas = sigma.in_voxels(voxel_size, "sigma", spec)
    _check_fits(spec, [2 * int(truncate * s + 0.5) + 1 if s > 1e-15 else 1 for s in sigmas],
                max_bytes)
    axes = [_gauss1d(s, truncate) for s in sigmas]
    return [_outer(axes)], {"sigma_vox": list(sigmas), "truncate": truncate,
                            "radius_vox": [len(a) // 2 for a in axes]}


def _gauss1d(sigma, truncate):
    """SciPy's ``_gaussian_kernel1d``: exp(-x^2 / 2 sigma^2) over |x| <= int(truncate *
    sigma + 0.5), summed to 1; ``gaussian_filter`` leaves an axis with sigma <= 1e-15 alone."""
    if sigma <= 1e-15:
        return np.ones(1)
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return phi / phi.sum()


def _box(spec, args, voxel_size, max_bytes=None):
    size = _parse_length(args["size"], spec, "the box size")
    if size.unit in ("", "vox"):
        counts = size.in_voxels(voxel_size, "the size", spec)
        for n in counts:
            if n != int(n) or n < 1 or n % 2 == 0:
                raise ArgumentError(
                    f"--kernel {spec}: a box in voxels must be an odd whole number of "
                    f"voxels per axis (the centre voxel and as many on each side). "
                    f"Received: {size.text}")
        counts = tuple(int(n) for n in counts)
    else:
        half = (n / 2 for n in size.in_voxels(voxel_size, "the size", spec))
        counts = tuple(2 * int(math.floor(h + _EPS)) + 1 for h in half)
    _check_fits(spec, counts, max_bytes)
    box = np.full(counts, 1.0 / math.prod(counts))
    return [box], {"size_vox": list(counts)}


def _sphere(spec, args, voxel_size, max_bytes=None):
    radius = _parse_length(args["radius"], spec, "the radius")
    if radius.unit == "":
        raise ArgumentError(f"--kernel {spec}: give the radius a unit: {radius.text}mm or "
                            f"{radius.text}vox")
    radii = radius.in_voxels(voxel_size, "the radius", spec)
    extent = [int(math.floor(r + _EPS)) for r in radii]
    _check_fits(spec, [2 * e + 1 for e in extent], max_bytes)
    grids = np.meshgrid(*[np.arange(-e, e + 1, dtype=np.float64) for e in extent],
                        indexing="ij")
    # sum over axes of (i / r)^2 <= 1: the voxel centre lies in the ellipsoid; an
    # axis of radius 0 holds only i = 0, which adds nothing.
    dist2 = sum((g / r) ** 2 if r > 0 else g * 0.0 for g, r in zip(grids, radii))
    mask = dist2 <= 1.0 + _EPS
    return [mask / mask.sum()], {"radius_vox": list(radii), "voxels": int(mask.sum())}


def _sobel(spec, args, voxel_size, max_bytes=None):
    derivative, smooth = np.array([-1.0, 0.0, 1.0]), np.array([1.0, 2.0, 1.0])
    filters = [_outer([derivative if a == axis else smooth for a in range(3)])
               for axis in range(3)]
    return filters, {"filters": [f"d/d(spatial axis {a}: NIfTI {x})" for a, x in enumerate("XYZ")]}


def _laplace(spec, args, voxel_size, max_bytes=None):
    kernel = np.zeros((3, 3, 3))
    for axis in range(3):
        index = [1, 1, 1]
        for i, w in zip((0, 1, 2), (1.0, -2.0, 1.0)):
            index[axis] = i
            kernel[tuple(index)] += w
    return [kernel], {}


def _check_fits(spec, shape, max_bytes, what="its filter"):
    """Refuse, before it is allocated, a float64 array of ``shape`` larger than
    ``max_bytes`` (a sigma or radius of a few characters can ask for terabytes)."""
    need = math.prod(shape) * 8
    if max_bytes is not None and need > max_bytes:
        raise ArgumentError(
            f"--kernel {spec}: {what} ({'x'.join(map(str, shape))}) takes "
            f"{need / (1 << 20):.0f} MiB, more than the memory limit of "
            f"{max_bytes / (1 << 20):.0f} MiB (--memory-limit); give a smaller size")


def _outer(vectors):
    a, b, c = vectors
    return a[:, None, None] * b[None, :, None] * c[None, None, :]


_BUILDERS = {
    "gauss": (_gauss, ("sigma", "truncate")),
    "box": (_box, ("size",)),
    "mean": (_box, ("size",)),
    "sphere": (_sphere, ("radius",)),
    "sobel": (_sobel, ()),
    "laplace": (_laplace, ()),
}


# ------------------------------------------------------------- Keras weights
def keras_kernel(named, channels=1, transpose=False, max_bytes=None):
    """(kernel, filters, groups): ``named`` as a Keras kernel for ``channels`` input channels.

    Every channel is filtered on its own, into filters ``c * n .. c * n + n - 1``
    (n = the named kernel's filters): Conv3D with ``groups=channels``, kernel
    ``(kd, kh, kw, 1, channels * n)``; Conv3DTranspose (which has no groups) with
    a block-diagonal ``(kd, kh, kw, channels * n, channels)``. A transposed
    convolution applies its kernel mirrored (at stride 1, 'same', it is a
    convolution), so the filters are stored mirrored and mean the same filter
    in both layers.
    """
    n = len(named.filters)
    shape = named.kernel_size + ((channels * n, channels) if transpose else (1, channels * n))
    _check_fits(named.spec, shape, max_bytes, f"the kernel for {channels} input channels")
    stack = np.stack(named.filters, axis=-1)   # (kd, kh, kw, n)
    if transpose:
        stack = stack[::-1, ::-1, ::-1]
        kernel = np.zeros(stack.shape[:3] + (channels * n, channels))
        for c in range(channels):
            kernel[..., c * n:(c + 1) * n, c] = stack
        return kernel, channels * n, 1
    return np.tile(stack[:, :, :, None, :], (1, 1, 1, 1, channels)), channels * n, channels


def layer_weights(spec, args, transpose, voxel_size=None, channels=1, max_bytes=None):
    """Set the layer arguments the kernel fixes in ``args``; (weights dict, NamedKernel).

    ``filters``, ``kernel_size`` and (Conv3D) ``groups`` come from the kernel
    and must agree with any given; ``use_bias`` is False unless given (then the
    bias is zeros); ``padding`` is 'same' unless given: the output on the
    input's grid, as every filtering tool gives it. A kernel larger than
    ``max_bytes`` is refused before it is allocated.
    """
    from .layers.args import standardize_tuple
    named = named_kernel(spec, voxel_size, max_bytes)
    kernel, filters, groups = keras_kernel(named, channels, transpose, max_bytes)
    fixed = {"filters": filters, "kernel_size": named.kernel_size}
    if not transpose:
        fixed["groups"] = groups
    for key, value in fixed.items():
        given = args.get(key)
        if given is None:
            continue
        same = (standardize_tuple(given, 3, key) == value if key == "kernel_size"
                else given == value)
        if not same:
            per = f" ({channels} input channels)" if channels > 1 and key != "kernel_size" else ""
            raise ArgumentError(f"--kernel {spec} sets {key}={value}{per}; drop --"
                                f"{key.replace('_', '-')} or make it agree. Received: "
                                f"{key}={given}")
    args.update(fixed)
    args.setdefault("padding", "same")
    args["use_bias"] = bool(args.get("use_bias") or False)
    bias = np.zeros(filters) if args["use_bias"] else None
    return {"kernel": kernel, "bias": bias}, named


# ------------------------------------------------------- the input's geometry
def parse_voxel_size(value):
    """(D, H, W) voxel sizes in mm from ``"1,0.8,2.5"``, ``"0.2,0.1,0.1um"``, ``"1mm"``
    or a sequence of numbers (mm)."""
    if isinstance(value, str):
        match = re.match(r"^\s*(.*?)\s*(mm|um|µm)?\s*$", value, re.IGNORECASE)
        scale = _MM_PER_UNIT[(match.group(2) or "mm").lower()]
        parts = re.split(r"[,x]", match.group(1), flags=re.I)
    else:
        scale, parts = 1.0, list(np.atleast_1d(value))
    try:
        sizes = [float(p) * scale for p in parts]
    except (TypeError, ValueError):
        sizes = []
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3 or not all(math.isfinite(s) and s > 0 for s in sizes):
        raise ArgumentError("--voxel-size: expected one or three positive voxel sizes in mm "
                            "(D,H,W = the file's spatial axes in order), optionally with a "
                            f"unit: 1,0.8,2.5 or 0.2,0.1,0.1um. Received: {value!r}")
    return tuple(sizes)


def volume_voxel_size(vol):
    """(D, H, W) voxel sizes in mm of an opened volume, or None where it has no geometry
    or its units are unknown (a NIfTI without units is in mm, as FSL and nibabel take it)."""
    return vol.geometry.voxel_sizes_in("millimeter")


def volume_channels(shape, data_format, axes=None):
    """Input channels of a file of this shape (``axes``: the data_format the file's
    format fixes, e.g. NIfTI's (X, Y, Z[, C]) and OME-Zarr's ([t,] c, z, y, x))."""
    from .layout import Layout
    try:
        return Layout(tuple(shape), axes or data_format).canonical_shape[4]
    except ShapeError as exc:
        raise ShapeError(f"INPUT: {exc}") from None


def input_context(input=None, input_shape=None, input_channels=None, voxel_size=None):
    """``build_layer``'s ``voxel_size`` and ``input_channels`` for ``--kernel``, from
    INPUT's header, a Keras ``--input-shape`` or ``--input-channels``; ``--voxel-size``
    wins over the input's own."""
    if input is not None:
        from .io import open_volume
        vol = open_volume(input, header_only=True)
        try:
            shape, axes = vol.shape, vol.axes
            own = volume_voxel_size(vol)
        finally:
            vol.close()
        return {"voxel_size": voxel_size if voxel_size is not None else own,
                "input_channels": lambda data_format: volume_channels(shape, data_format, axes)}
    if input_shape is not None:
        return {"voxel_size": voxel_size,
                "input_channels": lambda data_format: volume_channels(input_shape, data_format)}
    return {"voxel_size": voxel_size, "input_channels": input_channels}
