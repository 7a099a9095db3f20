"""Choose FFT or direct convolution for a job: a documented cost model.

Like SciPy's ``choose_conv_method``, the choice compares operation counts
weighted by constants fitted on this kind of machine (``make bench`` prints
the achieved rates). Per output voxel and batch element:

- direct: every tap costs ``C/G`` copies to build the im2col block plus
  ``C/G * F/G * G`` multiply-adds at GEMM speed; with few channels the
  stencil's rate applies instead;
- FFT: per input-sized FFT block, ``(C + F)`` real FFTs of ``N log2 N`` and a
  complex ``C/G x F/G`` product per frequency (``N / 2`` of them), plus the
  ``C x F / G`` kernel spectra (which also make FFT memory-hungry with many
  channels); strided Conv3D computes all ``s^3`` stride-1 outputs and keeps
  one (FFT loses there).

``--method direct|fft`` forces a path; ``auto`` takes the cheaper estimate.
"""

from __future__ import annotations

import math

from .jit import worth_compiling
from .stencil import stencil_suits
from .winograd import winograd_suits

# Seconds per operation (one core), fitted from the benchmark workloads.
GEMM_MAC = 1 / 40e9        # BLAS sgemm multiply-add
COPY = 1 / 1.5e9           # im2col element copy
STENCIL_MAC = 1 / 3.0e9    # compiled stencil multiply-add
FFT_FLOP = 1 / 1.2e9       # one "N log2 N" unit of a real FFT
CMAC = 1 / 1.0e9           # complex multiply-add in the per-frequency product
SMALL_K_GEMM_MAC = 1 / 20e9  # BLAS with K = C/G around 32 (Winograd's GEMMs)
TRANSFORM_OP = 1 / 2.0e9   # one addition of a Winograd transform

METHODS = ("auto", "direct", "fft", "winograd")


def direct_cost(job) -> float:
    taps = math.prod(g.k for g in job.geoms)
    n_out = job.batch * math.prod(job.out_spatial)
    if job.kind != "conv":
        taps /= math.prod(g.s for g in job.geoms)
    cg, fg = job.in_channels // job.groups, job.filters // job.groups
    if stencil_suits(job):
        return n_out * taps * cg * fg * job.groups * STENCIL_MAC
    return n_out * taps * (cg * job.groups * COPY + cg * fg * job.groups * GEMM_MAC)


def fft_cost(job) -> float:
    # Work as if the output were computed at stride 1 (Conv3D) or per phase
    # (transposed: same total number of outputs), per batch element.
    n = math.prod(
        (g.out - 1) * g.s + g.ke if g.kind == "conv" else g.out + g.k for g in job.geoms)
    cg, fg = job.in_channels // job.groups, job.filters // job.groups
    log_n = math.log2(max(n, 2))
    ffts = job.batch * (job.in_channels + job.filters) * n * log_n * FFT_FLOP
    mix = job.batch * n / 2 * cg * fg * job.groups * CMAC
    # The kernel spectra: C*F/G transforms, once per tile shape.
    spectra = cg * fg * job.groups * n * log_n * FFT_FLOP
    return ffts + mix + spectra


def winograd_cost(job) -> float:
    """F(2,3)^3: 8 multiply-adds per output and channel pair in 64 GEMMs of
    K = C/G, plus about 24 additions per input channel and 14 per filter."""
    if not winograd_suits(job) or not worth_compiling(job):
        return math.inf
    n_out = job.batch * math.prod(job.out_spatial)
    cg, fg = job.in_channels // job.groups, job.filters // job.groups
    return n_out * (8 * cg * fg * job.groups * SMALL_K_GEMM_MAC
                    + (24 * job.in_channels + 14 * job.filters) * TRANSFORM_OP)


def choose_method(job, method="auto") -> str:
    method = (method or "auto").lower()
    if method not in METHODS:
        from ..errors import ArgumentError
        raise ArgumentError(f"Invalid `method`: {method!r}. Expected one of {', '.join(METHODS)}.")
    if method == "winograd" and not winograd_suits(job):
        from ..errors import ArgumentError
        raise ArgumentError(
            "`method` winograd needs 3x3x3 kernels at stride 1 without dilation and at least "
            "8 channels and filters per group; use direct or fft.")
    if method != "auto":
        return method
    costs = {"direct": direct_cost(job), "fft": fft_cost(job), "winograd": winograd_cost(job)}
    return min(costs, key=costs.get)


def exact_fixup_pays(job, method, fraction) -> bool:
    """Whether a tile holding NaN or Inf input is cheaper by ``method`` ("fft" or
    "winograd") plus the direct path over ``fraction`` of its outputs (those an
    Inf reaches; a NaN's are set without computing) than by the direct path
    alone: per output voxel, ``c_method + fraction * c_direct < c_direct`` with
    the costs above."""
    cost = fft_cost(job) if method == "fft" else winograd_cost(job)
    direct = direct_cost(job)
    return cost + fraction * direct < direct
