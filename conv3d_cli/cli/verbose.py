"""``conv3d run -v``: the plan, the method chosen and why, and the time of each phase."""

from __future__ import annotations

from .shape import _seconds, _size

# The phases of a run (conv3d_cli.apply), each with the one timed within it.
PHASES = (("open", "decompress"), ("plan", None), ("compute", None), ("write", "compress"))


def plan_lines(info, method):
    """What the run will do: tiles, tile shape, workers, memory; the method and why."""
    plan = info["plan"]
    threads = plan.get("threads_per_worker", 1)
    return [
        f"plan: {plan['tiles']} tiles of {_shape(plan['tile_shape'])} x "
        f"{plan['batch_per_tile']} batch, {plan['workers']} workers"
        + (f" x {threads} threads" if threads > 1 else ""),
        f"memory: ~{_size(plan['estimated_peak_bytes'])} peak estimated "
        f"(limit {_size(plan['memory_limit'])})",
        f"method: {plan['method']}: {method_reason(plan, method)}",
    ]


def method_reason(plan, method):
    """Why ``plan['method']`` runs: asked for, measured fastest, or estimated fastest."""
    if method not in ("auto", "measure"):
        return "as --method asked"
    if "method_timings" in plan:
        return (f"measured fastest on the largest tile: {_seconds(plan['method_timings'])}"
                + _margin())
    estimates = plan.get("method_estimates", {})
    if len(estimates) <= 1:
        return ("the only candidate for this layer and size (a small job, or a float16/"
                "bfloat16 layer, stays direct)")
    return f"the cost model's estimates for the run: {_seconds(estimates)}" + _margin()


def _margin():
    try:
        from ..engine.choose import TRANSFORM_MARGIN
    except ImportError:
        return ""
    return (f" (fft or winograd must be over {TRANSFORM_MARGIN:.0%} faster than direct "
            "to be chosen)")


def timing_line(report):
    """``timings: open 0.52 s (decompress 0.50 s), plan ..., total 4.9 s``."""
    seconds = report.get("phase_seconds", {})
    parts = []
    for name, inner in PHASES:
        if name in seconds:
            text = f"{name} {seconds[name]:.3g} s"
            if inner in seconds:
                text += f" ({inner} {seconds[inner]:.3g} s)"
            parts.append(text)
    if "total" in seconds:
        parts.append(f"total {seconds['total']:.3g} s")
    return "timings: " + ", ".join(parts)


def _shape(values):
    return "x".join(map(str, values))
