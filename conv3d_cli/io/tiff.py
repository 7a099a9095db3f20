"""TIFF stacks and OME-TIFF (``.tif``, ``.tiff``, ``.ome.tif``, ``.ome.tiff``) through tifffile.

A stack is the file's first image series: pages of ``Y, X`` (with samples
``S`` per pixel, or channels ``C`` in separate pages), along ``Z`` (tifffile's
generic page axis ``Q`` or ``I`` stands for Z). It is read as ``(Z, Y, X[,
C])``, channels last whatever the page order; other axes (time) of more than
one step are refused.

Region reads keep memory bounded. An uncompressed contiguous series (what
ImageJ, tifffile and this tool write) is read in place with ``pread``
(:class:`~conv3d_cli.io.rawfile.RawArrayFile`); otherwise (compressed, tiled
or scattered pages) only the pages a region touches are decoded, one at a
time.

Geometry: voxel sizes from OME metadata (``PhysicalSizeX/Y/Z`` and their
units, micrometres by default) or ImageJ's (``spacing`` for Z, the X and Y
resolution tags, ``unit``); TIFF has no origin or orientation. Array axis
``Z, Y, X`` runs along world z, y, x, as OME-Zarr's named axes do, so a
TIFF stack and an OME-Zarr image of it agree.

Outputs are uncompressed and contiguous, written region by region in place
by every worker: OME-TIFF (``ZCYX``, physical sizes in OME-XML) for
``.ome.tif(f)``, an ImageJ hyperstack (``spacing``, ``unit``, resolution
tags) for ``.tif(f)``; voxel sizes are the moved geometry's (scaled by the
strides). ImageJ reads float32, not float64.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import numpy as np

from ..errors import ArgumentError, ShapeError, VolumeError
from ..geometry import UNIT_METERS, Geometry
from .base import FileWriter, Volume
from .npy import check_dtype
from .ome import is_zyx_scaling, zyx_affine
from .paths import check_input_path
from .rawfile import RawArrayFile, _normalize


def require_tifffile():
    try:
        import tifffile
    except ImportError:
        raise ArgumentError("TIFF volumes need tifffile: pip install tifffile (or pip install "
                            "\".[tiff]\" in the conv3d clone)") from None
    return tifffile


# Unit names in OME (UnitsLength symbols) and ImageJ -> the geometry's, and back.
_UNITS_IN = {"m": "meter", "cm": "centimeter", "mm": "millimeter", "µm": "micrometer",
             "um": "micrometer", "micron": "micrometer", "microns": "micrometer",
             "\u03bcm": "micrometer", "\\u00b5m": "micrometer", "nm": "nanometer",
             "å": "angstrom", "angstrom": "angstrom"}
_OME_UNITS = {"meter": "m", "centimeter": "cm", "millimeter": "mm", "micrometer": "µm",
              "nanometer": "nm", "angstrom": "Å"}
_IMAGEJ_UNITS = {"meter": "m", "centimeter": "cm", "millimeter": "mm", "micrometer": "micron",
                 "nanometer": "nm", "angstrom": "angstrom"}
_Z_AXES = ("Z", "Q", "I")


# ------------------------------------------------------------------ input side

def _layout(axes, shape, where):
    """(file axis of Z, Y, X and the channel axis or None) of a series."""
    axes = axes.upper()
    extra = [a for a, n in zip(axes, shape) if a not in "ZQIYXCS" and n > 1]
    z = next((axes.index(a) for a in _Z_AXES if a in axes), None)
    channels = [axes.index(a) for a in "CS" if a in axes]
    if extra or z is None or "Y" not in axes or "X" not in axes or len(channels) > 1 or \
            len(axes) != 3 + len(channels):
        raise VolumeError(f"{where}: expected a TIFF stack of axes Z, Y, X and at most one "
                          f"channel axis (C or S); its first series has axes {axes} of shape "
                          f"{tuple(shape)}")
    return (z, axes.index("Y"), axes.index("X")), (channels[0] if channels else None)


class TiffArray:
    """The first series of a TIFF file as ``(Z, Y, X[, C])``, read by region."""

    def __init__(self, path):
        tifffile = require_tifffile()
        check_input_path(path, path)
        self.path = path
        try:
            with _quiet(), tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                axes, shape = series.axes, tuple(int(n) for n in series.shape)
                dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
                offset = series.dataoffset
                self.page_shape = tuple(int(n) for n in series.keyframe.shape)
                self.npages = len(series.pages)
                self.geometry = _geometry(tif, series)
        except (VolumeError, ArgumentError):
            raise
        except Exception as exc:  # tifffile raises many types for bad files
            raise VolumeError(f"{path}: not a readable TIFF file ({exc})") from None
        check_dtype(dtype, path)
        spatial, channel = _layout(axes, shape, path)
        self.file_shape, self.dtype = shape, dtype
        self.order = spatial + ((channel,) if channel is not None else ())
        self.shape = tuple(shape[a] for a in self.order)
        self.leading = len(shape) - len(self.page_shape)
        if self.leading < 0 or shape[self.leading:] != self.page_shape:
            raise VolumeError(f"{path}: the pages ({self.page_shape}) do not tile the series "
                              f"{shape}; not read")
        if math.prod(shape[:self.leading]) != self.npages:
            raise VolumeError(f"{path}: file is truncated or damaged: {self.npages} of the "
                              f"{math.prod(shape[:self.leading])} pages of its series are there")
        self.raw = None
        if offset is not None:  # uncompressed and contiguous: read in place
            self.raw = RawArrayFile(path, offset, shape, dtype)
            if os.path.getsize(path) < offset + self.raw.nbytes:
                raise VolumeError(f"{path}: file is truncated: the series is {shape} {dtype}")
        self._tif = None
        self._pid = None

    def _file_ranges(self, idx):
        """Per file axis (start, stop) of the region ``idx`` of this array; the axes
        of the result to squeeze."""
        ranges, squeeze = _normalize(idx, self.shape)
        file_ranges = [None] * len(self.file_shape)
        for k, a in enumerate(self.order):
            file_ranges[a] = ranges[k]
        return file_ranges, squeeze

    def __getitem__(self, idx):
        file_ranges, squeeze = self._file_ranges(idx)
        region = tuple(slice(a, z) for a, z in file_ranges)
        block = self.raw[region] if self.raw is not None else self._read_pages(file_ranges)
        out = np.transpose(block, self.order)
        return out.squeeze(squeeze) if squeeze else out

    def _read_pages(self, file_ranges):
        """Decode only the pages the region touches, one at a time."""
        lead_shape = self.file_shape[:self.leading]
        lead = [range(a, z) for a, z in file_ranges[:self.leading]]
        inner = tuple(slice(a, z) for a, z in file_ranges[self.leading:])
        out = np.empty([z - a for a, z in file_ranges], self.dtype)
        pages = self._series().pages
        for index in np.ndindex(*[len(r) for r in lead]):
            source = tuple(r[i] for r, i in zip(lead, index))
            number = int(np.ravel_multi_index(source, lead_shape)) if lead_shape else 0
            try:
                page = pages[number].asarray()
            except Exception as exc:  # corrupt or truncated compressed data
                raise VolumeError(f"{self.path}: cannot read page {number} ({exc})") from None
            out[index] = page.reshape(self.page_shape)[inner]
        return out

    def _series(self):
        if self._tif is None or self._pid != os.getpid():
            self._tif = require_tifffile().TiffFile(self.path)
            self._pid = os.getpid()
        return self._tif.series[0]

    def close(self):
        if self._tif is not None and self._pid == os.getpid():
            self._tif.close()
        self._tif = None
        if self.raw is not None:
            self.raw.close()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tif"] = None
        return state


@contextlib.contextmanager
def _quiet():
    """tifffile logs what it skips in a damaged file; the error raised here says it once."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _geometry(tif, series):
    """Voxel sizes (Z, Y, X) and units from OME or ImageJ metadata, as a Geometry."""
    sizes = units = None
    if tif.is_ome:
        sizes, units = _ome_sizes(tif)
    elif tif.is_imagej:
        sizes, units = _imagej_sizes(tif.imagej_metadata or {}, series.keyframe)
    if sizes is None:
        return Geometry()
    return Geometry(zyx_affine(sizes), units, None, "affine")


