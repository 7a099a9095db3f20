"""Split a job's output into tiles that fit a memory limit.

A tile is a pure task: a batch range and an output box; the input region it
needs (its halo) follows from the per-axis geometry
(:meth:`~conv3d_cli.shapes.AxisGeometry.terms`), including the inverse
mapping of transposed convolutions. The planner starts from the whole output
and halves the longest axis (preferring the axes the file stores slowest, so
reads stay contiguous) until a tile's estimated peak memory fits the per-worker
budget, then splits further only to give every worker work.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import ArgumentError
from .direct import COLS_BLOCK_BYTES
from .fftsize import next_fast_len

# Memory a process needs besides its tiles: measured at plan time (the
# interpreter, NumPy/SciPy, numba, h5py, nibabel are loaded by then), at least
# this much, plus room to load the compiled stencil.
MIN_PROCESS_BYTES = 100 << 20
JIT_MARGIN = 48 << 20
# A forked worker shares the parent's pages; what it adds besides its tiles
# (pages it writes to, its own compiled-kernel load, allocator slack).
WORKER_PRIVATE = 64 << 20
# Work below this many FLOPs is not worth splitting for parallelism.
MIN_PARALLEL_FLOPS = 2e8
# A plan is a list of tiles held in memory: more than this many is a volume
# far too large for the memory limit (a 4 TB volume in 64 MiB tiles needs 2^16).
MAX_TILES = 1 << 18
# Larger --memory-limit values are typing errors, not memory (1 EiB).
MAX_MEMORY_LIMIT = 1 << 60


@dataclass(frozen=True)
class Tile:
    b0: int
    b1: int
    out: tuple  # ((o0, o1), (o0, o1), (o0, o1)) in pre-activation output coords

    @property
    def shape(self):
        return tuple(b - a for a, b in self.out)


@dataclass
class Plan:
    method: str
    tile_shape: tuple
    batch_per_tile: int
    tiles: list = field(repr=False)
    tile_bytes: int
    workers: int             # tiles computed at once
    memory_limit: int
    process_bytes: int = 0   # all processes' baseline (parent and forked workers)
    threads: int = 1         # BLAS/FFT threads per tile: workers x threads <= --workers
    notes: tuple = ()        # what the planner changed from what was asked, for the user
    choice: dict = field(default_factory=dict)  # how the method was chosen (plan_job)

    @property
    def peak_bytes(self):
        return self.process_bytes + self.workers * self.tile_bytes

    def summary(self, job):
        return {"method": self.method, "tile_shape": list(self.tile_shape),
                "batch_per_tile": self.batch_per_tile, "tiles": len(self.tiles),
                "workers": self.workers, "threads_per_worker": self.threads,
                "memory_limit": self.memory_limit,
                "estimated_peak_bytes": self.peak_bytes, "flops": job.flops(),
                "notes": list(self.notes),
                **{k: {m: round(s, 6) for m, s in v.items()} for k, v in self.choice.items()}}


def parse_memory(text) -> int:
    """``"512M"``, ``"4G"``, ``"1.5GiB"``, ``"1000000"`` -> bytes."""
    if text is None:
        return default_memory_limit()
    shown = repr(text) if len(repr(text)) <= 40 else repr(text)[:37] + "..."
    if isinstance(text, bool):
        raise ArgumentError(f"Invalid `memory_limit`: {shown}. Expected a size in bytes.")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise ArgumentError(f"Invalid `memory_limit`: {shown}. Expected a finite size.")
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]{0,30}\.?[0-9]{1,30})\s*([kmgt]?)(i?b)?\s*", str(text), re.I)
        if not m:
            raise ArgumentError(
                f"Invalid `memory_limit`: {shown}. Expected a size like 512M, 4G or 2.5GiB.")
        value = int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))
    if value <= 0:
        raise ArgumentError(f"Invalid `memory_limit`: {shown}. Expected a positive size.")
    if value > MAX_MEMORY_LIMIT:
        raise ArgumentError(f"Invalid `memory_limit`: {shown}. Expected at most 1 EiB.")
    return value


def format_bytes(n) -> str:
    """``123456789`` -> ``"118 MiB"`` (what the messages print)."""
    return _mib(n)


def default_memory_limit() -> int:
    """Half of the memory currently available."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 2 << 30


