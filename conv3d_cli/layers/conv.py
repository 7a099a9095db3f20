"""Keras-compatible ``Conv3D`` and ``Conv3DTranspose`` objects over NumPy.

Like ``keras/src/layers/convolutional``, the two public classes are thin: the
argument handling, weights, config round trip and call live in
:class:`BaseConv3D`; the shape math is in :mod:`conv3d_cli.shapes` and the
computation in :mod:`conv3d_cli.engine`.
"""

from __future__ import annotations

import numpy as np

from .. import shapes
from ..errors import ArgumentError, ShapeError, WeightsError, brief
from . import activations, constraints, initializers, regularizers
from .args import (
    is_float_dtype,
    numpy_dtype,
    positive_int,
    standardize_data_format,
    standardize_dtype_policy,
    standardize_padding,
    standardize_tuple,
)

# Keys of a Keras layer config that carry no meaning for inference here
# (tf.keras 2's `batch_size` goes with `input_shape`, for a model's input).
_IGNORED_CONFIG_KEYS = {"batch_input_shape", "batch_shape", "input_shape",
                        "input_dim", "autocast", "build_config", "module",
                        "registered_name", "quantization_config", "batch_size"}
_UNSUPPORTED_IF_SET = ("lora_rank", "lora_alpha", "dora_rank", "dora_alpha")

_NAME_COUNTS: dict[str, int] = {}


def _auto_name(prefix: str) -> str:
    n = _NAME_COUNTS.get(prefix, 0)
    _NAME_COUNTS[prefix] = n + 1
    return prefix if n == 0 else f"{prefix}_{n}"


def _check_kwargs(keras_name, kwargs):
    for key in _UNSUPPORTED_IF_SET:
        if kwargs.pop(key, None) is not None:
            raise ArgumentError(f"`{key}` (LoRA/DoRA fine-tuning) is not supported.")
    unknown = set(kwargs) - _IGNORED_CONFIG_KEYS
    if unknown:
        raise ArgumentError(
            f"Unrecognized keyword arguments passed to {keras_name}: "
            f"{brief({k: kwargs[k] for k in sorted(unknown)})}")


def _weight_list(weights):
    try:
        return list(weights)
    except TypeError:
        raise ArgumentError("`weights` must be a list of arrays, [kernel, bias] or [kernel]. "
                            f"Received: weights={brief(weights)}") from None


def _check_rules(layer):
    """The rules between a layer's arguments, in Keras 3's order."""
    groups = layer.groups
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups <= 0:
        raise ArgumentError(
            f"The number of groups must be a positive integer. Received: groups={brief(groups)}.")
    if layer.filters % groups:
        raise ArgumentError(
            "The number of filters must be evenly divisible by the number of "
            f"groups. Received: groups={groups}, filters={layer.filters}.")
    if layer.output_padding is not None:
        for i, (op, s) in enumerate(zip(layer.output_padding, layer.strides)):
            if op >= s:
                raise ArgumentError(
                    "`output_padding` must be strictly less than `strides` for "
                    f"all dimensions. At dimension {i}, `output_padding` is {op} "
                    f"but `strides` is {s}. Received: output_padding="
                    f"{layer.output_padding}, strides={layer.strides}")
    if max(layer.strides) > 1 and max(layer.dilation_rate) > 1:
        raise ArgumentError(
            "`strides > 1` not supported in conjunction with `dilation_rate > 1`. "
            f"Received: strides={layer.strides} and dilation_rate={layer.dilation_rate}")


