"""conv3d: Keras-exact Conv3D and Conv3DTranspose on volume files, without Keras."""

__version__ = "0.1.0"

from .errors import Conv3DError  # noqa: E402
from .layers import Conv3D, Conv3DTranspose  # noqa: E402


def __getattr__(name):  # I/O imports nibabel/h5py: load them only when asked
    if name in ("read_volume", "write_volume", "open_volume"):
        from . import io
        return getattr(io, name)
    raise AttributeError(name)


__all__ = ["Conv3D", "Conv3DTranspose", "Conv3DError", "read_volume", "write_volume",
           "open_volume", "__version__"]
