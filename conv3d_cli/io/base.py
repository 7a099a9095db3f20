"""What every format gives: an opened :class:`Volume`, and a :class:`VolumeWriter`.

A format's module returns a :class:`Volume` from its ``open_volume`` and
defines a ``Writer`` (a :class:`VolumeWriter`; single-file formats subclass
:class:`FileWriter`); :mod:`conv3d_cli.io.registry` says which module serves
which extension.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from .. import signals
from ..errors import ArgumentError, OutputExistsError, VolumeError
from ..geometry import Geometry
from .paths import VolumeSpec, refuse_input
from .tempfiles import check_writable_dir, place, remove_stale, temp_path

log = logging.getLogger("conv3d_cli")


class Volume:
    """An opened input volume.

    ``array`` takes region reads (``array[region]``, NumPy basic slicing; the
    volume itself does too); ``geometry`` places its voxels
    (:class:`~conv3d_cli.geometry.Geometry`); ``axes`` is the ``data_format``
    the format fixes for its own axes (NIfTI: ``"channels_last"``, OME-Zarr:
    ``"channels_first"``), or None where the layer's ``data_format`` says;
    ``split_order`` lists the spatial axes from the one the file stores
    slowest (tiles cut along it first read contiguous runs); ``details`` are
    format-specific header fields for ``conv3d info`` (JSON values) and
    ``details_text`` how to show them. ``close()`` closes the file and removes
    ``temp_files`` (a decompressed copy).
    """

    def __init__(self, spec: VolumeSpec, array, geometry: Geometry | None = None, axes=None,
                 split_order=(0, 1, 2), temp_files=(), details=None, details_text=None):
        self.spec = spec
        self.array = array
        self.geometry = geometry if geometry is not None else Geometry()
        self.axes = axes
        self.split_order = tuple(split_order)
        self.temp_files = list(temp_files)
        self.details = dict(details or {})
        self.details_text = dict(details_text or {})

    @property
    def shape(self):
        return tuple(self.array.shape)

    @property
    def dtype(self):
        return np.dtype(self.array.dtype)

    @property
    def affine(self):
        """The voxel-to-world matrix of :attr:`geometry`, or None."""
        return self.geometry.affine

    def __getitem__(self, region):
        return self.array[region]

    def close(self):
        close = getattr(self.array, "close", None) or \
            getattr(getattr(self.array, "array", None), "close", None)
        if close:
            close()
        for path in self.temp_files:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.temp_files = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


RESUME_NEEDS = ("--resume needs a Zarr OUTPUT (store.zarr): only Zarr stores record which "
                "tiles are written")


class VolumeWriter:
    """An output volume being written: ``writer[region] = block``, then ``commit()``.

    Made by :func:`~conv3d_cli.io.create_output`. Nothing is at OUTPUT until
    :meth:`commit`; :meth:`abort` removes what the run made and returns what
    it kept for the user to know (a resumable partial output), or None.
    Used as a context manager, a writer that was not committed is aborted.

    ``parallel_writes``: several processes may write regions concurrently
    (else the engine sends every block to the process that made the writer).
    ``resumable``: the output records finished tiles (:meth:`mark_done`,
    :meth:`done_tiles`) and the tiling it was chunked for
    (``recorded_tiles``), so an interrupted run can be continued.
    ``notes``: what the user should know about the output (e.g. geometry the
    format cannot hold).
    """

    parallel_writes = False
    resumable = False

    def __init__(self, spec: VolumeSpec, shape, dtype):
        self.spec = spec
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.recorded_tiles = None
        self.notes = ()
        self.committed = False

    @classmethod
    def check(cls, spec, overwrite=False, inputs=(), resume=False):
        """Refuse, before any work, an OUTPUT this writer could not write or would
        not replace; ``inputs`` are the specs (or opened volumes) the run reads."""
        if resume and not cls.resumable:
            raise ArgumentError(RESUME_NEEDS)

    @classmethod
    def output_axes(cls, geometry=None):
        """The ``data_format`` this format fixes for an output of ``geometry``, or None."""
        return None

    def __setitem__(self, region, block):
        raise NotImplementedError

    def commit(self):
        raise NotImplementedError

    def abort(self):
        raise NotImplementedError

    def done_tiles(self) -> set:
        return set()

    def mark_done(self, index):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.committed:
            with signals.shielded():
                self.abort()


class FileWriter(VolumeWriter):
    """An output file written under a temporary name beside OUTPUT, renamed by ``commit()``.

    The temporary file (``.NAME.conv3d-PID-START-HOST.tmp``, see
    :mod:`~conv3d_cli.io.tempfiles`) is beside OUTPUT, so the rename is
    atomic; without ``overwrite`` it refuses an OUTPUT that another process
    created meanwhile. A subclass passes ``create(path)``, which makes the
    temporary file and returns an object that takes region writes and
    ``close()``; it may convert the finished file in :meth:`_finish` (e.g.
    compress it). ``name`` names the temporary file (default: OUTPUT's name).
    """

    def __init__(self, spec, shape, dtype, create, overwrite=False, inputs=(), resume=False,
                 name=None):
        super().__init__(spec, shape, dtype)
        self.check(spec, overwrite, inputs, resume)
        self.overwrite = overwrite
        self.folder = os.path.dirname(os.path.abspath(spec.path))
        self._tmp = temp_path(self.folder, name or os.path.basename(spec.path))
        self._file = None
        log.info("writing %s as %s", spec, self._tmp)
        try:
            self._file = create(self._tmp)
        except BaseException:
            with signals.shielded():
                self.abort()
            raise

    @classmethod
    def check(cls, spec, overwrite=False, inputs=(), resume=False):
        super().check(spec, overwrite, inputs, resume)
        refuse_input(spec, [getattr(i, "spec", i) for i in inputs])
        folder = os.path.dirname(os.path.abspath(spec.path))
        check_writable_dir(folder, f"OUTPUT {spec}")
        if os.path.isdir(spec.path):
            raise VolumeError(f"OUTPUT {spec} is a directory")
        remove_stale(folder)
        cls._check_existing(spec, overwrite)

    @classmethod
    def _check_existing(cls, spec, overwrite):
        if os.path.exists(spec.path) and not overwrite:
            raise OutputExistsError(f"OUTPUT {spec} exists; pass --overwrite to replace it")

    def __setitem__(self, region, block):
        self._file[region] = block

    def _close(self):
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def _finish(self, tmp):
        """The file to put in place, made from the finished temporary file ``tmp``."""
        return tmp

    def commit(self):
        """Put the finished output in place (the only step that touches OUTPUT)."""
        self._close()
        tmp = self._finish(self._tmp)
        with signals.shielded():  # a signal now comes after the rename, not between
            place(tmp, self.spec.path, self.overwrite, f"OUTPUT {self.spec}")
            self.committed = True

    def _temporary_files(self):
        return [self._tmp]

    def abort(self):
        """Remove what the run made; OUTPUT is untouched (unless committed)."""
        if self.committed:
            return f"OUTPUT {self.spec} was written"
        try:
            self._close()
        except Exception:
            pass
        for path in self._temporary_files():
            if path and os.path.exists(path):
                os.unlink(path)
        return None
