"""Choose the convolution path for a job: a cost model with fitted constants.

Like SciPy's ``choose_conv_method``, ``--method auto`` compares estimated
times built from operation counts weighted by constants fitted on a machine;
``--method measure`` (SciPy's ``measure=True``) times the candidates instead
(:mod:`conv3d_cli.engine.measure`).

**Per tile, per plan.** Each candidate method gets its own plan (FFT tiles are
larger and pay their halo once; the other paths split for the workers), and
the estimate is the plan's wall time: every distinct tile shape is costed
from its own :class:`~conv3d_cli.shapes.AxisTerm` lists (the halo it reads, the
phases of a transposed layer), and the tiles are spread over the plan's
workers (:func:`plan_seconds`).

**A tile's seconds** are a sum ``sum_i c[path][i] * n_i``: counts ``n_i`` of
each path's unit operations (:func:`tile_counts`) times fitted seconds per
operation ``c[path][i]``. The counts mirror what the code computes:

- every path: ``tile`` (one per tile: the Python overhead), ``read`` (input
  elements of the tile's halo block: read, padded, cast, checked), ``out``
  (output elements: the bias, the write), ``unfused`` (the output again, where
  the stencil or FFT cannot write it in one pass: several phases or terms);
- ``stencil`` (direct, ``C/G x F/G <= 16``): per term combination a call of
  the compiled loop (``call``), which fetches one input row per output row,
  D/H tap and channel (``line``) and runs one W-row segment per row, tap,
  channel and filter (``seg``) of ``count_W`` multiply-adds (``mac``;
  ``mac_strided`` when it gathers every s-th input);
- ``gemm`` (direct im2col, Conv3D and stride-1 transposed): ``copy`` (the
  ``rows x taps*C/G`` column block), ``run`` (its contiguous runs), the GEMM's
  ``mac`` (``rows x K x F/G`` per group) and ``stream`` (``rows x K``, the
  left operand streamed once), ``acc`` (the ``rows x F`` result added in);
- ``scatter`` (direct, strided transposed): one GEMM ``(voxels, C) @ (C,
  k^3 F)`` (``mac``) and the compiled col2im of every product that lands in
  the tile (``col2im``);
- ``winograd``: per block of 2x2x2 outputs (2x2x4 with F(4, 3) along W), its
  P = 64 (96) transform points: the input and output transforms (``tin`` per
  channel, ``tout`` per filter, in units of 64 points) and P GEMMs of K = C/G
  (``mac``: P per block and channel pair; ``stream``);
- ``fft``: per term combination (one for Conv3D, which computes every
  stride-1 output over its whole input extent; one per output phase for a
  transposed layer, each transforming the input again): ``call``,
  ``fft`` = ``(C + F) N log2 N`` over the padded FFT size ``N`` and ``fmem``
  = ``(C + F) N``; the spectrum product as one multiply per frequency
  (``mul1``, one channel) or a ``C/G x F/G`` matrix product per frequency
  (``freq`` products, ``cmac`` complex multiply-adds, ``ctr`` elements
  transposed).

The kernel transforms, computed once per tile shape and process, are paths of
their own (:func:`setup_counts`): ``spectra`` (FFT: ``C F / G`` kernels
transformed axis by axis over their nonzero extent) and ``winograd_kernel``
(``G g G^T``: ``pairs`` of channels).

**The pick** is the plan with the fewest estimated seconds, except that FFT
and Winograd must beat the direct path by more than ``TRANSFORM_MARGIN``
(10%): direct summation rounds like Keras's own sums, so near ties stay
direct (:func:`pick`).

**Threads.** A tile's BLAS and FFT operations (``mac``/``stream`` of the
GEMMs, ``fft``/``fmem``) run on ``plan.threads`` threads; their speed-up on
``t`` threads is Amdahl's ``1 / ((1 - p) + p / t)`` with ``p`` fitted per
library. Tiles running at once on several workers slow each other down
(memory bandwidth, the interpreter lock between thread workers): the same law
with one fraction ``p`` for all paths, over the workers busy at once.

**Where the constants come from.** ``cost_model.json`` beside this module
holds them, fitted on this machine by ``tools/fit_cost_model.py``, which
times each path's real kernels on tiles chosen to separate the counts (and
the libraries on 1 and all threads), fits the constants by non-negative
least squares on relative error, writes this file and the measurements it
fitted (``tools/cost_model_data.json``), and prints the constants and the
fit's error. Re-fit after a change to a kernel, or on another machine (a quiet
one: other load makes the speed-ups look smaller than they are)::

    python tools/fit_cost_model.py          # about 2 minutes; rewrites both files
    python tools/fit_cost_model.py --refit tools/cost_model_data.json
                                            # after a change to the counts only:
                                            # refits the stored timings, no timing

``CONV3D_COST_MODEL=/path/model.json`` (a file the script wrote with
``--output``) makes this module read another fit.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from functools import lru_cache
from itertools import product
from pathlib import Path

from ..errors import ArgumentError
from ..shapes import CONV
from .fftsize import next_fast_len
from .jit import worth_compiling
from .stencil import stencil_suits
from .winograd import axis_steps, winograd_suits

METHODS = ("auto", "measure", "direct", "fft", "winograd")
MODEL_FILE = Path(__file__).with_name("cost_model.json")
# Which counts run on the tile's BLAS or FFT threads (the FFT path's stages
# share the transforms, the spectrum product and the output among its threads).
THREADED = {("gemm", "mac"): "blas", ("gemm", "stream"): "blas",
            ("scatter", "mac"): "blas", ("winograd", "mac"): "blas",
            ("winograd", "stream"): "blas", ("fft", "fft"): "fft", ("fft", "fmem"): "fft",
            ("fft", "mul1"): "fft", ("fft", "freq"): "fft", ("fft", "cmac"): "fft",
            ("fft", "ctr"): "fft", ("fft", "out"): "fft", ("spectra", "spectra"): "fft"}
# Plans with more tiles than this are spread evenly instead of tile by tile.
SCHEDULE_TILES = 4096


class CostModel:
    """Fitted seconds per operation (``constants[path][count]``) and the
    parallel fractions (``threads[library]``, and ``workers`` of tiles side by
    side)."""

    def __init__(self, constants, threads, workers, info=None):
        self.constants = constants
        self.threads = threads
        self.workers = workers
        self.info = info or {}

    @classmethod
    def from_dict(cls, d):
        return cls(d["constants"], d["threads"], d["workers"], d.get("fitted"))

    def seconds(self, path, counts, threads=1):
        c = self.constants[path]
        total = 0.0
        for name, n in counts.items():
            library = THREADED.get((path, name))
            speed = amdahl(self.threads[library], threads) if library else 1.0
            total += c.get(name, 0.0) * n / speed
        return total


def amdahl(p, n):
    """Speed-up on ``n`` threads (or workers) of work whose fraction ``p`` runs in parallel."""
    return 1.0 / ((1.0 - p) + p / max(n, 1))


@lru_cache(maxsize=None)
def _load(path):
    with open(path) as fh:
        return CostModel.from_dict(json.load(fh))


def load_model(path=None) -> CostModel:
    """The fitted model: ``path``, else ``$CONV3D_COST_MODEL``, else ``cost_model.json``."""
    path = path or os.environ.get("CONV3D_COST_MODEL") or MODEL_FILE
    try:
        return _load(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise ArgumentError(f"cost model {path}: cannot be read ({exc}); re-fit it with "
                            "tools/fit_cost_model.py or unset CONV3D_COST_MODEL") from None


# ----------------------------------------------------------------- the counts
def direct_path(job) -> str:
    """Which direct formulation computes ``job`` (as ``task._direct`` decides)."""
    if stencil_suits(job):
        return "stencil"
    if job.kind != CONV and any(g.s > 1 for g in job.geoms):
        return "scatter"
    return "gemm"


def path_of(job, method) -> str:
    return direct_path(job) if method == "direct" else method


def tile_axes(job, out):
    """Per axis ``(i0, i1, terms)`` of a tile's output box ``out``."""
    return [g.terms(o0, o1) for g, (o0, o1) in zip(job.geoms, out)]


