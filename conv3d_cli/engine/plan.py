"""Split a job's output into tiles that fit a memory limit.

A tile is a batch range and an output box; the input region it reads (its
halo) follows from the per-axis geometry
(:meth:`~conv3d_cli.shapes.AxisGeometry.terms`), including the inverse
mapping of transposed convolutions. The planner starts from the whole output
and halves the longest axis (preferring the axes the file stores slowest, so
reads stay contiguous) until a tile's estimated peak memory fits the
per-worker budget, then splits further only to give every worker work. A
tile's estimate is its input and output blocks plus the scratch memory of the
method that computes it, which each method's module states
(``tile_scratch_bytes`` in :mod:`~conv3d_cli.engine.direct`,
:mod:`~conv3d_cli.engine.fft`, :mod:`~conv3d_cli.engine.winograd`). A forced
tile shape (``chunk_shape``) or a recorded tiling (``tiles``, when a run is
resumed) is kept, and only as many tiles run at once as fit the limit.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import ArgumentError

# Memory a process needs besides its tiles: measured at plan time (the
# interpreter, NumPy/SciPy, numba, h5py, nibabel are loaded by then), at least
# this much, plus room to load the compiled stencil.
MIN_PROCESS_BYTES = 100 << 20
JIT_MARGIN = 48 << 20
# A forked worker shares the parent's pages (a forkserver's worker, the
# server's); what it adds besides its tiles (pages it writes to, its own
# compiled-kernel load, allocator slack). A spawned worker is a process of
# its own (MIN_PROCESS_BYTES), and so is a forkserver.
WORKER_PRIVATE = 64 << 20
# Work below this many FLOPs is not worth splitting for parallelism.
MIN_PARALLEL_FLOPS = 2e8
# A plan is a list of tiles held in memory: more than this many is a volume
# far too large for the memory limit (a 4 TB volume in 64 MiB tiles needs 2^16).
MAX_TILES = 1 << 18
# Larger --memory-limit values are typing errors, not memory (1 EiB).
MAX_MEMORY_LIMIT = 1 << 60


@dataclass(frozen=True, slots=True)
class Tile:
    b0: int
    b1: int
    out: tuple  # ((o0, o1), (o0, o1), (o0, o1)) in pre-activation output coords

    @property
    def shape(self):
        return tuple(b - a for a, b in self.out)


@dataclass(frozen=True)
class Plan:
    method: str
    tile_shape: tuple
    batch_per_tile: int
    tiles: tuple = field(repr=False)
    tile_bytes: int
    workers: int             # tiles computed at once
    memory_limit: int
    process_bytes: int = 0   # all processes' baseline (parent and forked workers)
    threads: int = 1         # BLAS/FFT threads per tile: workers x threads <= --workers
    notes: tuple = ()        # what the planner changed from what was asked, for the user
    choice: dict = field(default_factory=dict)  # how the method was chosen (plan_job)

    def __post_init__(self):
        object.__setattr__(self, "tiles", tuple(self.tiles))
        object.__setattr__(self, "tile_shape", tuple(self.tile_shape))
        object.__setattr__(self, "notes", tuple(self.notes))

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


def tile_bytes(job, nb, shape, method) -> int:
    """Estimated peak bytes of computing one tile of ``shape`` with ``nb`` batch elements:
    the input block twice (as read, and with the halo's zeros around it), the
    output block three times (the sums, the activation's result, a copy on its
    way to the sink) and the scratch of the method that computes it."""
    isz = job.work_dtype.itemsize  # the sums' dtype (float32 for float16 layers)
    x = nb * math.prod(job.input_extent(shape)) * job.in_channels * isz
    out = nb * math.prod(shape) * job.filters * isz
    return int(2 * x + 3 * out + _scratch_bytes(job, nb, shape, method))


def _scratch_bytes(job, nb, shape, method):
    """The method's own estimate: ``tile_scratch_bytes`` of its module (direct,
    fft, winograd), imported when a plan needs it."""
    module = importlib.import_module(f"{__package__}.{method}")
    return module.tile_scratch_bytes(job, nb, shape)


def make_plan(job, method, memory_limit=None, workers=1, chunk_shape=None,
              split_order=(0, 1, 2), processes=True, tiles=None) -> Plan:
    """Tiles for ``job`` by ``method`` under ``memory_limit``.

    ``processes`` says whether workers > 1 are worker processes (each with
    its own baseline memory) or threads of this one. ``chunk_shape`` forces
    the tile shape; ``tiles`` (``(b0, b1, box)`` triples, e.g. the tiling a
    resumed output was written in) forces the tiles themselves: they must
    cover the output exactly once. Either way as many tiles run at once as fit.
    """
    limit = parse_memory(memory_limit)
    asked = workers
    if tiles is not None:
        tiles = _recorded_tiles(job, tiles)
        shape = tuple(max((t.shape[a] for t in tiles), default=0) for a in range(3))
        nb = max((t.b1 - t.b0 for t in tiles), default=1)
        per = max((tile_bytes(job, t.b1 - t.b0, t.shape, method) for t in tiles), default=0)
        workers, notes = _workers_that_fit(job, per, limit, workers, processes,
                                           "tile (the recorded tiling)",
                                           _recorded_refusal(shape, nb))
        return _plan(job, method, shape, nb, tiles, workers, asked, limit, processes, notes)
    if chunk_shape is not None:
        shape, notes = _forced_shape(job, chunk_shape)
        per = tile_bytes(job, 1, shape, method)
        workers, more = _workers_that_fit(job, per, limit, workers, processes,
                                          f"{'x'.join(map(str, shape))} tile (--chunk-shape)",
                                          _forced_refusal(chunk_shape, shape))
        nb = 1
        notes += more
    else:
        shape, nb = _fitted_shape(job, method, limit, workers, processes, split_order)
        notes = []
    count = _count(job.batch, nb, job.out_spatial, shape)
    if count > MAX_TILES:
        raise ArgumentError(
            f"this job would need {count} tiles of {tuple(shape)} x {nb} batch, more than "
            f"{MAX_TILES}: the volume ({job.batch} x {'x'.join(map(str, job.out_spatial))} "
            f"output voxels) is too large for `memory_limit` {_mib(limit)}. "
            "Raise --memory-limit.")
    tiles = [Tile(b, min(b + nb, job.batch), box)
             for b in range(0, job.batch, nb) for box in _boxes(job.out_spatial, shape)]
    return _plan(job, method, shape, nb, tiles, workers, asked, limit, processes, notes)


def _plan(job, method, shape, nb, tiles, workers, asked, limit, processes, notes):
    """The plan of ``tiles``: ``workers`` of them at once (at most one per tile),
    the ``asked`` workers shared out among them as BLAS/FFT threads."""
    busy = max(1, min(workers, len(tiles)))
    return Plan(method=method, tile_shape=tuple(shape), batch_per_tile=nb, tiles=tiles,
                tile_bytes=tile_bytes(job, nb, shape, method), workers=busy,
                threads=max(1, asked // busy), memory_limit=limit,
                process_bytes=_baseline(job, workers, processes), notes=tuple(notes))


def _fitted_shape(job, method, limit, workers, processes, split_order):
    """(tile shape, batch elements per tile): the largest tiles whose estimate fits
    the per-worker budget, then smaller ones until every worker has work."""
    out = job.out_spatial
    whole = job.whole_axis
    base = _baseline(job, workers, processes)
    budget = (limit - base) // max(workers, 1)
    min_len = [max(4, 2 * (g.ke - 1)) for g in job.geoms]
    tile = list(out)
    while tile_bytes(job, 1, tile, method) > budget:
        axis = _axis_to_split(tile, whole, split_order, min_len)
        if axis is None:
            need = base + workers * tile_bytes(job, 1, tile, method)
            several = processes and workers > 1
            raise ArgumentError(
                f"`memory_limit` {_mib(limit)} is too small for this layer with {workers} "
                f"worker(s): it needs at least about {_mib(need)} ({_mib(base)} for the "
                f"process{'es' if several else ''} themselves). Raise --memory-limit "
                "or use fewer --workers.")
        tile[axis] = -(-tile[axis] // 2)
    nb = 1
    # Several batch elements per tile when whole volumes are small.
    if tile == list(out) and job.batch > 1:
        per = tile_bytes(job, 1, tile, method)
        nb = max(1, min(job.batch, budget // max(per, 1)))
        nb = max(1, min(nb, -(-job.batch // max(workers, 1))))
    # Give every worker something to do: two tiles each for balance. FFT
    # tiles pay for their overlap, so an FFT job keeps its tiles and runs
    # each FFT on several threads instead.
    if workers > 1 and job.flops() > MIN_PARALLEL_FLOPS and method != "fft":
        while _count(job.batch, nb, out, tile) < 2 * workers:
            if nb > 1:
                nb = -(-nb // 2)
                continue
            axis = _axis_to_split(tile, whole, split_order, min_len)
            if axis is None:
                break
            tile[axis] = -(-out[axis] // (-(-out[axis] // tile[axis]) * 2))  # even pieces
    return tile, nb


def _forced_shape(job, chunk_shape):
    """(tile shape, notes) of ``--chunk-shape``: clipped to the output, and widened
    along W when the activation needs whole rows along W."""
    out = job.out_spatial
    whole = job.whole_axis
    tile = [min(c, n) for c, n in zip(_chunk_shape(chunk_shape), out)]
    notes = []
    if whole is not None and tile[whole] < out[whole]:
        # The activation needs whole rows along W: widen the tile rather
        # than refuse the run.
        notes.append(
            f"chunk_shape W widened from {tile[whole]} to the whole axis ({out[whole]}): "
            f"the '{job.activation.name}' activation acts along W under channels_first")
        tile[whole] = out[whole]
    return tile, notes


def _recorded_tiles(job, tiles):
    """``tiles`` as Tiles, checked: inside the output, whole along an axis the
    activation needs whole, and covering every output voxel exactly once."""
    try:
        tiles = tuple(t if isinstance(t, Tile) else
                      Tile(int(t[0]), int(t[1]), tuple((int(a), int(b)) for a, b in t[2]))
                      for t in tiles)
    except (TypeError, ValueError, IndexError):
        tiles = None
    bounds = (job.batch,) + tuple(job.out_spatial)
    if tiles is None or not all(_inside(t, bounds) for t in tiles):
        raise ArgumentError("Invalid `tiles`: expected (b0, b1, ((d0, d1), (h0, h1), "
                            f"(w0, w1))) boxes inside the output {bounds}.")
    whole = job.whole_axis
    if whole is not None and any(t.out[whole] != (0, bounds[1 + whole]) for t in tiles):
        raise ArgumentError(f"Invalid `tiles`: the '{job.activation.name}' activation "
                            "needs every tile to span W whole.")
    if not _cover_once(tiles, bounds):
        raise ArgumentError(f"Invalid `tiles`: they do not cover the output {bounds} "
                            "exactly once.")
    return tiles


def _inside(tile, bounds):
    ranges = ((tile.b0, tile.b1),) + tuple(tile.out)
    return len(ranges) == 4 and all(0 <= a < b <= n for (a, b), n in zip(ranges, bounds))


def _cover_once(tiles, bounds):
    """Whether the boxes (each inside ``bounds``) cover it exactly once: counted on
    the grid of cells that every box's edges cut the output into."""
    if math.prod(bounds) == 0:
        return not tiles
    boxes = [((t.b0, t.b1),) + tuple(t.out) for t in tiles]
    cuts = [sorted({0, n} | {e for box in boxes for e in box[a]}) for a, n in enumerate(bounds)]
    if math.prod(len(c) - 1 for c in cuts) > 4 * MAX_TILES:
        return False
    cell = [{edge: i for i, edge in enumerate(c)} for c in cuts]
    hits = np.zeros([len(c) - 1 for c in cuts], np.int32)
    for box in boxes:
        hits[tuple(slice(at[a], at[b]) for at, (a, b) in zip(cell, box))] += 1
    return bool((hits == 1).all())


