"""NRRD volumes (``.nrrd``, and ``.nhdr`` with a detached data file) through pynrrd.

pynrrd parses the header; the voxels (first axis fastest, as NIfTI's) are read
region by region from the data's offset (:class:`~conv3d_cli.io.rawfile.RawArrayFile`)
for ``raw`` encoding, and from a decompressed temporary copy for ``gzip``
(disk, not memory, holds the volume). Other encodings (ascii, hex, bzip2) are
refused in one line.

Geometry: the three spatial axes are those with a ``space directions`` vector
(a channel axis, direction ``none``, may come first or last). The
voxel-to-world matrix has those vectors as columns and ``space origin`` as
translation, in the NRRD ``space``; NRRD's anatomical spaces name which way
the world axes run, so the matrix is turned into NIfTI's RAS+ by flipping
rows: LPS (3D Slicer, ITK) flips x and y, LAS flips x. Without directions,
``spacings`` give a diagonal matrix. ``space units`` give the unit
(millimetres where an anatomical space names none).

Outputs are raw ``.nrrd`` files in LPS (as 3D Slicer and ITK write them),
``(X, Y, Z[, C])`` with the channels last (kind ``vector``).
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..errors import ArgumentError, ShapeError, VolumeError
from ..geometry import Geometry
from .base import FileWriter, Volume
from .nifti import _decompress
from .npy import check_dtype
from .paths import check_input_path
from .rawfile import RawArrayFile

# NRRD space -> the sign that takes each of its world axes to RAS+.
SPACE_TO_RAS = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
}
# NRRD space units -> the geometry's unit names, and back.
_UNITS_IN = {"m": "meter", "cm": "centimeter", "mm": "millimeter", "um": "micrometer",
             "µm": "micrometer", "micron": "micrometer", "nm": "nanometer"}
_UNITS_OUT = {"meter": "m", "centimeter": "cm", "millimeter": "mm", "micrometer": "um",
              "nanometer": "nm"}
# A header longer than this is not a volume's.
MAX_HEADER = 1 << 20


def require_pynrrd():
    try:
        import nrrd
    except ImportError:
        raise ArgumentError("NRRD volumes need pynrrd: pip install pynrrd (or pip install "
                            "\".[nrrd]\" in the conv3d clone)") from None
    return nrrd


def read_header(path):
    """(header dict, offset of the data in the file that holds them, that file)."""
    nrrd = require_pynrrd()
    check_input_path(path, path)
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(_Limited(fh, path))
            offset = fh.tell()
        dtype = nrrd.reader._determine_datatype(header)
    except VolumeError:
        raise
    except Exception as exc:  # pynrrd raises NRRDError, KeyError, ValueError, ...
        raise VolumeError(f"{path}: not a valid NRRD file ({exc})") from None
    data_file = header.get("data file", header.get("datafile"))
    if data_file is not None:
        if not isinstance(data_file, str) or data_file.startswith("LIST") or " " in data_file:
            raise VolumeError(f"{path}: data file {str(data_file)[:60]!r}: only one detached "
                              "data file is read")
        folder = os.path.dirname(os.path.abspath(path))
        data_path = os.path.join(folder, data_file)
        # As links out of a Zarr store or HDF5 external links: a header must not
        # carry any file on the machine into an output.
        real = os.path.realpath(data_path)
        if os.path.commonpath([os.path.realpath(folder), real]) != os.path.realpath(folder):
            raise VolumeError(f"{path}: data file {data_file[:60]!r} is outside the header's "
                              "folder; not followed")
        check_input_path(data_path, data_path)
        offset = 0
    else:
        data_path = path
    if int(header.get("line skip", 0)):
        raise VolumeError(f"{path}: 'line skip' is not supported; rewrite the file with "
                          "unu save")
    return header, check_dtype(dtype, path), offset, data_path


class _Limited:
    """The header's lines, refused past :data:`MAX_HEADER` bytes (a file without the
    blank line that ends the header is read no further)."""

    def __init__(self, fh, path):
        self.fh, self.path, self.read = fh, path, 0

    def __iter__(self):
        while True:
            line = self.fh.readline(MAX_HEADER)
            if not line:
                return
            self.read += len(line)
            if self.read > MAX_HEADER:
                raise VolumeError(f"{self.path}: not a valid NRRD file (no end of header "
                                  f"in its first {MAX_HEADER} bytes)")
            yield line


def _spatial_axes(header, ndim, path):
    """The indices of the three spatial axes, and the channel axis or None."""
    directions = header.get("space directions")
    if directions is not None and np.shape(directions) != (ndim, 3):
        raise VolumeError(f"{path}: not a valid NRRD file ('space directions' has "
                          f"{len(directions)} vectors of {np.shape(directions)[1:]} for "
                          f"{ndim} axes in a 3-D space)")
    if directions is not None:
        spatial = [k for k in range(ndim) if np.all(np.isfinite(directions[k]))]
    else:
        kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * ndim)]
        spatial = [k for k in range(ndim) if kinds[k] in ("domain", "space")]
        if ndim == 3:
            spatial = [0, 1, 2]
    if len(spatial) != 3 or ndim not in (3, 4):
        raise VolumeError(f"{path}: expected a NRRD volume of 3 spatial axes and at most one "
                          f"channel axis (first or last); sizes {list(header['sizes'])}, "
                          f"spatial axes {spatial}")
    channel = next((k for k in range(ndim) if k not in spatial), None)
    if channel not in (None, 0, 3):
        raise VolumeError(f"{path}: the channel axis of a NRRD volume must come first or "
                          f"last; here it is axis {channel}")
    return spatial, channel


def geometry_of(header, spatial, path):
    """The volume's :class:`Geometry` (RAS+), or one without an affine."""
    space = str(header.get("space", "")).lower()
    flips = np.array(SPACE_TO_RAS.get(space, (1, 1, 1)), dtype=np.float64)
    directions = header.get("space directions")
    affine = np.eye(4)
    if directions is not None:
        affine[:3, :3] = np.asarray([directions[k] for k in spatial], dtype=np.float64).T
        origin = header.get("space origin")
        if origin is not None:
            affine[:3, 3] = np.asarray(origin, dtype=np.float64)
        affine[:3] *= flips[:, None]
    elif header.get("spacings") is not None:
        spacings = np.asarray(header["spacings"], dtype=np.float64)
        affine[:3, :3] = np.diag([spacings[k] for k in spatial])
    else:
        return Geometry(header=header)
    if not (np.all(np.isfinite(affine)) and np.linalg.matrix_rank(affine[:3, :3]) == 3):
        raise VolumeError(f"{path}: the space directions or spacings are not usable (NaN, "
                          "infinite or singular)")
    units = header.get("space units")
    if units is not None and len(units) == 3:
        units = tuple(_UNITS_IN.get(str(u).lower()) for u in units)
    else:
        units = ("millimeter",) * 3 if space in SPACE_TO_RAS else None
    return Geometry(affine, units, header, "affine")


