"""``qctl control COMMAND [ARGS]...``: change the running workers (Celery's ``celery control``).

Commands and their positional arguments, as Celery's:

- ``rate_limit TASK RATE`` (``10/m``, ``100/s``, ``5/h``, ``3``; ``0`` removes the limit),
- ``time_limit TASK SOFT [HARD]`` (seconds; note the order: soft first),
- ``revoke ID... [--terminate] [--signal SIG]`` and ``terminate SIG ID...``,
- ``enable_events``, ``disable_events``, ``heartbeat``,
- ``add_consumer QUEUE [EXCHANGE [TYPE [ROUTING_KEY]]]``, ``cancel_consumer QUEUE``,
- ``pool_grow [N]``, ``pool_shrink [N]`` (N defaults to 1), ``autoscale MAX MIN``,
- ``pool_restart``, ``shutdown``.

Every argument is checked before anything is sent: a bad rate, number or signal prints one
``Error: ...`` line and exits 2 without contacting the broker; a wrong number of arguments or
an unknown command is click's usage error (exit 2) listing what is expected.

Each node's reply is printed as Celery prints it (``->  w1@host: OK`` then
``        new rate limit set successfully``, or ``ERROR`` and the message), as a rich table on a
colour terminal, or as one JSON object ``{node: reply}`` with ``-j/--json``. Unlike
``inspect`` and ``status`` there is no ``N node(s) online.`` footer.

Exit codes (Celery always exits 0 once someone answered; qctl lets scripts see failures):

- 0: every node that answered said OK;
- 1: some node answered with an error (``unknown task``, ``Autoscale not enabled``...), or a
  node named by ``--destination`` did not answer (a warning names it);
- 69 (``UNAVAILABLE``): no node answered within ``--timeout``:
  ``Error: No nodes replied within time constraint``.

``shutdown`` is the exception: a worker stops without answering (as Celery's do), so silence
is not an error there: qctl prints a note on stderr and exits 0 (check with ``qctl status``).
"""
from __future__ import annotations

import signal as _signal
from typing import Any

import click

from .complete import remote_arguments, remote_command_names
from .context import CliContext
from .inspect import (Arg, RemoteCommand, bad_value, check_options, commands_help, finish,
                      lookup, print_command_list, remote_options, to_count, to_float)
from .params import RateLimit

__all__ = ["control", "CONTROL_COMMANDS", "to_rate", "to_signal"]

EXCHANGE_TYPES = ("direct", "topic", "fanout", "headers")

SHUTDOWN_SENT = ("Shutdown sent; workers stop without replying (check with 'qctl status').")


def to_rate(value: str, what: str = "RATE") -> str:
    """A rate string checked with the shared ``RateLimit`` type; one error line when bad."""
    try:
        return RateLimit().convert(value, None, None)
    except click.BadParameter as exc:
        bad_value(exc.message)


def to_signal(value: str, what: str = "SIG") -> str:
    """``KILL``, ``sigkill``, ``SIGKILL`` or ``9`` -> ``'SIGKILL'``, the name workers expect."""
    text = str(value).strip().upper()
    if text.isdigit():
        try:
            return _signal.Signals(int(text)).name
        except ValueError:
            bad_value(f"unknown signal number {value!r}")
    name = text if text.startswith("SIG") else f"SIG{text}"
    if name not in _signal.Signals.__members__:
        bad_value(f"unknown signal {value!r} (e.g. TERM, KILL, INT, HUP, USR1)")
    return name


def to_exchange_type(value: str, what: str = "TYPE") -> str:
    if value not in EXCHANGE_TYPES:
        bad_value(f"exchange type must be one of {', '.join(EXCHANGE_TYPES)}, got {value!r}")
    return value


def to_name(value: str, what: str) -> str:
    if not value.strip():
        bad_value(f"{what} must not be empty")
    return value


# -- how each command calls the Python API ---------------------------------------------------
# ``remote`` is {"destination": [...] | None, "reply": True, "timeout": seconds}.


def _rate_limit(control: Any, values: list, options: dict, remote: dict) -> Any:
    task, rate = values
    return control.rate_limit(task, rate, **remote)


def _time_limit(control: Any, values: list, options: dict, remote: dict) -> Any:
    task, soft, *rest = values
    hard = rest[0] if rest else None
    return control.time_limit(task, soft=soft, hard=hard, **remote)


def _revoke(control: Any, values: list, options: dict, remote: dict) -> Any:
    return control.revoke(values[0], terminate=bool(options["--terminate"]),
                          signal=options["--signal"] or "SIGTERM", **remote)


def _terminate(control: Any, values: list, options: dict, remote: dict) -> Any:
    sig, ids = values
    return control.revoke(ids, terminate=True, signal=sig, **remote)


def _add_consumer(control: Any, values: list, options: dict, remote: dict) -> Any:
    queue, *rest = values
    rest += [None] * (3 - len(rest))
    exchange, exchange_type, routing_key = rest
    return control.add_consumer(queue, exchange=exchange, exchange_type=exchange_type or "direct",
                                routing_key=routing_key, **remote)


def _cancel_consumer(control: Any, values: list, options: dict, remote: dict) -> Any:
    return control.cancel_consumer(values[0], **remote)