def _ome_sizes(tif):
    tifffile = require_tifffile()
    image = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
    pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})
    sizes, units = [], []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        sizes.append(float(value) if value is not None else 1.0)
        units.append(_UNITS_IN.get(str(unit).lower()) if value is not None else None)
    if all(u is None for u in units):
        return None, None
    return _checked(sizes, tif.filehandle.path), tuple(units)


def _imagej_sizes(meta, page):
    """ImageJ: X and Y from the resolution tags (pixels per unit), Z from ``spacing``."""
    unit = _UNITS_IN.get(str(meta.get("unit", "")).lower())
    tags = page.tags
    sizes = []
    for name in ("YResolution", "XResolution"):
        tag = tags.get(name)
        num, den = tag.value if tag is not None else (1, 1)
        sizes.append(den / num if num else 1.0)
    z = float(meta.get("spacing", 1.0))
    if unit is None and "spacing" not in meta:
        return None, None
    return [z] + sizes, (unit,) * 3


def _checked(sizes, where):
    if not all(np.isfinite(s) and s > 0 for s in sizes):
        raise VolumeError(f"{where}: the physical voxel sizes {sizes} are not usable")
    return sizes


def open_volume(spec, header_only=False, tmp_dir=None) -> Volume:
    array = TiffArray(spec.path)
    details = {"geometry": "voxel sizes only (TIFF has no origin or orientation)"} \
        if array.geometry.affine is not None else {}
    return Volume(spec, array, array.geometry, axes="channels_last", split_order=(0, 1, 2),
                  details=details)


