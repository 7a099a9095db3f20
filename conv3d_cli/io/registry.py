"""The volume formats: one table from file extension to the module that reads and writes it.

:func:`~conv3d_cli.io.volumes.open_volume` and
:func:`~conv3d_cli.io.volumes.create_output` pick the module by the
extension of the path; nothing outside ``conv3d_cli/io`` asks which format a
volume has. The table imports nothing heavy: a format's module (and its
library: nibabel, h5py, zarr, tifffile, pynrrd) is imported the first time a
volume of that format is opened; an optional library that is missing is a
one-line error naming the extra to install.

Adding a format
---------------
Write one module in ``conv3d_cli/io/`` and add one line to :data:`FORMATS`
(its name, extensions, the name messages use, the float dtypes it stores,
and for containers an example of a path with an inner array). The module
provides:

``open_volume(spec, header_only=False, tmp_dir=None) -> Volume``
    Check the file (:func:`~conv3d_cli.io.paths.check_input_path`; refuse
    what it cannot read in one :class:`~conv3d_cli.errors.VolumeError` line
    naming the file), and return a :class:`~conv3d_cli.io.base.Volume`: an
    object with region reads (``array[region]``, NumPy basic slicing, opened
    lazily per process so forked and Dask workers reopen it), its
    :class:`~conv3d_cli.geometry.Geometry` (the voxel-to-world affine, units,
    and in ``header`` whatever its writer needs to write the metadata back),
    ``axes`` if the format fixes where its channels are, and any temporary
    files to remove on ``close()``. ``header_only`` reads no voxels.

``Writer``, a :class:`~conv3d_cli.io.base.VolumeWriter`
    ``Writer(spec, *, shape, dtype, chunks, geometry, description, overwrite,
    inputs, resume_record, resume, tmp_dir, workers)`` (keywords it has no use for are
    taken and ignored: ``**_``), as :func:`~conv3d_cli.io.create_output`
    documents them. It checks OUTPUT in the classmethod ``check`` (also
    called before any work), turns the moved geometry into the format's own
    metadata (ignoring a ``geometry.header`` of another format), refuses
    shapes it cannot hold in one line, writes regions (``writer[region] = block``);
    ``commit()`` puts the output in place atomically and ``abort()`` removes
    what the run made. Most single-file formats subclass
    :class:`~conv3d_cli.io.base.FileWriter`, which writes under a temporary
    name beside OUTPUT and renames it on commit; they only create the
    temporary file. Class attributes say what the engine and the run may do:
    ``parallel_writes`` (worker processes may write regions concurrently),
    ``resumable`` (``done_tiles`` / ``mark_done`` / ``recorded_tiles`` work),
    and ``output_axes(geometry)`` (a channel position the format forces).

Tests: a round trip through ``write_volume`` / ``read_volume`` and the
format's own reader (nibabel, h5py, ...), ``conv3d run`` into and out of the
format against ``tests/reference.py``, the geometry read back, and the
refusals (truncated, corrupt, hostile files) in one line each.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

FLOATS = ("float16", "float32", "float64")
INTS = ("int8", "uint8", "int16", "uint16", "int32")


@dataclass(frozen=True)
class Format:
    name: str                # VolumeSpec.format
    extensions: tuple        # lower case, with the dot
    title: str               # as messages name it
    floats: tuple            # float dtypes every reader of the format understands
    inner: str | None = None  # containers: an example path to an inner array
    module: str | None = None  # conv3d_cli.io.<module> (default: the name), or a dotted path
    ints: tuple = INTS       # integer dtypes it stores (--output-dtype int16 ...)

    def load(self):
        """The format's module (imported on first use)."""
        name = self.module or self.name
        return importlib.import_module(name if "." in name else f"{__package__}.{name}")


# One line per format. Messages list the formats in this order.
FORMATS = [
    Format("npy", (".npy",), ".npy", FLOATS),
    Format("nifti", (".nii", ".nii.gz"), "NIfTI", ("float32", "float64")),
    Format("hdf5", (".h5", ".hdf5", ".hdf", ".he5"), "HDF5", FLOATS, "file.h5:/group/dataset"),
    Format("zarr", (".zarr",), "Zarr", FLOATS, "store.zarr:/group/array", module="zarr_io"),
    Format("mgh", (".mgh", ".mgz"), "MGH", ("float32",), ints=("uint8", "int16", "int32")),
    Format("analyze", (".hdr", ".img"), "Analyze", ("float32", "float64")),
    Format("nrrd", (".nrrd", ".nhdr"), "NRRD", ("float32", "float64"), module="nrrd_io"),
    Format("ometiff", (".ome.tif", ".ome.tiff"), "OME-TIFF", ("float32", "float64"),
           module="tiff"),
    Format("tiff", (".tif", ".tiff"), "TIFF", ("float32",), ints=("uint8", "uint16", "int16")),
]

BY_NAME = {f.name: f for f in FORMATS}
BY_EXTENSION = {ext: f for f in FORMATS for ext in f.extensions}


def extension(path: str) -> str:
    """The registered extension ``path`` ends with (the longest one), else its last suffix."""
    low = os.fspath(path).lower().rstrip("/")
    found = [ext for ext in BY_EXTENSION if low.endswith(ext)]
    return max(found, key=len) if found else os.path.splitext(low)[1]


def inner_path_extensions():
    """Extensions of containers, whose paths may name an inner array (file.h5:/group/data)."""
    return tuple(ext for f in FORMATS if f.inner for ext in f.extensions)


def expected_formats() -> str:
    """What a volume path may be, for messages."""
    parts = []
    for f in FORMATS:
        text = ", ".join(f.extensions)
        parts.append(f"{text} ({f.inner})" if f.inner else text)
    return ", ".join(parts[:-1]) + " or " + parts[-1]


def module(name):
    """The module of the format called ``name``."""
    return BY_NAME[name].load()