def _pool(method: str) -> Any:
    def run(control: Any, values: list, options: dict, remote: dict) -> Any:
        n = values[0] if values else 1
        return getattr(control, method)(n=n, **remote)
    return run


def _autoscale(control: Any, values: list, options: dict, remote: dict) -> Any:
    high, low = values
    return control.autoscale(high, low, **remote)


def _check_autoscale(values: list) -> None:
    high, low = values
    if low > high:
        bad_value(f"MIN ({low}) must not be greater than MAX ({high})")


def _plain(method: str) -> Any:
    return lambda control, values, options, remote: getattr(control, method)(**remote)


def _count_or_zero(value: str, what: str) -> int:
    return to_count(value, what, minimum=0)


CONTROL_COMMANDS: dict[str, RemoteCommand] = {c.name: c for c in (
    RemoteCommand("rate_limit", "Set a task's rate limit (10/m, 100/s, 5/h; 0 removes it).",
                  _rate_limit, args=(Arg("TASK", to_name), Arg("RATE", to_rate))),
    RemoteCommand("time_limit", "Set a task's soft and hard time limits, in seconds.",
                  _time_limit, args=(Arg("TASK", to_name), Arg("SOFT", to_float),
                                     Arg("HARD", to_float, required=False))),
    RemoteCommand("revoke", "Revoke tasks (with --terminate also kill them if running).",
                  _revoke, variadic=Arg("ID", to_name), options=("--terminate", "--signal")),
    RemoteCommand("terminate", "Revoke tasks and kill them with signal SIG if running.",
                  _terminate, args=(Arg("SIG", to_signal),), variadic=Arg("ID", to_name)),
    RemoteCommand("enable_events", "Make the workers send task events.",
                  _plain("enable_events")),
    RemoteCommand("disable_events", "Stop the workers' task events.", _plain("disable_events")),
    RemoteCommand("heartbeat", "Make the workers send a heartbeat event now.",
                  _plain("heartbeat")),
    RemoteCommand("add_consumer", "Start consuming from a queue.", _add_consumer,
                  args=(Arg("QUEUE", to_name), Arg("EXCHANGE", to_name, required=False),
                        Arg("TYPE", to_exchange_type, required=False),
                        Arg("ROUTING_KEY", required=False))),
    RemoteCommand("cancel_consumer", "Stop consuming from a queue.", _cancel_consumer,
                  args=(Arg("QUEUE", to_name),)),
    RemoteCommand("pool_grow", "Add N pool processes (default 1).", _pool("pool_grow"),
                  args=(Arg("N", to_count, required=False),)),
    RemoteCommand("pool_shrink", "Remove N pool processes (default 1).", _pool("pool_shrink"),
                  args=(Arg("N", to_count, required=False),)),
    RemoteCommand("autoscale", "Set the autoscaler's maximum and minimum pool size.",
                  _autoscale, args=(Arg("MAX", to_count), Arg("MIN", _count_or_zero)),
                  validate=_check_autoscale),
    RemoteCommand("pool_restart", "Restart the pool processes (needs worker_pool_restarts).",
                  _plain("pool_restart")),
    RemoteCommand("shutdown", "Shut the workers down (warm: running tasks finish).",
                  _plain("shutdown")),
)}


@click.command(help=commands_help(
    "Tell the running workers to change something; print each node's answer.\n\n"
    "Every node obeys, or only those named by -d. Exits 1 when a node answered with an error "
    "or a named node did not answer, 69 when no node answered.", CONTROL_COMMANDS))
@click.argument("command", required=False, metavar="COMMAND",
                shell_complete=remote_command_names(CONTROL_COMMANDS))
@click.argument("arguments", nargs=-1, metavar="[ARGS]...",
                shell_complete=remote_arguments(CONTROL_COMMANDS))
@remote_options
@click.option("--terminate", is_flag=True,
              help="revoke: also terminate the tasks if they are running.")
@click.option("--signal", "signal_name", metavar="SIG",
              help="revoke --terminate: the signal to send (default SIGTERM).")
@click.option("--list", "list_commands", is_flag=True, help="List the commands and exit.")
@click.pass_obj
def control(obj: CliContext, command: str | None, arguments: tuple[str, ...],
            destination: list[str] | None, timeout: float, as_json: bool, terminate: bool,
            signal_name: str | None, list_commands: bool) -> None:
    if list_commands:
        print_command_list(obj, CONTROL_COMMANDS)
        return
    spec = lookup(CONTROL_COMMANDS, command, "control")
    options: dict[str, Any] = {"--terminate": terminate, "--signal": signal_name}
    check_options(spec, {k: bool(v) for k, v in options.items()})
    values = spec.parse(arguments)  # everything is checked before the app is even loaded
    if signal_name is not None:
        options["--signal"] = to_signal(signal_name)
        if not terminate:
            obj.out.warn("--signal only matters with --terminate")
    remote = {"destination": destination, "reply": True, "timeout": timeout}
    replies = spec.run(obj.app.control, values, options, remote)
    finish(obj, replies, command=spec.name, as_json=as_json, destination=destination,
           footer=False, allow_silence=SHUTDOWN_SENT if spec.name == "shutdown" else None)
