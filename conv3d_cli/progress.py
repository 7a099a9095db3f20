"""Progress bars and phase timings of a run: tqdm on stderr, shown only for work
that lasts over a second, and by default only when stderr is a terminal.

A run is a few phases (open, decompress, plan, compute, write, compress);
:class:`Phases` times each and gives the long ones a bar. The I/O code that
runs a phase (decompressing a ``.nii.gz`` input, compressing a ``.nii.gz``
output) calls :func:`phase`, which reports to the run in progress
(:func:`reporting`), or to nobody outside a run.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time

DELAY = 1.0  # seconds of work before a bar appears

# The Phases of the run in progress in this thread (set by ``reporting``).
_RUN = contextvars.ContextVar("conv3d_progress_run", default=None)


def progress_bar(total_voxels: int, enabled: bool = True, desc: str = "conv3d"):
    return ProgressBar(total_voxels, enabled, desc)


def on_terminal(progress=None) -> bool:
    """Whether bars are drawn: ``progress`` True or False says so, None (the
    default) means when stderr is a terminal: a log file gets no ``\\r`` updates."""
    if progress is not None:
        return bool(progress)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Phases:
    """The seconds each phase of a run took, and a bar for each long one."""

    def __init__(self, progress=None):
        self.enabled = on_terminal(progress)
        self.seconds = {}

    @contextlib.contextmanager
    def phase(self, name, total=None, unit="vox", desc=None):
        """Time phase ``name`` (seconds add up if it runs twice); yields a bar over
        ``total`` ``unit`` (``"B"``: bytes), silent when ``total`` is None."""
        bar = ProgressBar(total, self.enabled and total is not None, desc or name, unit)
        start = time.perf_counter()
        try:
            yield bar
        finally:
            bar.close()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def reporting(phases: Phases):
    """Make ``phases`` the run that :func:`phase` reports to, within the block."""
    token = _RUN.set(phases)
    try:
        yield phases
    finally:
        _RUN.reset(token)


def phase(name, total=None, unit="B", desc=None):
    """:meth:`Phases.phase` of the run in progress; outside one, an untimed silent bar."""
    run = _RUN.get()
    return (run if run is not None else Phases(False)).phase(name, total, unit, desc)


class ProgressBar:
    """Counts the work done; a tqdm bar takes over at the first update after ``DELAY``.

    tqdm itself would wait as long before it draws (its ``delay``), but importing
    it costs more than a small run: work that ends sooner, or runs without a bar
    (``--quiet``, or stderr not a terminal), never imports it.
    """

    def __init__(self, total, enabled=True, desc="conv3d", unit="vox"):
        self.total, self.enabled, self.desc, self.unit = total, enabled, desc, unit
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

        self._bar = Bar(total=self.total, initial=self.n, unit=self.unit, unit_scale=True,
                        unit_divisor=1024 if self.unit == "B" else 1000,
                        desc=self.desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                        miniters=1)
        if self.postfix is not None:
            self._bar.set_postfix_str(self.postfix)