class BaseConv3D:
    """Shared implementation of the two layers (private)."""

    kind = shapes.CONV
    keras_name = "Conv3D"
    snake_name = "conv3d"

    def __init__(self, filters, kernel_size, strides=1, padding="valid",
                 data_format=None, dilation_rate=1, groups=1, output_padding=None,
                 activation=None, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None,
                 bias_regularizer=None, activity_regularizer=None,
                 kernel_constraint=None, bias_constraint=None, name=None,
                 dtype=None, trainable=True, keras2=False, **kwargs):
        # Keras 3's order of checks, so that the first of several wrong
        # arguments is the one Keras names: Layer.__init__ (keyword arguments,
        # activity regularizer), then BaseConv / BaseConvTranspose normalise each
        # argument in turn, then check the rules between them.
        weights = kwargs.pop("weights", None)  # tf.keras 2's initial [kernel, bias]
        _check_kwargs(self.keras_name, kwargs)
        self.keras2 = bool(keras2)
        self.activity_regularizer = regularizers.get(activity_regularizer, "activity_regularizer")
        self.kernel_size = standardize_tuple(kernel_size, 3, "kernel_size")
        self.strides = standardize_tuple(strides, 3, "strides")
        self.dilation_rate = standardize_tuple(dilation_rate, 3, "dilation_rate")
        self.padding = standardize_padding(padding)
        self.output_padding = (None if output_padding is None else
                               standardize_tuple(output_padding, 3, "output_padding",
                                                 allow_zero=True))
        self.data_format = standardize_data_format(data_format)
        self.activation = activations.get(activation, keras2=self.keras2)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.get(kernel_initializer, "kernel_initializer")
        self.bias_initializer = initializers.get(bias_initializer, "bias_initializer")
        self.kernel_regularizer = regularizers.get(kernel_regularizer, "kernel_regularizer")
        self.bias_regularizer = regularizers.get(bias_regularizer, "bias_regularizer")
        self.kernel_constraint = constraints.get(kernel_constraint, "kernel_constraint")
        self.bias_constraint = constraints.get(bias_constraint, "bias_constraint")
        self.filters = positive_int(filters, "filters")
        self.groups = groups
        _check_rules(self)
        self.name = name or _auto_name(self.snake_name)
        self.dtype_policy = standardize_dtype_policy(dtype)
        self.trainable = bool(trainable)
        self.built = False
        self.input_channels = None
        self.kernel = None
        self.bias = None
        self._activity_loss = None
        # Set when the layer is built, as tf.keras 2 does.
        self._initial_weights = None if weights is None else _weight_list(weights)

    # ----------------------------------------------------------------- dtypes
    @property
    def compute_dtype(self) -> str:
        """The dtype inputs and weights are cast to, and the output's."""
        return self.dtype_policy.compute_dtype

    @property
    def variable_dtype(self) -> str:
        """The dtype the weights are kept in (float32 under the mixed policies)."""
        return self.dtype_policy.variable_dtype

    @property
    def dtype(self) -> str:
        """Keras's alias of ``variable_dtype``."""
        return self.variable_dtype

    # ----------------------------------------------------------------- shapes
    def kernel_shape(self, input_channels: int) -> tuple:
        return self.kernel_size + (input_channels // self.groups, self.filters)

    def _channels(self, input_shape):
        shape = tuple(input_shape)
        if len(shape) < 5:
            raise ShapeError(
                f"Input 0 of layer \"{self.name}\" is incompatible with the layer: "
                f"expected min_ndim=5, found ndim={len(shape)}. Full shape received: {shape}")
        return shapes.split_layout(shape, self.data_format)[2]

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        self._channels(input_shape)  # validates the rank
        return shapes.output_shape(self.kind, input_shape, self.filters, self.kernel_size,
                                   self.strides, self.padding, self.data_format,
                                   self.dilation_rate, self.output_padding)

    def geometries(self, spatial_shape):
        return shapes.axis_geometries(self.kind, spatial_shape, self.kernel_size,
                                      self.strides, self.dilation_rate, self.padding,
                                      self.output_padding)

    # ---------------------------------------------------------------- weights
    def build(self, input_shape):
        # Keras reads the channels and checks them against the groups before
        # compute_output_shape checks the rank.
        input_shape = tuple(input_shape)
        channels = None
        if len(input_shape) >= 2:
            channels = input_shape[-1 if self.data_format == "channels_last" else 1]
        if channels is not None and channels % self.groups:
            raise ShapeError(
                "The number of input channels must be evenly divisible by the number "
                f"of groups. Received groups={self.groups}, but the input has "
                f"{channels} channels (full input shape is {input_shape}).")
        self.compute_output_shape(input_shape)
        if channels is None:
            raise ShapeError("The channel dimension of the inputs should be defined.")
        self.input_channels = channels
        vdtype = numpy_dtype(self.variable_dtype)  # Keras creates variables in this dtype
        self.kernel = np.asarray(self.kernel_initializer(self.kernel_shape(channels), vdtype),
                                 dtype=vdtype)
        self.bias = (np.asarray(self.bias_initializer((self.filters,), vdtype), dtype=vdtype)
                     if self.use_bias else None)
        self.built = True
        if self._initial_weights is not None:
            initial, self._initial_weights = self._initial_weights, None
            self.set_weights(initial)

    def _ensure_built(self, what):
        if not self.built:
            raise ArgumentError(
                f"You tried to call `{what}` on layer '{self.name}', but the layer "
                "isn't built. You can build it manually via: `layer.build(batch_input_shape)`.")

    def get_weights(self):
        if not self.built:
            return []
        return [self.kernel.copy()] + ([self.bias.copy()] if self.use_bias else [])

    def set_weights(self, weights):
        """Set ``[kernel]`` or ``[kernel, bias]`` in Keras layout.

        The shapes are checked against the layer's arguments (``kernel_size``,
        ``filters``, ``groups``, ``use_bias``) before anything is allocated. An
        unbuilt layer is then built from the kernel's input-channel dimension.
        """
        weights = list(weights)
        expected = 2 if self.use_bias else 1
        if len(weights) != expected:
            raise WeightsError(
                f"You called `set_weights(weights)` on layer '{self.name}' with a weight "
                f"list of length {len(weights)}, but the layer was expecting "
                f"{expected} weights.")
        kernel = np.asarray(weights[0])
        if kernel.ndim != 5:
            raise WeightsError(
                f"Layer '{self.name}' expects a 5-D kernel; received shape {kernel.shape}.")
        if self.built:
            channels = self.input_channels
        elif self.kind == shapes.CONV:
            channels = kernel.shape[-2] * self.groups
        else:
            channels = kernel.shape[-1]
        given = [("kernel", self.kernel_shape(channels), kernel)]
        if self.use_bias:
            given.append(("bias", (self.filters,), weights[1]))
        for label, want, new in given:
            new = np.asarray(new)
            if new.shape != want:
                raise WeightsError(
                    f"Layer '{self.name}' {label} weight shape {want} is not "
                    f"compatible with provided weight shape {new.shape}.")
            if not (np.issubdtype(new.dtype, np.number) or is_float_dtype(new.dtype)) \
                    or np.iscomplexobj(new):
                raise WeightsError(
                    f"Layer '{self.name}' {label} must be real numbers, got {new.dtype}.")
        if not self.built:
            self._initial_weights = None  # the weights given now win
            self.build(shapes.join_layout((None,), (None,) * 3, channels, self.data_format))
        vdtype = numpy_dtype(self.variable_dtype)  # assigning casts to the variable's dtype
        self.kernel = kernel.astype(vdtype, copy=True)
        if self.use_bias:
            self.bias = np.asarray(weights[1]).astype(vdtype, copy=True)

    def apply_constraints(self):
        """Project the weights with the kernel/bias constraints (as Keras's optimizer does).

        A constraint may be any callable from array to array of the same shape
        (Keras's own, or a Python function); it gets and returns NumPy arrays.
        """
        self._ensure_built("apply_constraints")
        if self.kernel_constraint is not None:
            self.kernel = self._project("kernel_constraint", self.kernel_constraint, self.kernel)
        if self.bias_constraint is not None and self.use_bias:
            self.bias = self._project("bias_constraint", self.bias_constraint, self.bias)

    def _project(self, label, constraint, w):
        out = np.asarray(constraint(w.copy()), w.dtype)
        if out.shape != w.shape:
            raise WeightsError(
                f"Layer '{self.name}' `{label}` returned shape {out.shape}; a constraint "
                f"must keep the weight's shape {w.shape}.")
        return out

    def count_params(self):
        self._ensure_built("count_params")
        return int(self.kernel.size + (self.bias.size if self.use_bias else 0))

    # ----------------------------------------------------------------- losses
    def regularization_losses(self, activity_sums=None, batch_size=1):
        """Penalties by name: kernel_regularizer, bias_regularizer, activity_regularizer.

        ``activity_sums`` are (sum |y|, sum y**2) of the last output; the
        activity penalty is divided by the batch size, as Keras does.
        """
        out = {"kernel_regularizer": None, "bias_regularizer": None,
               "activity_regularizer": None}
        if self.built and self.kernel_regularizer is not None:
            out["kernel_regularizer"] = float(self.kernel_regularizer(self.kernel))
        if self.built and self.use_bias and self.bias_regularizer is not None:
            out["bias_regularizer"] = float(self.bias_regularizer(self.bias))
        if self.activity_regularizer is not None and activity_sums is not None:
            out["activity_regularizer"] = float(
                self.activity_regularizer.from_sums(*activity_sums)) / max(batch_size, 1)
        return out

    @property
    def losses(self):
        """Keras's ``layer.losses``, in its order: the last call's activity penalty,
        then the kernel and bias penalties."""
        terms = self.regularization_losses()
        ordered = [self._activity_loss, terms["kernel_regularizer"], terms["bias_regularizer"]]
        return [v for v in ordered if v is not None]

    # ------------------------------------------------------------------- call
    def job(self, input_shape):
        """The engine's description of applying this layer to ``input_shape``."""
        from ..engine.job import Job
        channels = self._channels(input_shape)
        if not self.built:
            self.build(input_shape)
        elif channels != self.input_channels:
            raise ShapeError(
                f"Input 0 of layer \"{self.name}\" is incompatible with the layer: "
                f"expected axis {'-1' if self.data_format == 'channels_last' else '1'} "
                f"of input shape to have value {self.input_channels}, but received "
                f"input with shape {tuple(input_shape)}")
        elif channels % self.groups:
            raise ShapeError("The number of input channels must be evenly divisible by "
                             f"the number of groups. Received groups={self.groups}, but "
                             f"the input has {channels} channels.")
        if channels == 0 and self.kind == shapes.CONV:
            # Keras builds such a layer, but none of its backends computes it
            # (TensorFlow: "filter must not have zero elements"; JAX: division by zero).
            raise ShapeError(
                f"Input 0 of layer \"{self.name}\" has no channels (shape "
                f"{tuple(input_shape)}): Keras cannot apply a Conv3D to zero input channels.")
        out_shape = self.compute_output_shape(input_shape)
        batch, spatial, _ = shapes.split_layout(tuple(input_shape), self.data_format)
        # Keras autocasts the variables to the compute dtype inside call().
        cdtype = numpy_dtype(self.compute_dtype)
        return Job(kind=self.kind, geoms=self.geometries(spatial), batch_shape=batch,
                   in_channels=channels, filters=self.filters, groups=self.groups,
                   kernel=self.kernel.astype(cdtype, copy=False),
                   bias=self.bias.astype(cdtype, copy=False) if self.use_bias else None,
                   activation=self.activation, data_format=self.data_format,
                   dtype=cdtype, keras_output_shape=out_shape)

    def __call__(self, inputs, method="auto", workers=None, memory_limit=None,
                 chunk_shape=None, progress=False):
        """Apply the layer to a NumPy array in Keras layout (rank >= 5).

        ``workers`` threads (default: the cores this process may use, as the
        CLI; ``workers=1`` computes in this thread alone). The result is in the
        compute dtype of the layer's policy, as Keras returns it (float16 under
        ``mixed_float16``)."""
        from ..engine import run_array
        x = np.asarray(inputs)
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool
                or is_float_dtype(x.dtype)) or np.iscomplexobj(x):
            raise ShapeError(f"Inputs must be real numbers; received dtype {x.dtype}.")
        job = self.job(x.shape)
        y, stats = run_array(job, x, method=method, workers=workers,
                             memory_limit=memory_limit, chunk_shape=chunk_shape,
                             progress=progress,
                             want_sums=self.activity_regularizer is not None)
        self._activity_loss = self.regularization_losses(
            stats.activity_sums, batch_size=x.shape[0])["activity_regularizer"]
        self.last_stats = stats
        return y

    # ----------------------------------------------------------------- config
    def get_config(self):
        config = {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self.dtype_policy.serialize(),
            "filters": self.filters,
            "kernel_size": self.kernel_size,
            "strides": self.strides,
            "padding": self.padding,
        }
        if self.kind == shapes.TRANSPOSE:
            config["output_padding"] = self.output_padding
        config.update({
            "data_format": self.data_format,
            "dilation_rate": self.dilation_rate,
        })
        if self.kind == shapes.CONV:
            config["groups"] = self.groups
        config.update({
            "activation": self.activation.serialize(),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "activity_regularizer": regularizers.serialize(self.activity_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
        })
        return config

    @classmethod
    def from_config(cls, config, keras2=None):
        """Build from a Keras 3 or tf.keras 2 ``get_config()`` dict.

        ``keras2`` (tf.keras 2 semantics, e.g. its ``hard_sigmoid``) is guessed
        from the config's style when not given: tf.keras 2 writes ``dtype`` as
        a plain string and serializes objects without a ``module`` key.
        """
        config = dict(config)
        if keras2 is None:
            keras2 = looks_like_keras2(config)
        return cls(**config, keras2=keras2)

    def __repr__(self):
        return (f"{self.keras_name}(filters={self.filters}, kernel_size={self.kernel_size}, "
                f"strides={self.strides}, padding={self.padding!r}, name={self.name!r})")


def looks_like_keras2(config) -> bool:
    dtype = config.get("dtype")
    if isinstance(dtype, dict):  # tf.keras 2's mixed precision policy class is Policy
        return dtype.get("class_name") == "Policy"

    def has_module(value):
        if isinstance(value, dict):
            return "module" in value or any(has_module(v) for v in value.values())
        return False

    return not any(has_module(v) for v in config.values())


class Conv3D(BaseConv3D):
    """3D convolution layer (Keras ``Conv3D``), computed without Keras.

    Arguments, defaults and errors are Keras's: ``Conv3D(filters, kernel_size,
    strides=1, padding="valid", data_format=None, dilation_rate=1, groups=1,
    activation=None, use_bias=True, ...)``. The kernel has shape
    ``(kd, kh, kw, C_in // groups, filters)``.

    >>> layer = Conv3D(4, 3, padding="same")
    >>> layer(np.zeros((1, 8, 8, 8, 2), np.float32)).shape
    (1, 8, 8, 8, 4)
    """

    def __init__(self, filters, kernel_size, strides=1, padding="valid", data_format=None,
                 dilation_rate=1, groups=1, **kwargs):
        if "output_padding" in kwargs:
            raise ArgumentError("Conv3D has no `output_padding` argument (Conv3DTranspose has).")
        super().__init__(filters, kernel_size, strides=strides, padding=padding,
                         data_format=data_format, dilation_rate=dilation_rate,
                         groups=groups, **kwargs)


class Conv3DTranspose(BaseConv3D):
    """3D transposed convolution layer (Keras ``Conv3DTranspose``), without Keras.

    The kernel has shape ``(kd, kh, kw, filters, C_in)``; there is no
    ``groups`` argument, and ``output_padding`` must be smaller than the
    strides on every axis.

    >>> layer = Conv3DTranspose(2, 3, strides=2, padding="same")
    >>> layer(np.zeros((1, 4, 4, 4, 1), np.float32)).shape
    (1, 8, 8, 8, 2)
    """

    kind = shapes.TRANSPOSE
    keras_name = "Conv3DTranspose"
    snake_name = "conv3d_transpose"

    def __init__(self, filters, kernel_size, strides=1, padding="valid",
                 output_padding=None, data_format=None, dilation_rate=1, **kwargs):
        groups = kwargs.pop("groups", 1)
        if groups != 1:
            raise ArgumentError("Conv3DTranspose has no `groups` argument (only Conv3D has).")
        super().__init__(filters, kernel_size, strides=strides, padding=padding,
                         output_padding=output_padding, data_format=data_format,
                         dilation_rate=dilation_rate, **kwargs)

    def kernel_shape(self, input_channels: int) -> tuple:
        return self.kernel_size + (self.filters, input_channels)


LAYER_CLASSES = {"conv3d": Conv3D, "conv3dtranspose": Conv3DTranspose,
                 "convolution3d": Conv3D, "convolution3dtranspose": Conv3DTranspose}


def layer_class(name: str):
    key = str(name).replace("_", "").lower()
    if key not in LAYER_CLASSES:
        raise ArgumentError(
            f"Unknown layer {name!r}: expected Conv3D or Conv3DTranspose.")
    return LAYER_CLASSES[key]


def split_serialized(config):
    """(class name or None, layer config) of ``{"class_name", "config"}`` or a bare config."""
    if "class_name" in config and "config" in config:
        return config["class_name"], dict(config["config"])
    return None, dict(config)


def from_config(config, keras2=None):
    """A layer from ``{"class_name": ..., "config": ...}`` or a bare config (Conv3D)."""
    class_name, cfg = split_serialized(config)
    return layer_class(class_name or "Conv3D").from_config(cfg, keras2=keras2)

