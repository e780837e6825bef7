"""click parameter types shared by the commands: JSON arguments, times, rates, lists.

A bad value fails here, as click's usage error (exit 2, no traceback), before any command
touches the broker.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

import click

_RATE = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?:/\s*(?P<unit>[smh]))?\s*$")
_PER_SECOND = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float:
    """``'10/m'`` -> tasks per second (0.1666...); ``'3'`` is per second; ``'0'`` means no limit.
    Raises ``ValueError`` for anything else (Celery's rate-string grammar)."""
    match = _RATE.match(str(text))
    if not match:
        raise ValueError(f"bad rate {text!r}: expected N, N/s, N/m or N/h (e.g. 10/m)")
    return float(match["n"]) / _PER_SECOND[match["unit"] or "s"]


class JSONType(click.ParamType):
    """A JSON document that must be an array (``kind='array'``) or an object (``'object'``)."""

    def __init__(self, kind: str) -> None:
        if kind not in ("array", "object"):
            raise ValueError("kind must be 'array' or 'object'")
        self.kind = kind
        self.name = f"JSON {kind}"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, (list, dict)):  # a default given as a Python value
            return value
        try:
            data = json.loads(value)
        except ValueError as exc:
            self.fail(f"not valid JSON: {exc} (got {value!r})", param, ctx)
        wanted = list if self.kind == "array" else dict
        if not isinstance(data, wanted):
            example = "[2, 2]" if self.kind == "array" else '{"x": 1}'
            self.fail(f"must be a JSON {self.kind} like {example}, got {value!r}", param, ctx)
        return data


class ISODateTime(click.ParamType):
    """An ISO 8601 date and time (``2030-01-01T12:00:00+00:00``; naive means UTC, as in Celery)."""

    name = "ISO-DATETIME"

    def convert(self, value: Any, param: Any, ctx: Any) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            self.fail(f"not an ISO 8601 date and time: {value!r} "
                      "(e.g. 2030-01-01T12:00:00+00:00)", param, ctx)


class SecondsOrDateTime(click.ParamType):
    """A number of seconds from now, or an ISO 8601 date and time (``--expires``)."""

    name = "SECONDS|ISO-DATETIME"

    def convert(self, value: Any, param: Any, ctx: Any) -> float | datetime:
        if isinstance(value, (int, float, datetime)):
            return value
        try:
            seconds = float(value)
        except ValueError:
            return ISODateTime().convert(value, param, ctx)
        if seconds < 0:
            self.fail(f"must not be negative: {value!r}", param, ctx)
        return seconds


class RateLimit(click.ParamType):
    """A rate string: ``10/m``, ``100/s``, ``5/h``, ``3`` (per second), ``0`` (no limit).
    The value stays the (normalized) string, which is what workers and Celery expect."""

    name = "RATE"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            parse_rate(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return re.sub(r"\s+", "", str(value))


class CommaList(click.ParamType):
    """``a,b, c`` -> ``['a', 'b', 'c']`` (empty items dropped)."""

    name = "LIST"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[str]:
        if isinstance(value, (list, tuple)):
            return list(value)
        items = [item.strip() for item in str(value).split(",") if item.strip()]
        if not items:
            self.fail(f"expected a comma-separated list, got {value!r}", param, ctx)
        return items


class Autoscale(click.ParamType):
    """``MAX,MIN`` (or just ``MAX``, MIN then 0) -> ``(max, min)``, as Celery's ``--autoscale``."""

    name = "MAX,MIN"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        try:
            if len(parts) not in (1, 2):
                raise ValueError
            high = int(parts[0])
            low = int(parts[1]) if len(parts) == 2 else 0
        except ValueError:
            self.fail(f"expected MAX,MIN like 10,3, got {value!r}", param, ctx)
        if low < 0 or high < 1 or low > high:
            self.fail(f"need MAX >= MIN >= 0 and MAX >= 1, got {value!r}", param, ctx)
        return high, low


JSON_ARRAY = JSONType("array")
JSON_OBJECT = JSONType("object")


def daemon_options(detach_help: str) -> Any:
    """The options every long-running process (worker, beat) takes for running in the
    background: ``--detach --workdir --uid --gid --umask`` (``--workdir`` arrives as
    ``node_workdir``, apart from the global ``--workdir`` applied before the app loads)."""
    options = [
        click.option("-D", "--detach", is_flag=True, help=detach_help),
        click.option("--workdir", "node_workdir", type=click.Path(file_okay=False), metavar="DIR",
                     help="Change to this directory before opening files (after --detach)."),
        click.option("--uid", metavar="USER", help="Drop privileges to this user (name or id)."),
        click.option("--gid", metavar="GROUP", help="Drop privileges to this group (name or id)."),
        click.option("--umask", metavar="OCTAL", help="File creation mask, e.g. 027."),
    ]

    def decorate(func: Any) -> Any:
        for option in reversed(options):
            func = option(func)
        return func
    return decorate
