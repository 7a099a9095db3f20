"""gzip files as fast as the cores allow: parallel members out, fast (and parallel) reads in.

Compression. A gzip file may be a series of members, each a complete gzip
stream (RFC 1952, section 2.2); every reader (gzip, zlib, nibabel, Python's
``gzip``) reads them as one stream. :func:`compress_file` cuts the file into
blocks of :data:`BLOCK` bytes and deflates each into its own member on a pool
of threads (zlib and ISA-L release the GIL while they work), reading and
writing in order with at most two blocks per thread in flight: memory stays
bounded whatever the file's size. Cutting costs little: deflate looks back
32 KiB at most, so a 4 MiB block loses under 1% of its matches; a member adds
26 bytes of header and trailer.

Each member's header carries, in an extra field (RFC 1952, 2.3.1.1: readers
skip subfields they do not know), the member's own size in bytes, as BGZF
(samtools) does: a reader that knows it can find every member without
inflating the ones before, and inflate them in parallel
(:func:`decompress_file`). Files from elsewhere are inflated as one stream.

Deflate itself: ISA-L (the ``isal`` package) where it is installed, about 10x
zlib's speed at level 1 with the same or smaller files; else zlib. The level
is nibabel's default for ``.nii.gz``, 1: on float32 volumes level 6 makes
files 1-5% smaller for 1-4x zlib's time.
"""

from __future__ import annotations

import collections
import gzip
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

try:  # ISA-L's deflate and inflate; zlib's where the package is missing
    from isal import isal_zlib as _fast_zlib
except ImportError:  # pragma: no cover - depends on the platform's wheels
    _fast_zlib = None

BLOCK = 4 << 20   # bytes of input per member
LEVEL = 1         # nibabel's default compresslevel
MAX_MEMBER = 4 * BLOCK  # members holding more are inflated as a stream (bounded memory)
_SUBFIELD = b"C3"  # extra subfield id: its 4 bytes are the member's size in bytes
_HEADER = struct.Struct("<2sBBIBBH2sHI")  # magic, CM, FLG, MTIME, XFL, OS, XLEN, SI, LEN, size
_FEXTRA = 4
_OS_UNKNOWN = 255


def backend():
    """The deflate module in use: ``isal_zlib`` if installed, else ``zlib``."""
    return _fast_zlib or zlib


def compress_member(data, level=LEVEL, lib=None) -> bytes:
    """``data`` as one gzip member whose header records the member's size."""
    lib = lib or backend()
    deflate = lib.compressobj(level, lib.DEFLATED, -15)  # raw deflate: we write the framing
    body = deflate.compress(data) + deflate.flush()
    size = _HEADER.size + len(body) + 8
    header = _HEADER.pack(b"\x1f\x8b", 8, _FEXTRA, 0, 0, _OS_UNKNOWN, 8, _SUBFIELD, 4, size)
    trailer = struct.pack("<II", lib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF)
    return header + body + trailer


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def compress_file(src, dst, threads=None, level=LEVEL, block=None, lib=None, progress=None):
    """Compress file ``src`` into a new file ``dst`` (members of ``block`` bytes each,
    default :data:`BLOCK`) on ``threads`` (default: the usable cores);
    ``progress(n)`` is told each block of ``n`` input bytes written."""
    threads = max(1, int(threads or usable_cores()))
    block = block or BLOCK
    with open(src, "rb") as fin, open(dst, "xb") as fout, \
            ThreadPoolExecutor(threads, thread_name_prefix="conv3d-gzip") as pool:
        pending = collections.deque()
        try:
            while True:
                data = fin.read(block)
                if data:
                    pending.append((pool.submit(compress_member, data, level, lib), len(data)))
                if len(pending) >= 2 * threads or (pending and not data):
                    future, n = pending.popleft()
                    fout.write(future.result())
                    if progress is not None:
                        progress(n)
                if not data and not pending:
                    break
        finally:
            for future, _ in pending:  # interrupted: drop what is queued, wait for the rest
                future.cancel()


