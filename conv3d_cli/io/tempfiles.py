"""Names of the temporary files a run makes, and the removal of those dead runs left.

Every temporary file or folder is ``.NAME.conv3d-PID-START-HOST.tmp`` beside
what it becomes (or in the temporary folder): PID and START (the process's
start time, in clock ticks since boot) name the run that made it, HOST (six
hex digits of a hash of the host name) the machine. A run that is killed
(SIGKILL, the OOM killer) cannot remove its files, so every run removes, in
the folders it writes to, the files of this pattern whose run is gone: same
host, and no process PID, or one started at another time (the PID was
reused). Files of another host (a shared file system) are left alone, as is
every name that does not match the pattern exactly.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import sys

log = logging.getLogger("conv3d_cli")

# ".NAME.conv3d-PID-START-HOST.tmp"; ".NAME.conv3d-PID.tmp" is what earlier versions wrote.
_PATTERN = re.compile(r"^\..+\.conv3d-(?P<pid>\d+)(?:-(?P<start>\d+)-(?P<host>[0-9a-f]{6}))?"
                      r"\.tmp$")
_MAX_NAME = 100  # characters of NAME kept in a temporary name (file names are limited)


def _start_time(pid):
    """Start time of process ``pid`` in clock ticks since boot, or None (no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":  # a zombie has ended; only its parent has not reaped it yet
        return -1
    return int(fields[19])


def _host():
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def token():
    """``PID-START-HOST`` of this process (``PID`` alone where /proc is missing)."""
    pid = os.getpid()
    start = _start_time(pid)
    return f"{pid}-{start}-{_host()}" if start is not None else str(pid)


def temp_path(folder, name):
    """A temporary path in ``folder`` for ``name`` (a file or folder), owned by this run."""
    return os.path.join(folder, f".{name[:_MAX_NAME]}.conv3d-{token()}.tmp")


def is_stale(name) -> bool:
    """True when ``name`` is one of the tool's temporary names and its run has ended."""
    m = _PATTERN.match(name)
    if m is None:
        return False
    pid = int(m["pid"])
    if m["host"] is not None and m["host"] != _host():
        return False  # another machine's run: its processes cannot be seen from here
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        pass
    now = _start_time(pid)
    if now == -1:
        return True
    return m["start"] is not None and now is not None and now != int(m["start"])


def remove_stale(folder):
    """Remove the temporary files and folders of ended runs from ``folder``."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if ".conv3d-" not in entry.name or not is_stale(entry.name):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another run removed it first
            continue
        except OSError as exc:
            log.info("could not remove %s, left by an ended run: %s", entry.path, exc)
            continue
        log.info("removed %s, left by an ended run", entry.path)


def check_writable_dir(folder, what):
    """``folder`` exists and a file can be made there; else a VolumeError naming ``what``."""
    from ..errors import VolumeError
    if not os.path.isdir(folder):
        raise VolumeError(f"{what}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise VolumeError(f"{what}: directory {folder} is not writable")


def place(src, dst, overwrite, what):
    """Rename ``src`` to ``dst``; without ``overwrite``, never replace a ``dst`` that appeared.

    Another process may have created ``dst`` since the run checked: the rename
    is then refused atomically (``renameat2(RENAME_NOREPLACE)``, or a hard
    link for files where that is missing), with an OutputExistsError.
    """
    if overwrite:
        os.replace(src, dst)
        return
    from ..errors import OutputExistsError
    exists = OutputExistsError(f"{what} was created by another process while this run "
                               "computed; pass --overwrite to replace it")
    done = _rename_noreplace(src, dst)
    if done is None and not os.path.isdir(src):
        try:
            os.link(src, dst)
            done = True
        except FileExistsError:
            done = False
        except OSError:  # no hard links on this file system
            done = None
        else:
            os.unlink(src)
    if done is None:  # no atomic way here: check right before the rename
        if os.path.lexists(dst):
            raise exists
        os.rename(src, dst)
        return
    if not done:
        raise exists


def _rename_noreplace(src, dst):
    """True if renamed, False if ``dst`` exists, None if the system cannot say atomically."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return None
    AT_FDCWD, RENAME_NOREPLACE = -100, 1
    if renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # not supported by this file system
        return None
    raise OSError(err, os.strerror(err), dst)


class FolderLock:
    """An exclusive ``flock`` on a folder: commits into one container file take turns.

    Waits (logging that it does) while another run holds it. File systems
    without flock on folders run unlocked, as before.
    """

    def __init__(self, folder):
        self.folder, self.fd = folder, None

    def __enter__(self):
        import fcntl
        try:
            self.fd = os.open(self.folder, os.O_RDONLY)
        except OSError:
            return self
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another run to finish writing into %s", self.folder)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            os.close(self.fd)
            self.fd = None
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


class StagedFile:
    """A small output file written under a temporary name beside ``path``, renamed by
    ``commit()``; ``path`` is checked when this is made, before any work is done."""

    def __init__(self, path, overwrite, what):
        from ..errors import OutputExistsError, VolumeError
        self.path, self.overwrite, self.what = os.fspath(path), overwrite, what
        folder = os.path.dirname(os.path.abspath(self.path))
        check_writable_dir(folder, what)
        if os.path.isdir(self.path):
            raise VolumeError(f"{what} is a directory")
        if os.path.lexists(self.path) and not overwrite:
            raise OutputExistsError(f"{what} exists; pass --overwrite to replace it")
        remove_stale(folder)
        self.tmp = temp_path(folder, os.path.basename(self.path))

    def open(self, mode="wb"):
        """The temporary file, new (its permissions follow the umask)."""
        return open(self.tmp, mode.replace("w", "x"))

    def commit(self):
        place(self.tmp, self.path, self.overwrite, self.what)

    def abort(self):
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass
