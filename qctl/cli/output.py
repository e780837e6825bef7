"""``Output``: everything the CLI writes goes through here.

This is the only module that uses rich, and it imports rich inside the methods that draw
(tables), so plain output, ``--help`` and pipes never pay for it. Output is plain text when
stdout is not a terminal, with ``--no-color``, or when ``NO_COLOR`` is set; rich's markup
is always off, so task arguments and error messages are printed exactly as they are.
"""
from __future__ import annotations

import base64
import datetime as _dt
import decimal
import json as _json
import os
import sys
import uuid
from typing import Any, Iterable, Sequence

import click


def color_disabled(no_color: bool = False) -> bool:
    """True when colour is off by flag or by the ``NO_COLOR`` convention (set and non-empty)."""
    return bool(no_color or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb")


def _json_default(obj: Any) -> Any:
    # Results come back from the backend as Python objects (kombu type tags decoded); print
    # them as plain JSON values a script can read, not as tagged objects.
    if isinstance(obj, (_dt.datetime, _dt.date, _dt.time)):
        return obj.isoformat()
    if isinstance(obj, (decimal.Decimal, uuid.UUID)):
        return str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(data).decode("ascii")
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}: {obj}"
    return repr(obj)


def to_json(data: Any, indent: int | None = None) -> str:
    """``data`` as JSON text; values JSON cannot express are written as strings."""
    return _json.dumps(data, default=_json_default, ensure_ascii=False, indent=indent)


class Output:
    """Writes results to stdout and errors to stderr, in colour only when that is wanted."""

    def __init__(self, no_color: bool = False, quiet: bool = False) -> None:
        self.no_color = color_disabled(no_color)
        self.quiet = quiet

    # Streams are looked up at each call, not kept: click's test runner and `--workdir`
    # style redirections swap sys.stdout after this object exists.
    @property
    def rich_enabled(self) -> bool:
        """Draw with rich only for a colour-capable terminal."""
        stream = sys.stdout
        return not self.no_color and bool(getattr(stream, "isatty", lambda: False)())

    def _color_for(self, err: bool) -> bool:
        stream = sys.stderr if err else sys.stdout
        return not self.no_color and bool(getattr(stream, "isatty", lambda: False)())

    def print(self, text: Any = "", err: bool = False, fg: str | None = None,
              bold: bool = False) -> None:
        """Primary output: always written, even with ``--quiet``."""
        message = str(text)
        if (fg or bold) and self._color_for(err):
            message = click.style(message, fg=fg, bold=bold)
        click.echo(message, err=err, color=self._color_for(err))

    def info(self, text: Any = "", err: bool = False) -> None:
        """Secondary output (progress, notes, empty-list messages): silenced by ``--quiet``."""
        if not self.quiet:
            self.print(text, err=err)

    def warn(self, message: str) -> None:
        """A one-line warning on stderr (silenced by ``--quiet``)."""
        if not self.quiet:
            self.print(f"Warning: {message}", err=True, fg="yellow")

    def error(self, message: str) -> None:
        """A one-line error on stderr, in click's ``Error: ...`` form."""
        self.print(f"Error: {message}", err=True, fg="red")

    def json(self, data: Any, indent: int | None = None) -> None:
        """``data`` as JSON on stdout (one line unless ``indent`` is given)."""
        click.echo(to_json(data, indent=indent))

    def table(self, columns: Sequence[str], rows: Iterable[Sequence[Any]],
              title: str | None = None) -> None:
        """A table: rich on a colour terminal, aligned plain columns otherwise."""
        rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
        if self.rich_enabled:
            self._rich_table(columns, rows, title)
            return
        if title:
            click.echo(title)
        widths = [len(c) for c in columns]
        for row in rows:
            for i, cell in enumerate(row[:len(widths)]):
                widths[i] = max(widths[i], len(cell))
        for row in [list(columns), *rows]:
            cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:len(widths)])]
            click.echo("  ".join(cells).rstrip())

    def _rich_table(self, columns: Sequence[str], rows: list[list[str]], title: str | None) -> None:
        from rich.table import Table

        table = Table(title=title, show_edge=False, header_style="bold")
        for name in columns:
            table.add_column(name, overflow="fold")
        for row in rows:
            table.add_row(*row)
        self.console().print(table)

    def console(self) -> Any:
        """A rich Console for stdout with markup, emoji and highlighting off."""
        from rich.console import Console

        return Console(file=sys.stdout, no_color=self.no_color, markup=False, emoji=False,
                       highlight=False, soft_wrap=False)
