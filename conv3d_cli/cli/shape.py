"""``conv3d shape``: output shape, parameters, padding and plan, without computing."""

from __future__ import annotations

import json

import click

from ..errors import ArgumentError
from .options import engine_options, layer_from_kwargs, layer_options, shape_tuple


@click.command(short_help="Print the output shape, parameter count and plan.")
@click.argument("input", metavar="[INPUT]", required=False)
@click.option("--input-shape", callback=shape_tuple, default=None, metavar="B,D,H,W,C",
              help="Keras input shape (rank >= 5) instead of a file.")
@layer_options
@engine_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def shape(input, input_shape, as_json, **kwargs):
    """Show what the layer would produce from INPUT (only its header is read) or
    from --input-shape. With --method measure, each suitable method is timed
    on its plan's largest tile of zeros (nothing is read).

    \b
    Example:
      conv3d shape --input-shape 4,28,28,28,1 --filters 8 --kernel-size 3 --strides 2
    """
    from ..api import describe
    if (input is None) == (input_shape is None):
        raise ArgumentError("give either INPUT or --input-shape (not both)")
    method, workers = kwargs.pop("method"), kwargs.pop("workers")
    memory_limit, chunk_shape = kwargs.pop("memory_limit"), kwargs.pop("chunk_shape")
    layer = layer_from_kwargs(kwargs, input=input, input_shape=input_shape,
                              memory_limit=memory_limit)
    vol = None
    if input is not None:
        from ..io import open_volume
        vol = open_volume(input, header_only=True)
    try:
        info, _, _ = describe(layer, input_shape=input_shape, volume=vol, method=method.lower(),
                              workers=workers, memory_limit=memory_limit,
                              chunk_shape=chunk_shape)
    finally:
        if vol is not None:
            vol.close()
    if as_json:
        click.echo(json.dumps(info))
        return
    plan = info["plan"]
    lines = [
        f"layer          {info['layer']}",
        f"input shape    {tuple(info['input_shape'])}",
        f"output shape   {tuple(info['output_shape'])}",
    ]
    if "file_output_shape" in info:
        lines.append(f"file shapes    {tuple(info['file_input_shape'])} -> "
                     f"{tuple(info['file_output_shape'])}")
    lines.append(f"params         {info['params']}")
    for ax in info["padding"]:
        if "pad_before" in ax:
            lines.append(f"padding {ax['axis']}      {ax['pad_before']} before, "
                         f"{ax['pad_after']} after")
        else:
            lines.append(f"crop {ax['axis']}         {ax['crop_before']} before, "
                         f"{ax['crop_after']} after")
    lines += [f"method         {plan['method']}"]
    if "method_timings" in plan:
        lines.append(f"measured       {_seconds(plan['method_timings'])} "
                     "(the largest tile, zeros)")
    if "method_estimates" in plan:
        lines.append(f"estimated      {_seconds(plan['method_estimates'])} (the whole run)")
    lines += [
        f"tiles          {plan['tiles']} of {tuple(plan['tile_shape'])} "
        f"x {plan['batch_per_tile']} batch, {plan['workers']} workers",
        f"peak memory    ~{_size(plan['estimated_peak_bytes'])} "
        f"(limit {_size(plan['memory_limit'])})",
        f"work           {plan['flops'] / 1e9:.3g} GFLOP",
    ]
    lines += [f"note           {note}" for note in plan.get("notes", [])]
    click.echo("\n".join(lines))


def _seconds(by_method):
    return ", ".join(f"{m} {s:.3g} s" for m, s in by_method.items())


def _size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
