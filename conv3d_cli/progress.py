"""The progress bar: tqdm on stderr, shown only for work that lasts over a second."""

from __future__ import annotations

import sys
import time

DELAY = 1.0  # seconds of work before a bar appears


def progress_bar(total_voxels: int, enabled: bool = True, desc: str = "conv3d"):
    return ProgressBar(total_voxels, enabled, desc)


class ProgressBar:
    """Counts the work done; a tqdm bar takes over at the first update after ``DELAY``.

    tqdm itself would wait as long before it draws (its ``delay``), but importing
    it costs more than a small run: work that ends sooner, or runs without a bar
    (``--quiet``), never imports it.
    """

    def __init__(self, total, enabled=True, desc="conv3d"):
        self.total, self.enabled, self.desc = total, enabled, desc
        self.n = 0
        self.postfix = None
        self._bar = None
        self._start = time.monotonic()

    def update(self, n=1):
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._start >= DELAY:
            self._open()

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=refresh)

    def close(self):
        if self._bar is not None:
            self._bar.close()

    def _open(self):
        from tqdm import tqdm

        class Bar(tqdm):
            # No monitor thread (tqdm starts one per process for its bars): a
            # process with other threads starts its workers by forkserver, not
            # fork (conv3d_cli.engine.workers). The bar is redrawn on its own
            # updates, one per tile (miniters=1), at most every 0.1 s.
            monitor_interval = 0

        self._bar = Bar(total=self.total, initial=self.n, unit="vox", unit_scale=True,
                        desc=self.desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                        miniters=1)
        if self.postfix is not None:
            self._bar.set_postfix_str(self.postfix)
