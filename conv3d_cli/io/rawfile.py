"""An uncompressed array stored at an offset in a file, read and written by region.

Used for ``.npy`` (C or Fortran order) and uncompressed NIfTI (Fortran
order). Every access is an explicit ``pread``/``pwrite`` of the contiguous
runs of the region, never a memory map, so resident memory stays bounded by
the region's size however large the file is. File handles are reopened after
a fork, so worker processes share nothing but the path.

A ``pread``/``pwrite`` call may move fewer bytes than asked (Linux moves at
most 0x7ffff000 bytes per call, macOS refuses counts over 2**31 - 1), so
every transfer loops until the whole run is moved; a read that reaches the
end of the file first means the file is truncated.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..errors import VolumeError

# Bytes asked of one system call: under every platform's per-call limit.
_MAX_CALL = 1 << 30


def _normalize(idx, shape):
    """Basic index (ints and step-1 slices) -> per-axis (start, stop), axes to squeeze."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if len(idx) < len(shape):
        idx = idx + (slice(None),) * (len(shape) - len(idx))
    ranges, squeeze = [], []
    for ax, (i, n) in enumerate(zip(idx, shape)):
        if isinstance(i, slice):
            start, stop, step = i.indices(n)
            if step != 1:
                raise IndexError("only step-1 slices are supported")
            ranges.append((start, max(stop, start)))
        else:
            i = int(i)
            i = i + n if i < 0 else i
            ranges.append((i, i + 1))
            squeeze.append(ax)
    return ranges, tuple(squeeze)


def _read_full(fd, buf, offset):
    """Read into the byte buffer ``buf`` from ``offset``; the bytes read (short only at EOF)."""
    view, done = memoryview(buf), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:done + _MAX_CALL]], offset + done)
        if got == 0:
            break
        done += got
    return done


def _write_full(fd, buf, offset, path):
    """Write the whole byte buffer ``buf`` at ``offset``."""
    view, done = memoryview(buf), 0
    while done < len(view):
        try:
            put = os.pwrite(fd, view[done:done + _MAX_CALL], offset + done)
        except OSError as exc:
            raise VolumeError(f"{path}: could not write: {exc.strerror or exc}") from None
        if put == 0:
            raise VolumeError(f"{path}: could not write: the system wrote 0 of "
                              f"{len(view) - done} bytes (is the disk full?)")
        done += put


class RawArrayFile:
    """``array[region]`` reads and ``array[region] = block`` writes on a file."""

    def __init__(self, path, offset, shape, dtype, fortran_order=False, writable=False,
                 name=None):
        self.path = os.fspath(path)
        self.name = name or self.path  # the file a user knows (not a decompressed copy)
        self.offset = int(offset)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.fortran_order = fortran_order
        self.writable = writable
        self._fd = None
        self._pid = None

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize

    def _handle(self):
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR if self.writable else os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def close(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    # The file is C-ordered over `cshape` (the reversed shape for Fortran order).
    def _c_view(self, ranges):
        if self.fortran_order:
            return tuple(reversed(self.shape)), list(reversed(ranges))
        return self.shape, list(ranges)

    def _runs(self, cshape, ranges):
        """Yield (byte offset in file, element offset in block, element count)."""
        # Axes from `tail` on are taken whole, so each run covers them and the
        # range of axis tail-1: one contiguous stretch of the file.
        tail = len(cshape)
        while tail > 0 and ranges[tail - 1] == (0, cshape[tail - 1]):
            tail -= 1
        inner = math.prod(cshape[tail:])
        if tail == 0:
            yield self.offset, 0, inner
            return
        run_axis = tail - 1
        run_len = (ranges[run_axis][1] - ranges[run_axis][0]) * inner
        strides = [math.prod(cshape[a + 1:]) for a in range(len(cshape))]
        outer = [range(a, z) for a, z in ranges[:run_axis]]
        pos = 0
        for index in np.ndindex(*[len(r) for r in outer]) if outer else [()]:
            start = sum((outer[a][i]) * strides[a] for a, i in enumerate(index))
            start += ranges[run_axis][0] * strides[run_axis]
            yield self.offset + start * self.dtype.itemsize, pos, run_len
            pos += run_len

    def __getitem__(self, idx):
        ranges, squeeze = _normalize(idx, self.shape)
        cshape, cranges = self._c_view(ranges)
        out = np.empty([z - a for a, z in cranges], self.dtype)
        if out.size:
            flat = out.reshape(-1).view(np.uint8)
            fd, isz = self._handle(), self.dtype.itemsize
            for off, pos, count in self._runs(cshape, cranges):
                want = count * isz
                try:
                    got = _read_full(fd, flat[pos * isz:pos * isz + want], off)
                except OSError as exc:
                    raise VolumeError(f"{self.name}: could not read: "
                                      f"{exc.strerror or exc}") from None
                if got != want:
                    raise VolumeError(
                        f"{self.name}: file is truncated: its data should end at byte "
                        f"{self.offset + self.nbytes}, the file has {os.fstat(fd).st_size}")
        if self.fortran_order:
            out = out.T
        return out.squeeze(squeeze) if squeeze else out

    def __setitem__(self, idx, value):
        ranges, squeeze = _normalize(idx, self.shape)
        block = np.asarray(value, dtype=self.dtype)
        block = np.broadcast_to(block if not squeeze else np.expand_dims(block, squeeze),
                                [z - a for a, z in ranges])
        cshape, cranges = self._c_view(ranges)
        if self.fortran_order:
            block = block.T
        flat = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        fd, isz = self._handle(), self.dtype.itemsize
        for off, pos, count in self._runs(cshape, cranges):
            _write_full(fd, flat[pos * isz:(pos + count) * isz], off, self.name)
