"""The library behind the CLI: build a layer from arguments, apply it to a file.

``build_layer`` (from :mod:`conv3d_cli.build`) merges a Keras layer config,
explicit arguments and a weights file into one layer; ``apply_to_file`` (from
:mod:`conv3d_cli.apply`) runs it over a volume file into an output file;
``describe`` is ``conv3d shape`` without printing.
"""

from __future__ import annotations

from .apply import apply_to_file, describe  # noqa: F401  (running a layer over a file)
from .build import (  # noqa: F401 (re-exported: build_layer and friends lived here)
    INIT_BYTES_PER_WEIGHT,
    MAX_CONFIG_BYTES,
    build_layer,
    check_kernel_fits,
    infer_class,
    is_model_file,
    load_config_file,
)
