"""The progress bar: tqdm on stderr, shown only for work that lasts over a second."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total_voxels: int, enabled: bool = True, desc: str = "conv3d"):
    return tqdm(total=total_voxels, unit="vox", unit_scale=True, desc=desc,
                file=sys.stderr, disable=not enabled, delay=1.0, leave=False,
                dynamic_ncols=True)