def _member_size(head):
    """The size a member's header records (our extra subfield), or None."""
    if len(head) < _HEADER.size:
        return None
    magic, method, flags, _, _, _, xlen, sub, length, size = _HEADER.unpack_from(head)
    if (magic, method, flags, xlen, sub, length) != (b"\x1f\x8b", 8, _FEXTRA, 8, _SUBFIELD, 4):
        return None
    return size if size >= _HEADER.size + 8 else None


def _index(fh, total, limit):
    """[(offset, size, length)] of the members holding the first ``limit`` bytes, if
    each records its size (our extra subfield) and holds at most :data:`MAX_MEMBER`
    bytes (its trailer says); else None."""
    members, offset, held = [], 0, 0
    while offset < total and held < limit:
        size = _member_size(os.pread(fh.fileno(), _HEADER.size, offset))
        if size is None or offset + size > total:
            return None
        length = struct.unpack("<I", os.pread(fh.fileno(), 4, offset + size - 4))[0]
        if length > MAX_MEMBER:
            return None
        members.append((offset, size, length))
        offset, held = offset + size, held + length
    return members or None


def inflate_member(raw, length=MAX_MEMBER, lib=None) -> bytes:
    """The data of one gzip member ``raw`` (header as :func:`compress_member` writes it),
    at most ``length`` bytes of it, checked against its CRC-32 and length; ValueError
    if they do not match."""
    lib = lib or backend()
    inflate = lib.decompressobj(-15)
    # max_length 0 would mean no bound: a member that says it is empty gets 1.
    data = inflate.decompress(memoryview(raw)[_HEADER.size:len(raw) - 8], max(length, 1))
    crc, size = struct.unpack("<II", bytes(raw[-8:]))
    if not inflate.eof or inflate.unused_data or \
            (lib.crc32(data) & 0xFFFFFFFF, len(data) & 0xFFFFFFFF) != (crc, size):
        raise ValueError("gzip member fails its CRC-32 or length check")
    return data


def decompress_file(src, dst, limit, threads=None, chunk=16 << 20, progress=None, offset=0):
    """Write the first ``limit`` bytes of the decompressed ``src`` into a new file ``dst``.

    Nothing beyond ``limit`` is inflated (a small file cannot fill the disk).
    Files made of members that record their sizes are inflated in parallel on
    ``threads`` (default: the usable cores); others as one stream. Corrupt or
    truncated data raise OSError, EOFError, ValueError or zlib.error.
    ``progress(n)`` is told each ``n`` bytes written. The gzip data start at byte
    ``offset`` of ``src`` (an NRRD file's attached header comes first)."""
    progress = progress or (lambda n: None)
    threads = max(1, int(threads or usable_cores()))
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        total = os.fstat(fin.fileno()).st_size
        members = _index(fin, total, limit) if threads > 1 and not offset else None
        if members is None:
            fin.seek(offset)
            _stream(fin, fout, limit, chunk, progress)
        else:
            _parallel(fin, fout, members, limit, threads, progress)


def _stream(fin, fout, limit, chunk, progress):
    with _reader(fin) as reader:
        left = limit
        while left > 0:
            data = reader.read(min(chunk, left))
            if not data:
                break
            fout.write(data)
            left -= len(data)
            progress(len(data))


def _reader(fh):
    """A gzip reader of the open file ``fh``: ISA-L's if installed, else Python's."""
    if _fast_zlib is not None:
        from isal import igzip
        return igzip.GzipFile(fileobj=fh, mode="rb")
    return gzip.GzipFile(fileobj=fh, mode="rb")


def _parallel(fin, fout, members, limit, threads, progress):
    def task(offset, size, length):
        return inflate_member(os.pread(fin.fileno(), size, offset), length)

    left = limit
    with ThreadPoolExecutor(threads, thread_name_prefix="conv3d-gunzip") as pool:
        pending, todo = collections.deque(), collections.deque(members)
        try:
            while (todo or pending) and left > 0:
                while todo and len(pending) < 2 * threads:
                    pending.append(pool.submit(task, *todo.popleft()))
                data = pending.popleft().result()
                fout.write(memoryview(data)[:left])
                progress(min(len(data), left))
                left -= min(len(data), left)
        finally:
            for future in pending:
                future.cancel()