def open_volume(spec, header_only=False, tmp_dir=None) -> Volume:
    path = spec.path
    header, dtype, offset, data_path = read_header(path)
    shape = tuple(int(n) for n in header["sizes"])
    if min(shape) < 1:
        raise VolumeError(f"{path}: the image is empty: sizes {list(shape)}")
    spatial, channel = _spatial_axes(header, len(shape), path)
    geometry = geometry_of(header, spatial, path)
    axes = "channels_first" if channel == 0 else "channels_last"
    details = {"space": header.get("space"), "encoding": header.get("encoding")}
    volume = Volume(spec, None, geometry, axes=axes, split_order=(2, 1, 0), details=details)
    nbytes = math.prod(shape) * dtype.itemsize
    encoding = str(header.get("encoding", "")).lower()
    skip = int(header.get("byte skip", 0))
    if encoding in ("gzip", "gz"):
        if skip:
            raise VolumeError(f"{path}: 'byte skip' with gzip encoding is not supported")
        if not header_only:
            tmp = _decompress(data_path, tmp_dir, nbytes, offset, name=path)
            volume.temp_files.append(tmp)
            data_path, offset = tmp, 0
    elif encoding == "raw":
        if skip < -1:
            raise VolumeError(f"{path}: not a valid NRRD file (byte skip {skip})")
        # byte skip -1: the data are the file's last bytes.
        offset = os.path.getsize(data_path) - nbytes if skip == -1 else offset + skip
    else:
        raise VolumeError(f"{path}: {encoding} encoding is not read; only raw and gzip NRRD "
                          "are (rewrite it with: unu save -f nrrd -e raw)")
    volume.array = RawArrayFile(data_path, offset, shape, dtype, fortran_order=True, name=path)
    if not header_only and (offset < 0 or os.path.getsize(data_path) < offset + nbytes):
        volume.close()
        raise VolumeError(f"{path}: file is truncated: the header says sizes {list(shape)} "
                          f"of {header['type']}")
    return volume


