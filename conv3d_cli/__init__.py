"""conv3d: Keras-exact Conv3D and Conv3DTranspose on volume files, without Keras."""

__version__ = "0.1.0"

from .errors import Conv3DError  # noqa: E402

# The layers and the I/O load on first use (``conv3d --version`` needs neither;
# I/O imports nibabel and h5py).
_LAZY = {"Conv3D": "layers", "Conv3DTranspose": "layers", "read_volume": "io",
         "write_volume": "io", "open_volume": "io"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = ["Conv3D", "Conv3DTranspose", "Conv3DError", "read_volume", "write_volume",
           "open_volume", "__version__"]
