"""``conv3d layers``: the Conv3D / Conv3DTranspose layers of a Keras model file."""

from __future__ import annotations

import json
import math

import click


@click.command(short_help="List the convolution layers of a Keras model file.")
@click.argument("model", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
def layers(model, as_json):
    """List MODEL's Conv3D and Conv3DTranspose layers (.keras, .weights.h5 or legacy
    .h5, from Keras 3 or tf.keras 2): name, class, kernel shape, strides, padding,
    dilation, activation, params, dtype policy. Use a name with conv3d run --layer-name.

    \b
    Example:
      conv3d layers unet.keras
    """
    from ..io.keras_files import ModelFile
    rows = []
    with ModelFile(model) as mf:
        for entry in mf.layers:
            w = entry.weight_shapes()  # headers only: no weights are read
            cfg = entry.config or {}
            rows.append({
                "name": entry.name, "class_name": entry.class_name,
                "kernel_shape": list(w["kernel"]),
                "strides": cfg.get("strides"), "padding": cfg.get("padding"),
                "dilation_rate": cfg.get("dilation_rate"),
                "activation": _act(cfg.get("activation")),
                "params": math.prod(w["kernel"]) + (math.prod(w["bias"])
                                                    if w["bias"] is not None else 0),
                "dtype": _policy(cfg.get("dtype")),
                "keras_version": 2 if entry.keras2 else 3,
            })
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo(f"{model}: no Conv3D or Conv3DTranspose layers")
        return
    head = ["name", "class_name", "kernel_shape", "strides", "padding", "dilation_rate",
            "activation", "params", "dtype"]
    table = [[str(_fmt(r[h])) for h in head] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for t in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def _act(value):
    if isinstance(value, dict):
        return value.get("class_name")
    return value


def _policy(value):
    """The dtype policy's name as the config writes it (Keras 3 / tf.keras 2 dict or string)."""
    if isinstance(value, dict):
        cfg = value.get("config") or {}
        if "mode" in cfg:  # a quantized policy
            return f"{cfg['mode']}_from_{cfg.get('source_name')}"
        return cfg.get("name") or value.get("class_name")
    return value


def _fmt(value):
    if isinstance(value, list):
        return "x".join(map(str, value))
    return "-" if value is None else value