def tile_counts(job, path, tile, axes=None):
    """Unit-operation counts of computing ``tile`` by ``path`` (see the module
    docstring); ``axes`` are its :func:`tile_axes` if known."""
    axes = axes or tile_axes(job, tile.out)
    nb = tile.b1 - tile.b0
    counts = Counter(tile=1.0, out=nb * math.prod(tile.shape) * job.filters)
    if not all(terms for _, _, terms in axes):
        return counts  # no input reaches the tile: the bias alone
    counts["read"] = nb * math.prod(i1 - i0 for i0, i1, _ in axes) * job.in_channels
    _PATH_COUNTS[path](job, nb, [terms for _, _, terms in axes], counts, tile.shape)
    return counts


def _groups(job):
    return job.groups, job.in_channels // job.groups, job.filters // job.groups


def _covers(terms, shape):
    """Whether one term per axis writes every output of the tile once (as
    ``task._covers``): the stencil and FFT paths then skip a pass over it."""
    return all(len(t) == 1 and t[0].out_step == 1 and t[0].count == n
               for t, n in zip(terms, shape))


def _stencil_counts(job, nb, terms, counts, shape):
    g, cg, fg = _groups(job)
    for t0, t1, t2 in product(*terms):
        lines = nb * t0.count * t1.count * len(t0.taps) * len(t1.taps) * g * cg
        segs = lines * len(t2.taps) * fg
        counts["call"] += 1
        counts["line"] += lines
        counts["seg"] += segs
        counts["mac" if t2.in_step == 1 else "mac_strided"] += segs * t2.count
    if not _covers(terms, shape):
        counts["unfused"] += counts["out"]