def _baseline(job, workers, processes):
    """Bytes besides the tiles: this process now, what the worker processes add
    (``WORKER_PRIVATE`` each when they are forked, from this process or from a
    forkserver; a process of their own when spawned), and each computing
    process's copy of the kernel as per-tap matrices (``Job.taps``, made where
    tiles are computed: once here, or once per worker)."""
    taps = math.prod(job.kernel.shape) * job.work_dtype.itemsize if job.kernel is not None else 0
    forked = workers if processes and workers > 1 else 0
    if not forked:
        return process_baseline() + taps
    from .workers import start_method
    own = {"fork": forked * WORKER_PRIVATE,
           "forkserver": MIN_PROCESS_BYTES + forked * WORKER_PRIVATE,
           "spawn": forked * MIN_PROCESS_BYTES}[start_method()]
    return process_baseline() + own + forked * taps


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


def _workers_that_fit(job, per, limit, workers, processes, what, refusal):
    """(tiles computed at once, notes) for forced tiles (``what``) of ``per`` bytes
    each: as many as fit ``limit``; ``refusal(per, need, limit)`` is the
    error's text when not even one does."""
    for n in range(workers, 0, -1):
        if _baseline(job, n, processes) + n * per <= limit:
            if n == workers:
                return workers, []
            return n, [f"{n} of the {workers} workers run at once: each {what} needs about "
                       f"{_mib(per)} and the memory limit is {_mib(limit)}"]
    raise ArgumentError(refusal(per, _baseline(job, 1, processes) + per, limit))


def _forced_refusal(asked, shape):
    def text(per, need, limit):
        return (f"--chunk-shape {','.join(map(str, asked))}: a {'x'.join(map(str, shape))} "
                f"tile needs about {_mib(per)} ({_mib(need)} with the process itself), more "
                f"than `memory_limit` {_mib(limit)}. Give a smaller --chunk-shape or raise "
                "--memory-limit.")
    return text


def _recorded_refusal(shape, nb):
    def text(per, need, limit):
        return (f"the recorded tiling's largest tile ({'x'.join(map(str, shape))} x {nb} "
                f"batch) needs about {_mib(per)} ({_mib(need)} with the process itself), "
                f"more than `memory_limit` {_mib(limit)}. Raise --memory-limit.")
    return text


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
