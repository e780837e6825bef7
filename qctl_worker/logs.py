"""Logging for the node: Celery's line format, level colours on a terminal, plain in files.

Log files are opened without following a symlink and watched: when logrotate moves a file
away, the next line goes to a new file at the same path (no copytruncate needed, no signal).
A log file name may hold ``%i``/``%I`` (pool process index): each pool child then writes
its own file, reopened by ``setup_child`` right after the fork.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import threading
import time
import traceback

FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
_COLOURS = {"DEBUG": "\x1b[34m", "INFO": "\x1b[32m", "WARNING": "\x1b[33m",
            "ERROR": "\x1b[31m", "CRITICAL": "\x1b[1;31m"}

#: What ``setup`` was given, so a pool child can open its own file (``%i``) after the fork.
_settings: dict = {}


class ColourFormatter(logging.Formatter):
    """Colours the level name; used only when the stream is a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        colour = _COLOURS.get(record.levelname)
        return f"{colour}{text}\x1b[0m" if colour and record.levelno >= logging.WARNING else text


class SafeFileHandler(logging.handlers.WatchedFileHandler):
    """Appends to ``path``, never through a symlink planted there, and reopens the path
    when the file was moved or deleted (log rotation)."""

    def _open(self):  # type: ignore[override]
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.baseFilename, flags, 0o640)
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def reopen(self) -> None:
        """Close and reopen now (HUP): a rotation by copy or by move is picked up at once."""
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
            self._statstream()
        finally:
            self.release()


def expand_logfile(template: str, index: int) -> str:
    """``%i`` -> the pool process index (0 = main process), ``%I`` -> ``-<index>`` for a
    child and nothing for the main process. Other templates are expanded by the CLI."""
    if "%i" not in template and "%I" not in template:
        return template
    return template.replace("%i", str(index)).replace("%I", f"-{index}" if index else "")


def open_logfile(path: str) -> logging.Handler:
    """A file handler that never follows a symlink planted at ``path``."""
    return SafeFileHandler(path, encoding="utf-8")


def setup(loglevel: str | int = "INFO", logfile: str | None = None, no_color: bool = False) -> None:
    """Send the root logger to ``logfile`` (plain) or stderr (coloured on a terminal)."""
    level = loglevel if isinstance(loglevel, int) else logging.getLevelName(str(loglevel).upper())
    if not isinstance(level, int):
        level = logging.INFO
    _settings.update(level=level, logfile=logfile, no_color=no_color)
    _install(level, expand_logfile(logfile, 0) if logfile else None, no_color)


def setup_child(index: int) -> None:
    """In a pool child: switch to its own file when the log file name asks for one."""
    logfile = _settings.get("logfile")
    if logfile and expand_logfile(logfile, index) != expand_logfile(logfile, 0):
        _install(_settings["level"], expand_logfile(logfile, index), True)


def reopen() -> int:
    """Reopen every log file of this process; returns how many were reopened."""
    count = 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, SafeFileHandler):
            handler.reopen()
            count += 1
    return count


def _install(level: int, logfile: str | None, no_color: bool) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    if logfile:
        handler: logging.Handler = open_logfile(logfile)
        formatter: logging.Formatter = logging.Formatter(FORMAT)
    else:
        handler = logging.StreamHandler(sys.stderr)
        colour = sys.stderr.isatty() and not no_color and not os.environ.get("NO_COLOR")
        formatter = ColourFormatter(FORMAT) if colour else logging.Formatter(FORMAT)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)


def format_stacks(process_name: str) -> str:
    """The stack of every thread of this process, most recent call last (USR1)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = [f"Stacks of {process_name} (pid {os.getpid()}), "
             f"{len(sys._current_frames())} thread(s):"]
    for ident, frame in sys._current_frames().items():
        parts.append(f"\n--- Thread {names.get(ident, '?')} ({ident}) ---\n")
        parts.append("".join(traceback.format_stack(frame)))
    return "".join(parts)


def write_stacks_raw(process_name: str) -> None:
    """Write this process's stacks straight to its log file, bypassing logging's locks: safe
    inside a signal handler that may have interrupted a log call. A log file rotated away
    since the last line is not written to: the path is opened afresh."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    data = f"[{stamp},000: WARNING/{process_name}] {format_stacks(process_name)}\n".encode(
        "utf-8", "replace")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, SafeFileHandler):
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
            try:
                fd = os.open(handler.baseFilename, flags, 0o640)
            except OSError:
                break
            try:
                os.write(fd, data)
            except OSError:
                pass
            finally:
                os.close(fd)
            return
    try:
        os.write(2, data)
    except OSError:
        pass
