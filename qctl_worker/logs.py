"""Logging for the node: Celery's line format, level colours on a terminal, plain in files."""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
_COLOURS = {"DEBUG": "\x1b[34m", "INFO": "\x1b[32m", "WARNING": "\x1b[33m",
            "ERROR": "\x1b[31m", "CRITICAL": "\x1b[1;31m"}


class ColourFormatter(logging.Formatter):
    """Colours the level name; used only when the stream is a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        colour = _COLOURS.get(record.levelname)
        return f"{colour}{text}\x1b[0m" if colour and record.levelno >= logging.WARNING else text


def open_logfile(path: str) -> logging.Handler:
    """A file handler that never follows a symlink planted at ``path``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o640)
    stream = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
    handler = logging.StreamHandler(stream)
    handler.baseFilename = os.path.abspath(path)  # type: ignore[attr-defined]
    return handler


def setup(loglevel: str | int = "INFO", logfile: str | None = None, no_color: bool = False) -> None:
    """Send the root logger to ``logfile`` (plain) or stderr (coloured on a terminal)."""
    level = loglevel if isinstance(loglevel, int) else logging.getLevelName(str(loglevel).upper())
    if not isinstance(level, int):
        level = logging.INFO
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
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
