"""SIGTERM, SIGHUP and SIGINT end a run through the same clean-up as any error.

Batch schedulers, ``timeout``, ``docker stop`` and supervising scripts stop a
run with SIGTERM (or SIGHUP, SIGINT), often to the main process only. Python
turns SIGINT into ``KeyboardInterrupt``; :func:`handled` turns SIGTERM and
SIGHUP into :class:`Terminated`, so all three unwind through the ``except`` /
``finally`` blocks that abort the output, remove temporary files and stop the
worker processes, and the CLI then exits with 128 + the signal number.

Clean-up that must run to its end is wrapped in :func:`shielded`: a signal
arriving meanwhile is raised when it is done. Once one signal has been
raised, later ones are ignored so the clean-up it started can finish. Python
swallows an exception raised where it cannot propagate (an at-fork hook, a
``__del__``: "Exception ignored in ..."); the signal is then delivered again,
and :func:`received` tells the CLI a signal arrived even if some library
turned the exception into another one.

Worker processes call :func:`worker_defaults`: they ignore SIGINT (a Ctrl-C
reaches the whole process group; the parent stops them), die on SIGTERM and
SIGHUP, and on Linux are killed when their parent dies, however it dies (a
forkserver's workers when the forkserver dies, which it does when the run's
process does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (a ``BaseException``, like ``KeyboardInterrupt``)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum

    def __str__(self):
        return f"received {signal.Signals(self.signum).name}"


def exit_status(exc) -> int:
    """128 + the signal number, as a shell reports a process the signal ended."""
    signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else exc.signum
    return 128 + int(signum)


def signal_name(exc) -> str:
    signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else exc.signum
    return signal.Signals(signum).name


_state = {"installed": False, "fired": False, "shield": 0, "pending": None, "pid": None,
          "received": None}


def received():
    """The exception of the signal that arrived while :func:`handled` was active, or None."""
    signum = _state["received"]
    if signum is None:
        return None
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _raise_for(signum):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum, frame):
    if os.getpid() != _state["pid"]:  # a forked child before worker_defaults ran
        _child_default(signum)
        return
    if _state["fired"]:  # already unwinding: let that clean-up finish
        return
    _state["fired"] = True
    _state["received"] = signum
    if _state["shield"]:
        _state["pending"] = signum
        return
    _raise_for(signum)


@contextlib.contextmanager
def handled():
    """Turn SIGINT/SIGTERM/SIGHUP into exceptions while the block runs.

    Only in the main thread (Python delivers signals there); a signal the
    caller ignores (``nohup`` ignores SIGHUP) stays ignored.
    """
    if _state["installed"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in CAUGHT}
    previous_hook = sys.unraisablehook
    _state.update(installed=True, fired=False, shield=0, pending=None, pid=os.getpid(),
                  received=None)

    def unraisable(info):
        if isinstance(info.exc_value, (KeyboardInterrupt, Terminated)) \
                and os.getpid() == _state["pid"] and _state["received"] is not None:
            # The raise was swallowed: deliver the signal again, from outside this hook.
            _state["fired"] = False
            threading.Timer(0.01, os.kill, (os.getpid(), _state["received"])).start()
            return
        previous_hook(info)

    try:
        sys.unraisablehook = unraisable
        for s, old in previous.items():
            if old is not signal.SIG_IGN:
                signal.signal(s, _handler)
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        sys.unraisablehook = previous_hook
        _state.update(installed=False, fired=False, shield=0, pending=None)


@contextlib.contextmanager
def shielded():
    """Run clean-up to its end; a signal that arrives meanwhile is raised after it."""
    _state["shield"] += 1
    try:
        yield
    finally:
        _state["shield"] -= 1
        if not _state["shield"] and _state["pending"] is not None:
            signum, _state["pending"] = _state["pending"], None
            _raise_for(signum)


@contextlib.contextmanager
def blocked():
    """Hold SIGINT/SIGTERM/SIGHUP back while the block runs (e.g. while forking workers).

    A signal arriving meanwhile is delivered when the block ends, not inside
    an at-fork hook where Python would swallow its exception. Children forked
    here start with the signals blocked: :func:`worker_defaults` unblocks them.
    """
    if not hasattr(signal, "pthread_sigmask") or \
            threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, CAUGHT)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _child_default(signum):
    """What a worker does with ``signum`` (see worker_defaults), from the inherited handler."""
    if signum == signal.SIGINT:
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def worker_defaults(parent_pid):
    """Signal dispositions of a forked worker (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    _state.update(installed=False, fired=False, shield=0, pending=None)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, CAUGHT)
    _die_with_parent()
    if not _child_of(parent_pid):  # the parent died before the line above took effect
        os._exit(1)


def _child_of(pid):
    """Whether ``pid`` started this process: it is the parent, or the parent's parent
    when the parent is a forkserver (which ends when ``pid`` does)."""
    ppid = os.getppid()
    if ppid == pid:
        return True
    try:
        with open(f"/proc/{ppid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1]) == pid
    except (OSError, ValueError, IndexError):
        return False


def _die_with_parent():
    """Linux: SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl: workers end when their pipes close
        pass
