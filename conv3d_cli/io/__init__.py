"""Volumes in and out: ``.npy``, NIfTI, HDF5, Zarr; atomic outputs.

``open_volume(spec)`` gives a :class:`Volume` read region by region, with
its :class:`~conv3d_cli.geometry.Geometry`; ``create_output(spec, shape=...,
dtype=..., geometry=...)`` a :class:`VolumeWriter` whose ``commit()`` puts the
finished output in place (a failed or interrupted run leaves no partial file
and never touches an existing one). ``read_volume`` / ``write_volume`` are the
whole-array conveniences. One module per format; :mod:`.registry` maps
extensions to them and says how to add one.
"""

from .base import FileWriter, Volume, VolumeWriter
from .base import Volume as InputVolume
from .paths import VolumeSpec, parse_spec
from .volumes import (check_output, create_output, open_volume, output_axes, read_volume,
                      write_volume)

__all__ = ["open_volume", "create_output", "check_output", "output_axes", "read_volume",
           "write_volume", "parse_spec", "VolumeSpec", "Volume", "InputVolume",
           "VolumeWriter", "FileWriter"]
