"""Pidfiles that never point at the wrong process.

A pidfile holds one line, the PID (as Celery writes it). It is created exclusively and without
following a symlink. It is trusted only while its PID is alive *and* that process looks like a
qctl node that started before the file was written (psutil: command line and start time);
otherwise it is stale and may be replaced. Given the node's name (``process(node=...)``), the
command line must also be that node's ``qctl worker``: a PID reused by any other program, or by
another node, is never taken for this node. Shared by the worker, beat and ``multi``.

Replacing a stale file is check-then-act, so everything that creates or removes a pidfile
holds an advisory lock on the pidfile's folder meanwhile (``flock`` on the directory itself: no
lock file is left behind). Two nodes started at once for the same pidfile therefore cannot both
see "stale" and both win.
"""
from __future__ import annotations

import contextlib
import errno
import os
import time
from typing import Any, Iterator

from .exceptions import QctlError

#: A pidfile written this recently with no PID in it yet is being written, not broken.
_FRESH_SECONDS = 2.0
#: psutil's start time comes from the boot time, which Linux gives in whole seconds.
_CLOCK_SLACK = 1.0


class PidfileError(QctlError):
    """The pidfile belongs to a running node, or cannot be written."""


def command_names_node(cmdline: list[str], node: str) -> bool:
    """True when ``cmdline`` runs ``qctl ... worker`` with node name ``node`` (``-n NODE``,
    ``-nNODE``, ``--hostname NODE`` or ``--hostname=NODE``)."""
    if not any("qctl" in part for part in cmdline) or "worker" not in cmdline:
        return False
    for i, part in enumerate(cmdline):
        if part in ("-n", "--hostname") and i + 1 < len(cmdline) and cmdline[i + 1] == node:
            return True
        if part in (f"-n{node}", f"--hostname={node}"):
            return True
    return False


class Pidfile:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def read_pid(self) -> int | None:
        """The PID in the file, or None when there is no (readable) file."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        with os.fdopen(fd) as fh:
            text = fh.read(64).strip().splitlines()
        try:
            return int(text[0]) if text else None
        except ValueError:
            return None

    def process(self, node: str | None = None) -> Any:
        """The live process this pidfile names (a ``psutil.Process``), or None when it is stale.

        With ``node``, the process must also be that node's qctl worker (its command line
        names it); without, any qctl process will do.
        """
        pid = self.read_pid()
        if pid is None or pid <= 0:
            return None
        import psutil
        try:
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
            started = proc.create_time()
            status = proc.status()
            written = os.stat(self.path, follow_symlinks=False).st_mtime
        except (psutil.Error, OSError):
            return None
        if status == psutil.STATUS_ZOMBIE:
            return None  # exited; only its parent has not collected it yet
        if node is not None and not command_names_node(cmdline, node):
            return None  # the PID was reused by another program (or another node)
        if "qctl" not in " ".join(cmdline):
            return None  # the PID was reused by an unrelated program
        if started > written + _CLOCK_SLACK:
            return None  # a newer process got the PID after the file was written
        return proc

    def is_stale(self, node: str | None = None) -> bool:
        return os.path.lexists(self.path) and self.process(node) is None

    def is_fresh_and_empty(self) -> bool:
        """True while the file exists, has no PID yet and was created a moment ago: a node is
        writing it right now (writers outside the folder lock, such as older releases)."""
        try:
            written = os.stat(self.path, follow_symlinks=False).st_mtime
        except OSError:
            return False
        return self.read_pid() is None and time.time() - written < _FRESH_SECONDS

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's advisory lock (a no-op where ``flock`` on a folder fails)."""
        import fcntl
        try:
            fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                pass  # e.g. some network filesystems: the exclusive create still guards us
            yield
        finally:
            os.close(fd)  # releases the lock

    def acquire(self, node: str | None = None) -> None:
        """Write our PID, replacing a stale file; raise PidfileError if a node owns it.

        With ``node`` (our node name), a file whose PID now belongs to some other qctl
        process is recognised as stale too.
        """
        with self.locked():
            for _ in range(2):
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                try:
                    fd = os.open(self.path, flags, 0o644)
                except FileExistsError:
                    self._wait_until_written()
                    proc = self.process(node)
                    if proc is not None and proc.pid != os.getpid():
                        raise PidfileError(f"pidfile {self.path} names a running node "
                                           f"(pid {proc.pid})") from None
                    self.remove()
                    continue
                except OSError as exc:
                    raise PidfileError(f"cannot create pidfile {self.path}: {exc.strerror}") from None
                with os.fdopen(fd, "w") as fh:
                    fh.write(f"{os.getpid()}\n")
                return
        raise PidfileError(f"cannot create pidfile {self.path}: another process keeps creating it")

    def _wait_until_written(self, timeout: float = _FRESH_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while self.is_fresh_and_empty() and time.monotonic() < deadline:
            time.sleep(0.02)

    def remove_if_stale(self, node: str | None = None, pid: int | None = None) -> bool:
        """Remove the file if it is stale (and, given ``pid``, still names that PID).

        Checked again under the folder lock, so a node that has just written a fresh pidfile
        never loses it. Returns True when a file was removed.
        """
        with self.locked():
            if not os.path.lexists(self.path) or self.is_fresh_and_empty():
                return False
            if pid is not None and self.read_pid() not in (pid, None):
                return False  # replaced meanwhile by a new node
            if self.process(node) is not None:
                return False
            self.remove()
            return True

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def release(self) -> None:
        """Remove the file if it still holds our PID (clean exit)."""
        if self.read_pid() == os.getpid():
            self.remove()
