"""``qctl inspect COMMAND [ARGS]...``: ask the running workers what they are doing.

``ping``, ``stats``, ``active``, ``reserved``, ``scheduled``, ``revoked``, ``registered``,
``active_queues``, ``query_task ID...``, ``conf [--with-defaults]``, ``report`` and ``clock``
go to every node, or to ``-d/--destination n1@host,n2@host``, through
``app.control.inspect(destination, timeout)``; the replies are collected until every expected
node has answered or ``-t/--timeout`` seconds (default 1.0) have passed.

Output, as Celery's ``celery inspect``:

- plain text (not a terminal, ``--no-color``, ``NO_COLOR``): Celery's exact format, one
  ``->  node: OK`` (or ``ERROR``) line per node, its reply indented below (``        pong``,
  ``    * item``, ``    - empty -``, dicts as 4-space-indented sorted JSON), then a blank line
  and ``N node(s) online.`` (the footer is left out with ``-q``);
- on a colour terminal, a rich table per node (one table for all nodes when every reply is a
  single value, as for ``ping``);
- ``-j/--json``: one JSON object ``{node: reply, ...}``.

Exit codes: 0 when every node answered without an error; 1 when a node answered with an
``{"error": ...}`` reply, or a node named by ``--destination`` did not answer (a warning names
it); 69 (``UNAVAILABLE``) with ``Error: No nodes replied within time constraint`` when no node
answered; 2 for an unknown command or wrong arguments (before anything is sent).

The reply rendering, the common options and the argument machinery here are shared with
``qctl control`` and ``qctl status``.
"""
from __future__ import annotations

import datetime as _dt
import difflib
import json as _json
import math
from dataclasses import dataclass, field
from pprint import pformat
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

import click

from . import exitcodes
from .complete import node_names, remote_command_names
from .context import CliContext, CliError
from .output import _json_default, to_json
from .params import CommaList

__all__ = ["inspect", "INSPECT_COMMANDS", "NO_REPLY", "Arg", "RemoteCommand", "remote_options",
           "flatten_replies", "finish", "pretty", "render_plain"]

#: Celery's message (``celery:celery/bin/control.py``) for "nobody answered".
NO_REPLY = "No nodes replied within time constraint"

#: click's own exit code for a usage error; bad argument values use it too (as one line).
USAGE_ERROR = click.UsageError.exit_code


# -- positional arguments of remote commands -------------------------------------------------


def bad_value(message: str) -> NoReturn:
    """A bad argument value: one ``Error: ...`` line, exit 2, nothing sent."""
    raise CliError(message, USAGE_ERROR)


