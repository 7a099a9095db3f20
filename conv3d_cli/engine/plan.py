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

from scipy import fft as sfft

from ..errors import ArgumentError
from .direct import COLS_BLOCK_BYTES

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
    if isinstance(text, (int, float)):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text), re.I)
        if not m:
            raise ArgumentError(
                f"Invalid `memory_limit`: {text!r}. Expected a size like 512M, 4G or 2.5GiB.")
        value = int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))
    if value <= 0:
        raise ArgumentError(f"Invalid `memory_limit`: {text!r}. Expected a positive size.")
    return value


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


def tile_bytes(job, nb, shape, method) -> int:
    """Estimated peak bytes of computing one tile of ``shape`` with ``nb`` batch elements."""
    isz = job.work_dtype.itemsize  # the sums' dtype (float32 for float16 layers)
    spans = [g.ke if g.kind == "conv" else -(-g.ke // g.s) + 1 for g in job.geoms]
    steps = [g.s if g.kind == "conv" else 1 for g in job.geoms]
    in_ext = [(n - 1) * st + sp if g.kind == "conv" else -(-n // g.s) + sp
              for n, st, sp, g in zip(shape, steps, spans, job.geoms)]
    x = nb * math.prod(in_ext) * job.in_channels * isz
    out = nb * math.prod(shape) * job.filters * isz
    if method == "fft":
        per = math.prod(sfft.next_fast_len(e, real=True) for e in in_ext)
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
    forked = workers if processes and workers > 1 else 0
    base = process_baseline() + forked * WORKER_PRIVATE
    budget = (limit - base) // max(workers, 1)
    min_len = [max(4, 2 * (g.ke - 1)) for g in job.geoms]
    nb = 1
    notes = []
    if chunk_shape is not None:
        tile = [min(c, n) for c, n in zip(chunk_shape, out)]
        if whole is not None and tile[whole] < out[whole]:
            # The activation needs whole rows along W: widen the tile rather
            # than refuse the run.
            notes.append(
                f"chunk_shape W widened from {tile[whole]} to the whole axis ({out[whole]}): "
                f"the '{job.activation.name}' activation acts along W under channels_first")
            tile[whole] = out[whole]
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
    tiles = [Tile(b, min(b + nb, job.batch), box)
             for b in range(0, job.batch, nb) for box in _boxes(out, tile)]
    return Plan(method=method, tile_shape=tuple(tile), batch_per_tile=nb, tiles=tiles,
                tile_bytes=tile_bytes(job, nb, tile, method),
                workers=max(1, min(workers, len(tiles))),
                threads=max(1, workers // max(1, min(workers, len(tiles)))),
                memory_limit=limit, process_bytes=base, notes=tuple(notes))


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
    return -(-batch // nb) * math.prod(-(-n // t) for n, t in zip(out, tile))


def _boxes(out, tile):
    # An empty output (a zero-length axis) has no boxes.
    ranges = [[(a, min(a + t, n)) for a in range(0, n, max(t, 1))] for n, t in zip(out, tile)]
    return [(r0, r1, r2) for r0 in ranges[0] for r1 in ranges[1] for r2 in ranges[2]]
