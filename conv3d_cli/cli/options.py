"""Reusable click options and their parsing callbacks (as rasterio's ``rio/options.py``)."""

from __future__ import annotations

import click

from ..engine.plan import parse_memory
from ..errors import ArgumentError


def int_or_tuple(ctx, param, value):
    """``3`` -> 3, ``3,3,3`` -> (3, 3, 3); Keras then checks the length and signs."""
    if value is None:
        return None
    parts = [p.strip() for p in str(value).split(",")]
    try:
        ints = [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(
            f"expected an integer or comma-separated integers (e.g. 3 or 3,3,3), got {value!r}",
            ctx=ctx, param=param) from None
    return ints[0] if len(ints) == 1 else tuple(ints)


def shape_tuple(ctx, param, value):
    if value is None:
        return None
    result = int_or_tuple(ctx, param, value)
    result = (result,) if isinstance(result, int) else result
    if any(n <= 0 for n in result):
        raise click.BadParameter(f"sizes must be positive, got {value!r}", ctx=ctx, param=param)
    return result


def memory_size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_memory(value)
    except ArgumentError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


# Every Keras argument of the two layers, in kebab-case, mapped to its keyword.
LAYER_OPTIONS = [
    click.option("--layer", "layer", default=None, metavar="Conv3D|Conv3DTranspose",
                 help="Layer class (case-insensitive). Default: Conv3D, or the config's."),
    click.option("--filters", type=int, default=None, help="Number of output filters."),
    click.option("--kernel-size", callback=int_or_tuple, default=None, metavar="K|KD,KH,KW",
                 help="Kernel size: 3 or 3,3,3."),
    click.option("--strides", callback=int_or_tuple, default=None, metavar="S|SD,SH,SW"),
    click.option("--padding", default=None, metavar="valid|same"),
    click.option("--output-padding", callback=int_or_tuple, default=None, metavar="P|PD,PH,PW",
                 help="Conv3DTranspose only; each value < the stride."),
    click.option("--data-format", default=None, metavar="channels_last|channels_first",
                 help="Default: image_data_format from keras.json, else channels_last."),
    click.option("--dilation-rate", callback=int_or_tuple, default=None, metavar="D|DD,DH,DW"),
    click.option("--groups", type=int, default=None, help="Conv3D only."),
    click.option("--activation", default=None,
                 help="A Keras activation name, or NAME:{json arguments}."),
    click.option("--use-bias/--no-use-bias", default=None),
    click.option("--kernel-initializer", default=None,
                 help="NAME, NAME:{json}, or a Keras-serialized JSON object."),
    click.option("--bias-initializer", default=None),
    click.option("--kernel-regularizer", default=None,
                 help='e.g. l2, l1_l2:{"l1": 0.1, "l2": 0.2}'),
    click.option("--bias-regularizer", default=None),
    click.option("--activity-regularizer", default=None),
    click.option("--kernel-constraint", default=None),
    click.option("--bias-constraint", default=None),
    click.option("--name", default=None),
    click.option("--dtype", default=None, metavar="POLICY",
                 help="Keras dtype policy: float32 (default: keras.json floatx), float64, "
                      "float16, bfloat16, mixed_float16 or mixed_bfloat16 (float32 weights, "
                      "float16/bfloat16 computation and result)."),
    click.option("--seed", type=int, default=None,
                 help="Seed for random initializers that have none."),
    click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
                 help="A Keras layer config (JSON); options given here override it."),
    click.option("--weights", type=click.Path(dir_okay=False), default=None,
                 help=".npz with kernel (and bias) in Keras layout, .npy (kernel), or a Keras "
                      "model/weights file (.keras, .weights.h5, .h5) giving config and weights."),
    click.option("--layer-name", default=None, metavar="NAME",
                 help="Which Conv3D/Conv3DTranspose of a model file (e.g. encoder/conv3d_2)."),
    click.option("--apply-constraints", is_flag=True, default=False,
                 help="Project loaded weights with the kernel/bias constraints first."),
]

ENGINE_OPTIONS = [
    click.option("--method", type=click.Choice(["auto", "measure", "direct", "fft", "winograd"],
                                               case_sensitive=False),
                 default="auto", show_default=True,
                 help="Convolution algorithm: auto (the cost model's pick), measure (time "
                      "each suitable one on a tile, then run the fastest), or one of them."),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                 help="Worker processes. Default: the cores this process may use."),
    click.option("--memory-limit", callback=memory_size, default=None, metavar="SIZE",
                 help="Peak memory to stay under, e.g. 512M, 4G. Default: half the available RAM."),
    click.option("--chunk-shape", callback=shape_tuple, default=None, metavar="D,H,W",
                 help="Force the output tile shape."),
]

KERAS_KEYS = ["filters", "kernel_size", "strides", "padding", "output_padding",
              "data_format", "dilation_rate", "groups", "activation", "use_bias",
              "kernel_initializer", "bias_initializer", "kernel_regularizer",
              "bias_regularizer", "activity_regularizer", "kernel_constraint",
              "bias_constraint", "name", "dtype"]


def apply_options(options):
    def decorator(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorator


layer_options = apply_options(LAYER_OPTIONS)
engine_options = apply_options(ENGINE_OPTIONS)


def layer_from_kwargs(kwargs):
    """Build the layer from the parsed options (pops them from ``kwargs``)."""
    from ..api import build_layer
    overrides = {k: kwargs.pop(k) for k in KERAS_KEYS}
    return build_layer(layer=kwargs.pop("layer"), config=kwargs.pop("config"),
                       overrides=overrides, weights=kwargs.pop("weights"),
                       seed=kwargs.pop("seed"),
                       apply_constraints=kwargs.pop("apply_constraints"),
                       layer_name=kwargs.pop("layer_name"))

