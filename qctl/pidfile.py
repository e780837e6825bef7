"""Pidfiles that never point at the wrong process.

A pidfile holds one line, the PID (as Celery writes it). It is created exclusively and without
following a symlink. It is trusted only while its PID is alive *and* that process looks like a
qctl node that started before the file was written (psutil: command line and start time);
otherwise it is stale and may be replaced. Shared by the worker, beat and ``multi``.
"""
from __future__ import annotations

import errno
import os
from typing import Any

from .exceptions import QctlError


class PidfileError(QctlError):
    """The pidfile belongs to a running node, or cannot be written."""


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

    def process(self) -> Any:
        """The live process this pidfile names, or None when it is stale."""
        pid = self.read_pid()
        if pid is None or pid <= 0:
            return None
        import psutil
        try:
            proc = psutil.Process(pid)
            cmdline = " ".join(proc.cmdline())
            started = proc.create_time()
            written = os.stat(self.path, follow_symlinks=False).st_mtime
        except (psutil.Error, OSError):
            return None
        if "qctl" not in cmdline:
            return None  # the PID was reused by an unrelated program
        if started > written + 1.0:
            return None  # a newer process got the PID after the file was written
        return proc

    def is_stale(self) -> bool:
        return os.path.lexists(self.path) and self.process() is None

    def acquire(self) -> None:
        """Write our PID, replacing a stale file; raise PidfileError if a node owns it."""
        for _ in range(2):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(self.path, flags, 0o644)
            except FileExistsError:
                proc = self.process()
                if proc is not None and proc.pid != os.getpid():
                    raise PidfileError(f"pidfile {self.path} names a running node (pid {proc.pid})") from None
                self.remove()
                continue
            except OSError as exc:
                raise PidfileError(f"cannot create pidfile {self.path}: {exc.strerror}") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            return
        raise PidfileError(f"cannot create pidfile {self.path}: another process keeps creating it")

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