# ------------------------------------------------------------------ output side

def voxel_sizes(geometry):
    """(sizes of Z, Y, X, their common unit or None, a note or None) of an output."""
    if geometry is None or geometry.affine is None:
        return None, None, None
    sizes = list(geometry.voxel_sizes)
    units = geometry.units or (None,) * 3
    unit = units[0] if len(set(units)) == 1 else None
    if unit is None and all(u in UNIT_METERS for u in units):  # mixed units: in micrometres
        sizes = [s * UNIT_METERS[u] / UNIT_METERS["micrometer"] for s, u in zip(sizes, units)]
        unit = "micrometer"
    same = is_zyx_scaling(geometry.affine)
    note = None if same else ("TIFF holds voxel sizes only: the input's origin and "
                              "orientation are not kept in OUTPUT")
    return sizes, unit, note


def create_tiff(path, shape, dtype, geometry, ome):
    """A new contiguous, uncompressed TIFF (ZYX or ZCYX pages) at ``path``; the array
    written by region, in place, and a note on the geometry it could not hold."""
    tifffile = require_tifffile()
    file_axes = "ZYX" if len(shape) == 3 else "ZCYX"
    file_shape = shape if len(shape) == 3 else (shape[0], shape[3], shape[1], shape[2])
    sizes, unit, note = voxel_sizes(geometry)
    kwargs = {"photometric": "minisblack", "metadata": {"axes": file_axes}}
    if ome:
        kwargs["ome"] = True
        if sizes is not None:
            for axis, size in zip("ZYX", sizes):
                kwargs["metadata"][f"PhysicalSize{axis}"] = size
                if unit in _OME_UNITS:
                    kwargs["metadata"][f"PhysicalSize{axis}Unit"] = _OME_UNITS[unit]
    else:
        kwargs["imagej"] = True
        if sizes is not None:
            kwargs["resolution"] = (1 / sizes[2], 1 / sizes[1])
            kwargs["metadata"]["spacing"] = sizes[0]
            if unit in _IMAGEJ_UNITS:
                kwargs["metadata"]["unit"] = _IMAGEJ_UNITS[unit]
    tifffile.imwrite(path, shape=file_shape, dtype=np.dtype(dtype), **kwargs)
    with tifffile.TiffFile(path) as tif:
        offset = tif.series[0].dataoffset
        byteorder = tif.byteorder
    if offset is None:  # tifffile writes uncompressed series contiguously
        raise VolumeError(f"{path}: tifffile did not write a contiguous series")
    raw = RawArrayFile(path, offset, file_shape, np.dtype(dtype).newbyteorder(byteorder),
                       writable=True)
    order = (0, 1, 2) if len(shape) == 3 else (0, 2, 3, 1)  # output axis k is file axis order[k]
    return _Permuted(raw, order), note


class _Permuted:
    """Region writes in the output's axes to a file whose axes are permuted."""

    def __init__(self, raw, order):
        self.raw, self.order = raw, order

    def __setitem__(self, idx, block):
        shape = tuple(self.raw.shape[a] for a in self.order)
        ranges, squeeze = _normalize(idx, shape)
        block = np.asarray(block)
        if squeeze:
            block = np.expand_dims(block, squeeze)
        region = [None] * len(ranges)
        for k, a in enumerate(self.order):
            region[a] = slice(*ranges[k])
        self.raw[tuple(region)] = np.transpose(block, np.argsort(self.order))

    def close(self):
        self.raw.close()


class Writer(FileWriter):
    """A TIFF stack ``(Z, Y, X[, C])``, channels last: OME-TIFF for ``.ome.tif(f)``,
    an ImageJ hyperstack otherwise; written in place by every worker."""

    parallel_writes = True

    def __init__(self, spec, *, shape, dtype, geometry=None, overwrite=False, inputs=(),
                 resume=False, **_):
        if not 3 <= len(shape) <= 4:
            raise ShapeError(f"OUTPUT {spec}: a TIFF output holds one stack (Z, Y, X[, C]); "
                             f"this output has shape {tuple(shape)}")
        require_tifffile()
        ome = spec.format == "ometiff"
        notes = []

        def create(tmp):
            array, note = create_tiff(tmp, tuple(shape), dtype, geometry, ome)
            notes.extend([note] if note else [])
            return array
        super().__init__(spec, shape, dtype, create, overwrite, inputs, resume)
        self.notes = tuple(notes)

    @classmethod
    def output_axes(cls, geometry=None):
        return "channels_last"
