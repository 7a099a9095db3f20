"""The progress bar: tqdm on stderr, shown only for work that lasts over a second."""

from __future__ import annotations

import sys

from tqdm import tqdm


class _Bar(tqdm):
    # No monitor thread (tqdm starts one per process for its bars): worker
    # processes are forked only from a process without other threads (see
    # conv3d_cli.engine.workers). The bar is redrawn on its own updates, one
    # per tile (miniters=1), at most every 0.1 s.
    monitor_interval = 0


def progress_bar(total_voxels: int, enabled: bool = True, desc: str = "conv3d"):
    return _Bar(total=total_voxels, unit="vox", unit_scale=True, desc=desc,
                file=sys.stderr, disable=not enabled, delay=1.0, leave=False,
                dynamic_ncols=True, miniters=1)
