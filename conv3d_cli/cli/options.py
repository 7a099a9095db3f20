"""Reusable click options and their parsing callbacks (as rasterio's ``rio/options.py``)."""

from __future__ import annotations

import click

from ..errors import ArgumentError

# The CLI group and every command import this module: it imports nothing but
# click (the engine, layers and I/O load inside the callbacks and commands).

# --output-dtype values: conv3d_cli.io.dtypes.OUTPUT_DTYPES (tests/test_startup.py
# pins them equal), written out so that defining the option imports no I/O code.
OUTPUT_DTYPES = ("compute", "input", "float16", "float32", "float64")


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


def chunk_shape(ctx, param, value):
    """``64`` -> (64, 64, 64), ``32,64,64`` -> (32, 64, 64): one size per spatial axis."""
    result = shape_tuple(ctx, param, value)
    if result is None:
        return None
    if len(result) == 1:
        return result * 3
    if len(result) != 3:
        raise click.BadParameter(f"expected 3 sizes D,H,W (or one for all three), got {value!r}",
                                 ctx=ctx, param=param)
    return result


def memory_size(ctx, param, value):
    if value is None:
        return None
    from ..engine.plan import parse_memory
    try:
        return parse_memory(value)
    except ArgumentError as exc:
        raise click.BadParameter(str(exc).replace("Invalid `memory_limit`: ", ""),
                                 ctx=ctx, param=param) from None


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
    click.option("--seed", type=click.IntRange(min=0), default=None,
                 help="Seed (>= 0) for random initializers that have none."),
    click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
                 help="A Keras layer config (JSON); options given here override it."),
    click.option("--weights", type=click.Path(dir_okay=False), default=None,
                 help=".npz with kernel (and bias) in Keras layout, .npy (kernel), or a Keras "
                      "model/weights file (.keras, .weights.h5, .h5) giving config and weights. "
                      "A 3-D .npy or NIfTI kernel image is one filter, applied as stored."),
    click.option("--kernel", "kernel", default=None, metavar="NAME[:ARGS]",
                 help="A named kernel as the weights, each input channel filtered on its "
                      "own: gauss:sigma=2mm (or 2vox, 0.5um; truncate=4), box:3 / box:6mm, "
                      "mean:5, sphere:4mm, sobel (3 filters: d/d each spatial axis, NIfTI "
                      "X, Y, Z), laplace; as scipy.ndimage's with mode=constant. Sets "
                      "filters, kernel_size, groups and use_bias=False; --padding defaults "
                      "to same. Lengths in mm use INPUT's voxel size."),
    click.option("--voxel-size", default=None, metavar="D,H,W[mm|um]",
                 help="Voxel size for --kernel lengths in mm/um (default: INPUT's NIfTI "
                      "or OME-Zarr geometry), e.g. 1,0.8,2.5 or 0.2,0.1,0.1um."),
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
    click.option("--chunk-shape", callback=chunk_shape, default=None, metavar="D,H,W",
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


def layer_from_kwargs(kwargs, input=None, input_shape=None, input_channels=None,
                      memory_limit=None):
    """Build the layer from the parsed options (pops them from ``kwargs``).

    INPUT (its header), ``--input-shape`` or ``--input-channels`` give a
    ``--kernel`` its voxel size and input channels; weights files (and named
    kernels) declaring more than ``memory_limit`` bytes are refused unread."""
    from ..build import build_layer
    overrides = {k: kwargs.pop(k) for k in KERAS_KEYS}
    kernel, voxel_size = kwargs.pop("kernel"), kwargs.pop("voxel_size")
    context = {}
    if kernel is not None:
        from ..kernels import input_context
        context = input_context(input, input_shape, input_channels, voxel_size)
    elif voxel_size is not None:
        raise ArgumentError("--voxel-size is for --kernel lengths in mm or um; give --kernel")
    return build_layer(layer=kwargs.pop("layer"), config=kwargs.pop("config"),
                       overrides=overrides, weights=kwargs.pop("weights"),
                       seed=kwargs.pop("seed"),
                       apply_constraints=kwargs.pop("apply_constraints"),
                       layer_name=kwargs.pop("layer_name"), kernel=kernel,
                       memory_limit=memory_limit, **context)