def _gemm_counts(job, nb, terms, counts, shape):
    g, cg, fg = _groups(job)
    for t0, t1, t2 in product(*terms):
        rows = nb * t0.count * t1.count * t2.count
        taps01 = len(t0.taps) * len(t1.taps)
        k = taps01 * len(t2.taps) * cg
        counts["copy"] += rows * k * g
        counts["run"] += rows * taps01 * (1 if g == 1 else g * len(t2.taps))
        counts["mac"] += g * rows * k * fg
        counts["stream"] += g * rows * k
        counts["acc"] += rows * g * fg


def _scatter_counts(job, nb, terms, counts, shape):
    taps = math.prod(g.k for g in job.geoms)
    counts["mac"] += counts["read"] * taps * job.filters
    # Products that land in the tile: each output of a phase gets one per tap of it.
    counts["col2im"] += nb * job.filters * math.prod(
        sum(t.count * len(t.taps) for t in axis) for axis in terms)


def _winograd_counts(job, nb, terms, counts, shape):
    g, cg, fg = _groups(job)
    for combo in product(*terms):
        steps = axis_steps([t.count for t in combo])
        blocks = nb * math.prod(-(-t.count // m) for t, m in zip(combo, steps))
        points = math.prod(m + 2 for m in steps)  # 64, or 96 with F(4, 3) along W
        counts["tin"] += blocks * job.in_channels * points / 64
        counts["tout"] += blocks * job.filters * points / 64
        counts["mac"] += points * blocks * g * cg * fg
        counts["stream"] += points * blocks * job.in_channels


def fft_shape(combo):
    """(span per axis, FFT shape) of one term combination (as ``fft.correlate_fft``)."""
    spans, fshape = [], []
    for t in combo:
        offs = [o for _, o in t.taps]
        span = max(offs) - min(offs) + 1
        spans.append(span)
        fshape.append(next_fast_len((t.count - 1) * t.in_step + span))
    return tuple(spans), tuple(fshape)


def _fft_counts(job, nb, terms, counts, shape):
    g, cg, fg = _groups(job)
    if not _covers(terms, shape):
        counts["unfused"] += counts["out"]
    for combo in product(*terms):
        _, fshape = fft_shape(combo)
        n = math.prod(fshape)
        freqs = fshape[0] * fshape[1] * (fshape[2] // 2 + 1)
        counts["call"] += 1
        counts["fft"] += nb * (job.in_channels + job.filters) * n * math.log2(max(n, 2))
        counts["fmem"] += nb * (job.in_channels + job.filters) * n
        if g == cg == fg == 1:
            counts["mul1"] += nb * freqs
        else:
            counts["freq"] += freqs * g
            counts["cmac"] += freqs * g * nb * cg * fg
            counts["ctr"] += freqs * nb * (job.in_channels + job.filters)


_PATH_COUNTS = {"stencil": _stencil_counts, "gemm": _gemm_counts,
                "scatter": _scatter_counts, "winograd": _winograd_counts, "fft": _fft_counts}


# The kernel transforms a path computes once per tile shape and process (cached
# for the job), costed as a path of their own.
SETUP = {"fft": "spectra", "winograd": "winograd_kernel"}


def setup_counts(job, path, axes):
    """Counts of the kernel transforms of ``path`` for a tile whose terms are
    ``axes``: FFT kernel spectra (``fft.SpectrumCache``: ``C F / G`` kernels
    transformed along W, H, then D, each over the extent still nonzero), or
    Winograd's ``G g G^T`` (``winograd.kernel_transform``: one per channel pair)."""
    g, cg, fg = _groups(job)
    if path == "winograd":
        return Counter(tile=1.0, pairs=g * cg * fg)
    counts = Counter(tile=1.0)
    n = 0.0
    for combo in product(*[terms for _, _, terms in axes]):
        counts["call"] += 1
        (s0, s1, _), (f0, f1, f2) = fft_shape(combo)
        f2c = f2 // 2 + 1
        n += (s0 * s1 * f2 * math.log2(max(f2, 2)) + s0 * f1 * f2c * math.log2(max(f1, 2))
              + f0 * f1 * f2c * math.log2(max(f0, 2)))
    counts["spectra"] = n * g * cg * fg
    return counts


# --------------------------------------------------------------- the estimates
def _shape_key(job, tile):
    """Tiles with equal keys have equal counts: the batch count, and per axis the
    length and (transposed) the output phase of the first voxel."""
    return (tile.b1 - tile.b0,) + tuple(
        (o1 - o0, (o0 + g.offset) % g.s if g.kind != CONV else 0)
        for g, (o0, o1) in zip(job.geoms, tile.out))


def uses_threads(path, counts) -> bool:
    """Whether a tile of these counts runs on the plan's threads: FFT tiles of
    fewer than ``fft.MIN_THREADED_VALUES`` transformed values run on one."""
    from .fft import MIN_THREADED_VALUES
    return path != "fft" or counts.get("fmem", 0) >= MIN_THREADED_VALUES


def tile_seconds(job, method, tile, threads=1, model=None, cold=False):
    """Estimated seconds of one tile (``cold``: with its kernel transforms)."""
    model = model or load_model()
    axes = tile_axes(job, tile.out)
    path = path_of(job, method)
    counts = tile_counts(job, path, tile, axes)
    seconds = model.seconds(path, counts, threads if uses_threads(path, counts) else 1)
    if cold and path in SETUP and all(t for _, _, t in axes):
        seconds += model.seconds(SETUP[path], setup_counts(job, path, axes), threads)
    return seconds


def plan_seconds(job, plan, model=None) -> float:
    """Estimated wall time of computing ``plan``'s tiles with its workers and threads."""
    if not plan.tiles:
        return 0.0
    model = model or load_model()
    first = {}
    sizes = Counter()
    for tile in plan.tiles:
        key = _shape_key(job, tile)
        first.setdefault(key, tile)
        sizes[key] += 1
    costs = {key: tile_seconds(job, plan.method, t, plan.threads, model)
             for key, t in first.items()}
    busy = max(1, min(plan.workers, len(plan.tiles)))
    path = path_of(job, plan.method)
    # Each of `busy` workers runs slower by busy / amdahl(p, busy) while the others run.
    crowd = busy / amdahl(model.workers, busy)
    total = _makespan(costs, sizes, busy) * crowd
    if path in SETUP:  # each process transforms the kernel once per tile shape
        total += sum(tile_seconds(job, plan.method, t, plan.threads, model, cold=True)
                     - costs[key] for key, t in first.items())
    return total


def _makespan(costs, sizes, workers):
    """Longest worker's time when tiles go to the least-busy worker, longest first."""
    n = sum(sizes.values())
    if workers == 1 or n > SCHEDULE_TILES:
        return max(sum(costs[k] * sizes[k] for k in costs) / workers, max(costs.values()))
    loads = [0.0] * workers
    for key in sorted(costs, key=costs.get, reverse=True):
        for _ in range(sizes[key]):
            i = loads.index(min(loads))
            loads[i] += costs[key]
    return max(loads)


# ------------------------------------------------------------------ the choice
# Direct summation rounds like Keras's own sums (float32 products added tap by
# tap); FFT and Winograd round differently (an FFT spreads its rounding over
# the whole tile). A transform is picked only when it is estimated faster than
# the direct path by more than this fraction, so near ties stay direct (and
# a pick within it is still within 10% of the fastest).
TRANSFORM_MARGIN = 0.1


def pick(seconds) -> str:
    """The method to run, from estimated (or measured) seconds per method."""
    return min(seconds, key=lambda m: seconds[m] * (1 if m == "direct" else 1 + TRANSFORM_MARGIN))


def candidates(job) -> list:
    """The methods ``auto`` and ``measure`` choose from for ``job``.

    A float16 or bfloat16 layer's sums are rounded to a few bits: direct
    summation gives Keras's rounded values to the ulp, while the 1e-6 to 1e-5
    error of an FFT or Winograd sum would move some of them by one ulp, so such
    layers stay direct unless a method is forced. So do jobs too small to pay
    for loading a transform's library."""
    if job.rounds_result:
        return ["direct"]
    # Loading numba (Winograd) or SciPy's FFT costs more than a job of a few
    # milliseconds could gain from them (see ``jit.MIN_COMPILED_FLOPS``).
    if not worth_compiling(job):
        return ["direct"]
    return ["direct", "fft"] + (["winograd"] if winograd_suits(job) else [])


def check_method(job, method) -> str:
    method = (method or "auto").lower()
    if method not in METHODS:
        raise ArgumentError(f"Invalid `method`: {method!r}. Expected one of {', '.join(METHODS)}.")
    if method == "winograd" and not winograd_suits(job):
        raise ArgumentError(
            "`method` winograd needs 3x3x3 kernels at stride 1 without dilation and at least "
            "8 channels and filters per group; use direct or fft.")
    return method


def choose_method(job, method="auto", plan_for=None) -> str:
    """The method ``method`` names; for ``"auto"`` the one whose plan the model
    estimates fastest, for ``"measure"`` the one whose plan measures fastest.
    ``plan_for(method)`` makes a candidate's plan (default: the whole output as
    one tile on one worker; :func:`conv3d_cli.engine.plan_job` passes the
    planner's)."""
    method = check_method(job, method)
    if method not in ("auto", "measure"):
        return method
    plans = {m: (plan_for or _whole_plan(job))(m) for m in candidates(job)}
    if method == "measure":
        from .measure import measure_plans
        _, estimates = measure_plans(job, plans)
    else:
        estimates = estimate_plans(job, plans)
    return pick(estimates)


def estimate_plans(job, plans, model=None) -> dict:
    """Estimated seconds of each candidate plan (``{method: plan}``)."""
    return {m: plan_seconds(job, p, model) for m, p in plans.items()}


def _whole_plan(job):
    from .plan import Plan, Tile

    def plan_for(method):
        box = tuple((0, n) for n in job.out_spatial)
        return Plan(method=method, tile_shape=job.out_spatial, batch_per_tile=job.batch,
                    tiles=[Tile(0, job.batch, box)], tile_bytes=0, workers=1,
                    memory_limit=0)
    return plan_for


def exact_fixup_pays(job, method, fraction, shape=None) -> bool:
    """Whether a tile (of ``shape``; default the whole output) holding NaN or Inf
    input is cheaper by ``method`` ("fft" or "winograd") plus the direct path
    over ``fraction`` of its outputs (those an Inf reaches; a NaN's are set
    without computing) than by the direct path alone: ``t_method + fraction *
    t_direct < t_direct`` with the estimates above."""
    from .plan import Tile
    tile = Tile(0, 1, tuple((0, n) for n in (shape or job.out_spatial)))
    cost = tile_seconds(job, method, tile)
    direct = tile_seconds(job, "direct", tile)
    return cost + fraction * direct < direct