def to_float(value: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        bad_value(f"{what} must be a number of seconds, got {value!r}")
    if not math.isfinite(number) or number < 0:
        bad_value(f"{what} must be a non-negative number of seconds, got {value!r}")
    return number


def to_count(value: str, what: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except ValueError:
        bad_value(f"{what} must be a whole number, got {value!r}")
    if number < minimum:
        bad_value(f"{what} must be at least {minimum}, got {value!r}")
    return number


_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"0", "false", "no", "n", "off", "f", ""}


def to_bool(value: str, what: str) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    bad_value(f"{what} must be true or false, got {value!r}")


@dataclass(frozen=True)
class Arg:
    """One positional argument of a remote command: its metavar and converter."""

    name: str
    convert: Callable[[str, str], Any] | None = None  # (value, name) -> value; None: a string
    required: bool = True


@dataclass(frozen=True)
class RemoteCommand:
    """A command of ``qctl inspect``/``qctl control``: its arguments, help and how to run it.

    ``run(control, values, options)`` calls the Python API; ``values`` are the converted
    positionals (a variadic argument as one list), ``options`` the command's own flags.
    """

    name: str
    help: str
    run: Callable[..., Any]
    args: tuple[Arg, ...] = ()
    variadic: Arg | None = None  # collects the remaining values (at least one if required)
    options: tuple[str, ...] = field(default=())  # the command-specific flags it accepts
    validate: Callable[[list], None] | None = None  # checks across the converted values

    @property
    def signature(self) -> str:
        parts = []
        depth = 0
        for arg in self.args:
            if arg.required:
                parts.append(arg.name)
            else:
                parts.append(f"[{arg.name}")
                depth += 1
        text = " ".join(parts) + "]" * depth
        if self.variadic is not None:
            more = f"{self.variadic.name}..."
            more = more if self.variadic.required else f"[{more}]"
            text = f"{text} {more}".strip()
        return text

    def parse(self, values: Sequence[str]) -> list[Any]:
        """Check the count and convert ``values``; usage errors name the expected form."""
        values = list(values)
        required = sum(1 for a in self.args if a.required)
        too_many = self.variadic is None and len(values) > len(self.args)
        missing = len(values) < required or (
            self.variadic is not None and self.variadic.required and len(values) <= len(self.args))
        if too_many or missing:
            form = f"{self.name} {self.signature}".strip()
            if not self.args and self.variadic is None:
                raise click.UsageError(f"command {self.name} takes no arguments "
                                       f"(got {' '.join(values)})")
            raise click.UsageError(f"command {self.name} takes arguments: {form}")
        result: list[Any] = []
        for arg, value in zip(self.args, values):
            result.append(arg.convert(value, arg.name) if arg.convert else value)
        if self.variadic is not None:
            rest = values[len(self.args):]
            convert = self.variadic.convert
            result.append([convert(v, self.variadic.name) if convert else v for v in rest])
        if self.validate is not None:
            self.validate(result)
        return result


def lookup(table: Mapping[str, RemoteCommand], name: str | None, kind: str) -> RemoteCommand:
    """The command called ``name``, else click's usage error listing them (as Celery)."""
    available = ", ".join(sorted(table))
    if not name:
        raise click.UsageError(f"Missing argument 'COMMAND'. Available {kind} commands: "
                               f"{available}")
    try:
        return table[name]
    except KeyError:
        pass
    message = f"Command {name} not recognized. Available {kind} commands: {available}"
    close = difflib.get_close_matches(name, list(table), n=1)
    if close:
        message += f". Did you mean {close[0]}?"
    raise click.UsageError(message)


def check_options(command: RemoteCommand, given: Mapping[str, bool]) -> None:
    """Reject a command-specific flag (``--terminate``) given to a command without it."""
    for flag, used in given.items():
        if used and flag not in command.options:
            raise click.UsageError(f"{flag} cannot be used with {command.name}")


def print_command_list(obj: CliContext, table: Mapping[str, RemoteCommand]) -> None:
    """``--list``: Celery's ``|- name ARGS: help`` lines."""
    for name in sorted(table):
        command = table[name]
        signature = f" {command.signature}" if command.signature else ""
        obj.out.print(f"|- {name}{signature}: {command.help}")


def commands_help(intro: str, table: Mapping[str, RemoteCommand]) -> str:
    """The command's --help text: ``intro``, then the table of remote commands."""
    width = max(len(f"{c.name} {c.signature}".strip()) for c in table.values())
    lines = [f"  {f'{c.name} {c.signature}'.strip():<{width}}  {c.help}"
             for c in sorted(table.values(), key=lambda c: c.name)]
    return intro + "\n\n\b\nCommands:\n" + "\n".join(lines)


def remote_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """``-d/--destination``, ``-t/--timeout`` and ``-j/--json``: every remote-control command."""
    function = click.option(
        "-j", "--json", "as_json", is_flag=True,
        help="Print the replies as one JSON object {node: reply, ...}.")(function)
    function = click.option(
        "-t", "--timeout", type=click.FloatRange(min=0, min_open=True), default=1.0,
        show_default=True, metavar="SECONDS",
        help="How long to wait for replies (less when every expected node has answered).")(
        function)
    function = click.option(
        "-d", "--destination", type=CommaList(), metavar="NODE1,NODE2", shell_complete=node_names,
        help="Only these nodes (comma-separated names like w1@host); default: all.")(function)
    return function


# -- replies ---------------------------------------------------------------------------------


def flatten_replies(replies: Any) -> dict[str, Any]:
    """``[{node: reply}, ...]`` (or ``{node: reply}``, or None) as one ``{node: reply}``."""
    if not replies:
        return {}
    if isinstance(replies, Mapping):
        return dict(replies)
    merged: dict[str, Any] = {}
    for item in replies:
        if isinstance(item, Mapping):
            merged.update(item)
    return merged


def reply_status(reply: Any) -> str:
    """``OK`` or ``ERROR``: Celery reads ``{"ok": ...}`` first, then ``{"error": ...}``."""
    if isinstance(reply, Mapping) and "ok" not in reply and "error" in reply:
        return "ERROR"
    return "OK"


def indent(text: str, n: int) -> str:
    """``celery.utils.text.indent``: every line (empty ones too) prefixed by ``n`` spaces."""
    return "\n".join(" " * n + line for line in text.split("\n"))


def pretty_list(items: list) -> str:
    if not items:
        return "- empty -"
    return "\n".join(f"* {item}" for item in items)


def pretty(value: Any) -> tuple[str, str]:
    """``(status, text)`` for one reply: Celery's ``CLIContext.pretty`` without colours."""
    if isinstance(value, list):
        return "OK", pretty_list(value)
    if isinstance(value, Mapping):
        if "ok" in value or "error" in value:
            key = "ok" if "ok" in value else "error"
            return ("OK" if key == "ok" else "ERROR"), indent(pretty(value[key])[1], 4)
        return "OK", _json.dumps(value, sort_keys=True, indent=4, default=_json_default)
    if isinstance(value, str):
        return "OK", value
    return "OK", pformat(value)


def render_plain(obj: CliContext, replies: Mapping[str, Any], show_reply: bool = True) -> None:
    """Celery's text: ``->  node: STATUS`` and, with ``show_reply``, the reply under it."""
    for node in sorted(replies):
        status, text = pretty(replies[node])
        obj.out.print(f"->  {node}: {status}")
        if show_reply:
            obj.out.print(indent(text, 4))


# -- rich tables (colour terminals) ----------------------------------------------------------


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return to_json(value)


def when(timestamp: Any) -> str:
    """An epoch ``time_start`` as local ``YYYY-MM-DD HH:MM:SS``."""
    if isinstance(timestamp, (int, float)) and not isinstance(timestamp, bool):
        try:
            return _dt.datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")
        except (OverflowError, OSError, ValueError):
            pass
    return cell(timestamp)


def _request_row(info: Mapping[str, Any]) -> list[str]:
    return [cell(info.get("id")), cell(info.get("name") or info.get("type")),
            cell(info.get("args")), cell(info.get("kwargs"))]


def _task_rows(items: list) -> tuple[list[str], list[list[str]]]:
    rows = [[*_request_row(i), when(i.get("time_start")), cell(i.get("worker_pid"))]
            for i in items]
    return ["ID", "Task", "Args", "Kwargs", "Started", "PID"], rows


def _scheduled_rows(items: list) -> tuple[list[str], list[list[str]]]:
    rows = []
    for item in items:
        request = item.get("request") or {}
        rows.append([cell(item.get("eta")), cell(item.get("priority")),
                     *_request_row(request if isinstance(request, Mapping) else {})])
    return ["ETA", "Priority", "ID", "Task", "Args", "Kwargs"], rows


def _queue_rows(items: list) -> tuple[list[str], list[list[str]]]:
    rows = []
    for queue in items:
        exchange = queue.get("exchange") or {}
        if not isinstance(exchange, Mapping):
            exchange = {"name": exchange}
        rows.append([cell(queue.get("name")), cell(exchange.get("name")),
                     cell(exchange.get("type")), cell(queue.get("routing_key"))])
    return ["Queue", "Exchange", "Type", "Routing key"], rows


def _query_rows(value: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for task_id, entry in value.items():
        state, info = (list(entry) + [None, None])[:2] if isinstance(entry, (list, tuple)) \
            else (entry, None)
        info = info if isinstance(info, Mapping) else {}
        rows.append([cell(task_id), cell(state), cell(info.get("name") or info.get("type")),
                     cell(info.get("args")), cell(info.get("kwargs"))])
    return ["ID", "State", "Task", "Args", "Kwargs"], rows


_LIST_TABLES: dict[str, Callable[[list], tuple[list[str], list[list[str]]]]] = {
    "active": _task_rows, "reserved": _task_rows, "scheduled": _scheduled_rows,
    "active_queues": _queue_rows,
}
_ITEM_COLUMN = {"registered": "Task", "revoked": "Task ID"}


def flat_items(value: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """Nested dicts as dotted keys (``pool.max-concurrency``), for a Key/Value table."""
    for key in sorted(value, key=str):
        item = value[key]
        name = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            yield from flat_items(item, f"{name}.")
        else:
            yield name, item


def tabulate(command: str, value: Any) -> tuple[list[str], list[list[str]]]:
    """Columns and rows showing one node's reply to ``command``."""
    if isinstance(value, list):
        if not value:
            return ["Reply"], [["- empty -"]]
        if all(isinstance(i, Mapping) for i in value):
            if command in _LIST_TABLES:
                return _LIST_TABLES[command](value)
            columns: list[str] = []
            for item in value:
                columns += [str(k) for k in item if str(k) not in columns]
            return columns, [[cell(item.get(c)) for c in columns] for item in value]
        return [_ITEM_COLUMN.get(command, "Item")], [[cell(i)] for i in value]
    if isinstance(value, Mapping):
        if not value:
            return ["Reply"], [["- empty -"]]
        if command == "query_task":
            return _query_rows(value)
        return ["Key", "Value"], [[k, cell(v)] for k, v in flat_items(value)]
    return ["Reply"], [[cell(value)]]


def unwrap(reply: Any) -> Any:
    """The value inside ``{"ok": v}`` / ``{"error": v}``, else the reply itself."""
    if isinstance(reply, Mapping) and ("ok" in reply or "error" in reply):
        return reply["ok"] if "ok" in reply else reply["error"]
    return reply


def is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def render_rich(obj: CliContext, replies: Mapping[str, Any], command: str,
                show_reply: bool = True) -> None:
    """Tables: one for all nodes when each reply is a single value, else one per node."""
    nodes = sorted(replies)
    if not show_reply:
        obj.out.table(["Node", "Status"], [[n, reply_status(replies[n])] for n in nodes])
        return
    if all(is_scalar(unwrap(replies[n])) for n in nodes):
        obj.out.table(["Node", "Status", "Reply"],
                      [[n, reply_status(replies[n]), cell(unwrap(replies[n]))] for n in nodes])
        return
    for i, node in enumerate(nodes):
        if i:
            obj.out.print()
        columns, rows = tabulate(command, unwrap(replies[node]))
        obj.out.table(columns, rows, title=f"{node}: {reply_status(replies[node])}")


# -- the common ending -----------------------------------------------------------------------


def finish(obj: CliContext, replies: Any, *, command: str, as_json: bool,
           destination: Sequence[str] | None, show_reply: bool = True, footer: bool = True,
           allow_silence: str | None = None) -> None:
    """Print ``replies`` and exit with the code the module docstrings describe.

    ``allow_silence``: a message to print (exit 0) instead of the no-reply error, for commands
    a worker does not answer (``shutdown``).
    """
    replies = flatten_replies(replies)
    if not replies:
        if allow_silence is None:
            raise CliError(NO_REPLY, exitcodes.UNAVAILABLE)
        if as_json:
            obj.out.json({})
        else:
            obj.out.info(allow_silence, err=True)
        return
    if as_json:
        obj.out.json(replies)
    elif obj.out.rich_enabled:
        render_rich(obj, replies, command, show_reply=show_reply)
    else:
        render_plain(obj, replies, show_reply=show_reply)
    if footer and not as_json:
        obj.out.info()
        obj.out.info(f"{len(replies)} node(s) online.")
    code = exitcodes.OK
    if any(reply_status(r) == "ERROR" for r in replies.values()):
        code = exitcodes.FAILURE
    missing = [n for n in (destination or ()) if n not in replies]
    if missing and allow_silence is None:
        obj.out.warn(f"no reply from {', '.join(missing)} within the timeout")
        code = exitcodes.FAILURE
    if code:
        raise click.exceptions.Exit(code)


# -- qctl inspect ----------------------------------------------------------------------------


def _simple(method: str) -> Callable[..., Any]:
    return lambda inspector, values, options: getattr(inspector, method)()


def _registered(inspector: Any, values: list, options: dict) -> Any:
    return inspector.registered(*values[0])


def _query_task(inspector: Any, values: list, options: dict) -> Any:
    return inspector.query_task(*values[0])


def _conf(inspector: Any, values: list, options: dict) -> Any:
    with_defaults = options.get("--with-defaults") or bool(values and values[0])
    return inspector.conf(with_defaults=with_defaults)


def _table(*commands: RemoteCommand) -> dict[str, RemoteCommand]:
    return {c.name: c for c in commands}


INSPECT_COMMANDS: dict[str, RemoteCommand] = _table(
    RemoteCommand("ping", "Ping the workers.", _simple("ping")),
    RemoteCommand("stats", "Worker statistics: pool, broker, totals per task, rusage.",
                  _simple("stats")),
    RemoteCommand("active", "Tasks being executed right now.", _simple("active")),
    RemoteCommand("reserved", "Tasks received and waiting to run (not active, not scheduled).",
                  _simple("reserved")),
    RemoteCommand("scheduled", "Tasks waiting for their ETA or countdown.", _simple("scheduled")),
    RemoteCommand("revoked", "Ids of revoked tasks.", _simple("revoked")),
    RemoteCommand("registered", "Registered task names (and these task attributes).",
                  _registered,
                  variadic=Arg("ATTR", required=False)),
    RemoteCommand("active_queues", "Queues the workers consume from.", _simple("active_queues")),
    RemoteCommand("query_task", "State of tasks by id (active, reserved, scheduled, ready).",
                  _query_task, variadic=Arg("ID")),
    RemoteCommand("conf", "The workers' configuration (changed settings; all with "
                          "--with-defaults).",
                  _conf, args=(Arg("include_defaults", to_bool, required=False),),
                  options=("--with-defaults",)),
    RemoteCommand("report", "Versions and settings for bug reports.", _simple("report")),
    RemoteCommand("clock", "The workers' logical clock values.", _simple("clock")),
)


@click.command(help=commands_help(
    "Ask the running workers something; print each node's reply.\n\n"
    "Every node answers, or only those named by -d. Exits 69 when no node replied, 1 when a "
    "node replied with an error or a named node did not reply.", INSPECT_COMMANDS))
@click.argument("command", required=False, metavar="COMMAND",
                shell_complete=remote_command_names(INSPECT_COMMANDS))
@click.argument("arguments", nargs=-1, metavar="[ARGS]...")
@remote_options
@click.option("--with-defaults", is_flag=True,
              help="conf: include the settings left at their defaults.")
@click.option("--list", "list_commands", is_flag=True, help="List the commands and exit.")
@click.pass_obj
def inspect(obj: CliContext, command: str | None, arguments: tuple[str, ...],
            destination: list[str] | None, timeout: float, as_json: bool, with_defaults: bool,
            list_commands: bool) -> None:
    if list_commands:
        print_command_list(obj, INSPECT_COMMANDS)
        return
    spec = lookup(INSPECT_COMMANDS, command, "inspect")
    options = {"--with-defaults": with_defaults}
    check_options(spec, options)
    values = spec.parse(arguments)  # everything is checked before the app is even loaded
    inspector = obj.app.control.inspect(destination=destination, timeout=timeout)
    replies = spec.run(inspector, values, options)
    finish(obj, replies, command=spec.name, as_json=as_json, destination=destination)
