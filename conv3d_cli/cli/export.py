"""``conv3d export``: the layer the tool built, as a one-layer Keras model."""

from __future__ import annotations

import os

import click

from ..errors import ArgumentError
from .options import layer_from_kwargs, layer_options


@click.command(short_help="Write the layer as a one-layer Keras model (.keras).")
@click.argument("output", metavar="OUTPUT.keras")
@layer_options
@click.option("--input-channels", type=click.IntRange(min=1), default=None,
              help="Input channels, when no --weights give them.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def export(output, input_channels, overwrite, **kwargs):
    """Write the layer built from the options (or --config / --weights, or fresh from
    its initializers with --seed) as OUTPUT.keras, a Keras 3 model that
    keras.models.load_model opens and that computes the same numbers.

    \b
    Example:
      conv3d export edge.keras --weights sobel3.npz --padding same
      conv3d export down.keras --filters 8 --kernel-size 3 --strides 2 --input-channels 1 --seed 0
    """
    from ..build import check_kernel_fits
    from ..io.keras_export import export_keras
    if os.path.exists(output) and not overwrite:
        raise ArgumentError(f"OUTPUT {output} exists; pass --overwrite to replace it")
    layer = layer_from_kwargs(kwargs, input_channels=input_channels)
    if not layer.built:
        if input_channels is None:
            raise ArgumentError("give --input-channels (or --weights) so the kernel can be built")
        shape = ((None, None, None, None, input_channels) if layer.data_format == "channels_last"
                 else (None, input_channels, None, None, None))
        check_kernel_fits(layer, input_channels)
        layer.build(shape)
    elif input_channels is not None and input_channels != layer.input_channels:
        raise ArgumentError(f"--input-channels {input_channels} does not match the weights "
                            f"({layer.input_channels} input channels)")
    export_keras(layer, output, layer.input_channels, overwrite=overwrite)
    click.echo(f"wrote {output} ({layer.keras_name} {layer.name}, {layer.count_params()} params)",
               err=True)
