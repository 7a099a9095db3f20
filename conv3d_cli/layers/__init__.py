"""Keras-compatible layer objects: arguments, config, weights, activations."""

from .conv import BaseConv3D, Conv3D, Conv3DTranspose, from_config, layer_class

__all__ = ["BaseConv3D", "Conv3D", "Conv3DTranspose", "from_config", "layer_class"]