# ------------------------------------------------------------------ output side

def header_text(shape, dtype, geometry):
    """The header of a raw, little-endian NRRD output (ending with its blank line)."""
    nrrd = require_pynrrd()
    fmt = nrrd.formatters
    dtype = np.dtype(dtype)
    lines = ["NRRD0005", "# written by conv3d", f"type: {_NRRD_TYPES[dtype.name]}",
             f"dimension: {len(shape)}", f"sizes: {' '.join(str(int(n)) for n in shape)}"]
    affine = geometry.affine if geometry is not None else None
    if affine is not None:
        units = geometry.units or (None,) * 3
        lps = np.array(affine, dtype=np.float64)
        lps[:3] *= np.array(SPACE_TO_RAS["lps"], dtype=np.float64)[:, None]  # RAS -> LPS
        lps += 0.0  # no "-0" in the header
        columns = [fmt.format_vector(lps[:3, k]) for k in range(3)]
        lines += ["space: left-posterior-superior",
                  "space directions: " + " ".join(columns + ["none"] * (len(shape) - 3)),
                  "space origin: " + fmt.format_vector(lps[:3, 3])]
        if all(u in _UNITS_OUT for u in units):
            lines.append("space units: " + " ".join(f'"{_UNITS_OUT[u]}"' for u in units))
    lines.append("kinds: " + " ".join(["domain"] * 3 + ["vector"] * (len(shape) - 3)))
    lines += ["endian: little" if dtype.itemsize > 1 else None, "encoding: raw"]
    return ("\n".join(line for line in lines if line) + "\n\n").encode()


_NRRD_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16",
               "int32": "int32", "uint32": "uint32", "int64": "int64", "uint64": "uint64",
               "float32": "float", "float64": "double"}


def create_nrrd(path, shape, dtype, geometry):
    """A new raw NRRD at ``path`` (zeroed voxels) written by region."""
    text = header_text(shape, dtype, geometry)
    dtype = np.dtype(dtype).newbyteorder("<")
    with open(path, "xb") as fh:
        fh.write(text)
        fh.truncate(len(text) + math.prod(shape) * dtype.itemsize)
    return RawArrayFile(path, len(text), shape, dtype, fortran_order=True, writable=True)


class Writer(FileWriter):
    """A raw NRRD ``(X, Y, Z[, C])``, channels last, placed in LPS."""

    parallel_writes = True

    def __init__(self, spec, *, shape, dtype, geometry=None, overwrite=False, inputs=(),
                 resume=False, **_):
        if not 3 <= len(shape) <= 4:
            raise ShapeError(f"OUTPUT {spec}: a NRRD output holds one volume (X, Y, Z[, C]); "
                             f"this output has shape {tuple(shape)}")
        require_pynrrd()
        super().__init__(spec, shape, dtype, lambda tmp: create_nrrd(tmp, shape, dtype, geometry),
                         overwrite, inputs, resume)

    @classmethod
    def check(cls, spec, overwrite=False, inputs=(), resume=False):
        if spec.path.lower().endswith(".nhdr"):
            raise VolumeError(f"OUTPUT {spec}: NRRD outputs are single .nrrd files; name "
                              "OUTPUT .nrrd")
        super().check(spec, overwrite, inputs, resume)

    @classmethod
    def output_axes(cls, geometry=None):
        return "channels_last"