def process_baseline() -> int:
    """Resident bytes of this process now, plus room for the compiled kernels."""
    rss = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(rss, MIN_PROCESS_BYTES) + JIT_MARGIN


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def input_extent(job, shape) -> list:
    """Per axis, the most input voxels a tile of output ``shape`` reads, its halo
    included: ``(n - 1) * s + ke`` for Conv3D; for a transposed layer, the
    ``ceil(n / s)`` rows its outputs sit over plus the ``ceil(ke / s) + 1`` rows
    one output phase's taps span."""
    spans = [g.ke if g.kind == "conv" else -(-g.ke // g.s) + 1 for g in job.geoms]
    steps = [g.s if g.kind == "conv" else 1 for g in job.geoms]
    return [(n - 1) * st + sp if g.kind == "conv" else -(-n // g.s) + sp
            for n, st, sp, g in zip(shape, steps, spans, job.geoms)]


def tile_bytes(job, nb, shape, method) -> int:
    """Estimated peak bytes of computing one tile of ``shape`` with ``nb`` batch elements."""
    isz = job.work_dtype.itemsize  # the sums' dtype (float32 for float16 layers)
    in_ext = input_extent(job, shape)
    x = nb * math.prod(in_ext) * job.in_channels * isz
    out = nb * math.prod(shape) * job.filters * isz
    if method == "fft":
        per = math.prod(next_fast_len(e) for e in in_ext)
        # input and output spectra and the inverse transform, complex = 2 reals
        scratch = nb * per * (job.in_channels + 2 * job.filters) * isz * 2
        # the kernel spectra (C x F / G per frequency, half the frequencies)
        scratch += per * job.in_channels * job.filters // job.groups * isz
        if job.kind != "conv":  # one set per output phase
            scratch *= 2
    else:
        scratch = min(COLS_BLOCK_BYTES * 2, 2 * math.prod(shape) * nb * job.in_channels
                      * math.prod(g.k for g in job.geoms) * isz)
    return int(2 * x + 3 * out + scratch)


def make_plan(job, method, memory_limit=None, workers=1, chunk_shape=None,
              split_order=(0, 1, 2), processes=True) -> Plan:
    """Tiles for ``job``: ``processes`` says whether workers > 1 are forked
    processes (each with its own baseline memory) or threads of this one."""
    limit = parse_memory(memory_limit)
    out = job.out_spatial
    whole = job.whole_axis
    asked = workers
    forked = workers if processes and workers > 1 else 0
    base = _baseline(job, forked)
    budget = (limit - base) // max(workers, 1)
    min_len = [max(4, 2 * (g.ke - 1)) for g in job.geoms]
    nb = 1
    notes = []
    if chunk_shape is not None:
        tile = [min(c, n) for c, n in zip(_chunk_shape(chunk_shape), out)]
        if whole is not None and tile[whole] < out[whole]:
            # The activation needs whole rows along W: widen the tile rather
            # than refuse the run.
            notes.append(
                f"chunk_shape W widened from {tile[whole]} to the whole axis ({out[whole]}): "
                f"the '{job.activation.name}' activation acts along W under channels_first")
            tile[whole] = out[whole]
        workers, note = _workers_for_forced_tile(job, tile, method, limit, workers, processes,
                                                 chunk_shape)
        notes += [note] if note else []
        forked = workers if processes and workers > 1 else 0
        base = _baseline(job, forked)
    else:
        tile = list(out)
        while tile_bytes(job, 1, tile, method) > budget:
            axis = _axis_to_split(tile, whole, split_order, min_len)
            if axis is None:
                need = base + workers * tile_bytes(job, 1, tile, method)
                raise ArgumentError(
                    f"`memory_limit` {_mib(limit)} is too small for this layer with {workers} "
                    f"worker(s): it needs at least about {_mib(need)} ({_mib(base)} for the "
                    f"process{'es' if forked else ''} themselves). Raise --memory-limit "
                    "or use fewer --workers.")
            tile[axis] = -(-tile[axis] // 2)
        # Several batch elements per tile when whole volumes are small.
        if tile == list(out) and job.batch > 1:
            per = tile_bytes(job, 1, tile, method)
            nb = max(1, min(job.batch, budget // max(per, 1)))
            nb = max(1, min(nb, -(-job.batch // max(workers, 1))))
        # Give every worker something to do: two tiles each for balance. FFT
        # tiles pay for their overlap, so an FFT job keeps its tiles and runs
        # each FFT on several threads instead.
        if workers > 1 and job.flops() > MIN_PARALLEL_FLOPS and method != "fft":
            want = 2 * workers
            while _count(job.batch, nb, out, tile) < want:
                if nb > 1:
                    nb = -(-nb // 2)
                    continue
                axis = _axis_to_split(tile, whole, split_order, min_len)
                if axis is None:
                    break
                tile[axis] = -(-out[axis] // (-(-out[axis] // tile[axis]) * 2))  # even pieces
    count = _count(job.batch, nb, out, tile)
    if count > MAX_TILES:
        raise ArgumentError(
            f"this job would need {count} tiles of {tuple(tile)} x {nb} batch, more than "
            f"{MAX_TILES}: the volume ({job.batch} x {'x'.join(map(str, out))} output voxels) "
            f"is too large for `memory_limit` {_mib(limit)}. Raise --memory-limit.")
    tiles = [Tile(b, min(b + nb, job.batch), box)
             for b in range(0, job.batch, nb) for box in _boxes(out, tile)]
    return Plan(method=method, tile_shape=tuple(tile), batch_per_tile=nb, tiles=tiles,
                tile_bytes=tile_bytes(job, nb, tile, method),
                workers=max(1, min(workers, len(tiles))),
                threads=max(1, asked // max(1, min(workers, len(tiles)))),
                memory_limit=limit, process_bytes=base, notes=tuple(notes))


def _baseline(job, forked):
    """Bytes besides the tiles: this process now, each forked worker's private
    pages, and each computing process's copy of the kernel as per-tap matrices
    (``Job.taps``, made where tiles are computed: once here, or once per worker)."""
    taps = math.prod(job.kernel.shape) * job.work_dtype.itemsize if job.kernel is not None else 0
    return process_baseline() + forked * WORKER_PRIVATE + max(forked, 1) * taps


def _chunk_shape(chunk_shape):
    """Three positive tile sizes (D, H, W), or an error saying what was received."""
    try:
        sizes = tuple(chunk_shape)
    except TypeError:
        sizes = None
    if sizes is None or len(sizes) != 3 or any(
            isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0 for n in sizes):
        raise ArgumentError(f"Invalid `chunk_shape`: {chunk_shape!r}. Expected 3 positive "
                            "integers D,H,W (--chunk-shape 32,64,64).")
    return [int(n) for n in sizes]


def _workers_for_forced_tile(job, tile, method, limit, workers, processes, asked):
    """(tiles computed at once, note): a forced tile shape is kept; as many
    tiles run at once as fit ``limit``, none if one does not fit."""
    per = tile_bytes(job, 1, tile, method)
    for n in range(workers, 0, -1):
        forked = n if processes and n > 1 else 0
        if _baseline(job, forked) + n * per <= limit:
            if n == workers:
                return workers, ""
            return n, (f"{n} of the {workers} workers run at once: each "
                       f"{'x'.join(map(str, tile))} tile (--chunk-shape) needs about "
                       f"{_mib(per)} and the memory limit is {_mib(limit)}")
    need = _baseline(job, 0) + per
    raise ArgumentError(
        f"--chunk-shape {','.join(map(str, asked))}: a {'x'.join(map(str, tile))} tile needs "
        f"about {_mib(per)} ({_mib(need)} with the process itself), more than "
        f"`memory_limit` {_mib(limit)}. Give a smaller --chunk-shape or raise --memory-limit.")


def _axis_to_split(tile, whole, order, min_len):
    """Next axis to halve: the file's slowest axis first, down to ``min_len``
    (so the halo stays a small part of a tile), then the next; below that any
    axis longer than one voxel."""
    for a in order:
        if a != whole and tile[a] >= 2 * min_len[a]:
            return a
    for a in order:
        if a != whole and tile[a] > 1:
            return a
    return None


def _mib(n):
    return f"{n / (1 << 20):.0f} MiB"


def _count(batch, nb, out, tile):
    return -(-batch // nb) * math.prod(-(-n // max(t, 1)) for n, t in zip(out, tile))


def _boxes(out, tile):
    # An empty output (a zero-length axis) has no boxes.
    ranges = [[(a, min(a + t, n)) for a in range(0, n, max(t, 1))] for n, t in zip(out, tile)]
    return [(r0, r1, r2) for r0 in ranges[0] for r1 in ranges[1] for r2 in ranges[2]]
