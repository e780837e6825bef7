"""The ``qctl`` command: the root group, its global options, lazy subcommands, error handling.

``main`` is the console script (and ``python -m qctl``). Subcommands live one per module in
this package and are imported only when looked up, so ``qctl --help`` and shell completion
never import the worker runtime. Every error a user can cause ends here as one
``Error: ...`` line on stderr and a named exit code (``exitcodes``); a traceback is shown only
with ``QCTL_DEBUG=1``.
"""
from __future__ import annotations

import errno
import importlib
import os
from typing import Any

import click

from .. import __version__
from ..exceptions import (ContentDisallowed, DecodeError, ImproperlyConfigured, NotRegistered,
                          OperationalError, QctlError, TimeoutError as QctlTimeoutError)
from . import exitcodes
from .context import CliContext, CliError, debug_enabled, one_line

__all__ = ["main", "cli", "CliContext", "CliError", "COMMANDS"]

#: Subcommand name -> ``module:attribute``. Later commands (inspect, control, status, multi,
#: beat, events, completion) are added here and nowhere else.
COMMANDS: dict[str, str] = {
    "beat": "qctl.cli.beat:beat",
    "call": "qctl.cli.call:call",
    "completion": "qctl.cli.completion:completion",
    "control": "qctl.cli.control:control",
    "dead": "qctl.cli.dead:dead",
    "events": "qctl.cli.events:events",
    "inspect": "qctl.cli.inspect:inspect",
    "multi": "qctl.cli.multi:multi",
    "purge": "qctl.cli.purge:purge",
    "report": "qctl.cli.report:report",
    "result": "qctl.cli.result:result",
    "status": "qctl.cli.status:status",
    "worker": "qctl.cli.worker:worker",
}

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


def error_for(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for an exception a user can cause."""
    if isinstance(exc, OperationalError):
        return str(exc) or "the broker cannot be reached", exitcodes.UNAVAILABLE
    if isinstance(exc, ImproperlyConfigured):
        return str(exc), exitcodes.CONFIG
    if isinstance(exc, QctlTimeoutError):
        return str(exc) or "timed out", exitcodes.TEMPFAIL
    if isinstance(exc, (ContentDisallowed, DecodeError)):
        return str(exc), exitcodes.DATAERR
    if isinstance(exc, NotRegistered):
        return f"task {exc} is not registered", exitcodes.FAILURE
    if isinstance(exc, QctlError):
        return str(exc) or type(exc).__name__, exitcodes.FAILURE
    if isinstance(exc, OSError):  # permissions, missing folders, full disks: not our bug
        return str(exc), exitcodes.FAILURE
    return (f"unexpected {type(exc).__name__}: {exc} (run with QCTL_DEBUG=1 to see the traceback)",
            exitcodes.SOFTWARE)


class QctlGroup(click.Group):
    """A group whose subcommands are imported on first lookup (click's LazyGroup pattern),
    and which turns every exception escaping a command into one line and an exit code."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_subcommands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, _, attr = target.partition(":")
        return getattr(importlib.import_module(module_name), attr)

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:
        # "qctl" also under `python -m qctl`, so usage lines and completion variables match.
        return super().main(args, prog_name=prog_name or "qctl", **extra)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, EOFError):
            raise  # click prints these itself (usage errors, --help, aborted prompts)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise  # `qctl ... | head`: click exits quietly on a closed pipe
            self._convert(exc)
        except Exception as exc:
            self._convert(exc)

    @staticmethod
    def _convert(exc: Exception) -> None:
        message, code = error_for(exc)
        if debug_enabled():
            if code == exitcodes.SOFTWARE:
                raise exc  # a bug: the full traceback, as Python prints it
            import traceback
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        raise CliError(one_line(message), code) from exc


@click.group(cls=QctlGroup, lazy_subcommands=COMMANDS, context_settings=CONTEXT_SETTINGS)
@click.option("-A", "--app", "app", envvar="QCTL_APP", show_envvar=True, metavar="MODULE[:ATTR]",
              help="The application: 'proj' (its 'app', its only App, or proj.qctl's), "
                   "'proj.tasks:app'. Default: an app on the embedded qctl.sqlite3 broker.")
@click.option("-b", "--broker", metavar="URL",
              help="Broker URL; wins over the app's broker_url and QCTL_BROKER_URL.")
@click.option("--result-backend", metavar="URL",
              help="Result backend URL; wins over result_backend and QCTL_RESULT_BACKEND.")
@click.option("--config", metavar="MODULE",
              help="Configuration module loaded with app.config_from_object().")
@click.option("--workdir", type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Change to this directory before loading the app.")
@click.option("--no-color", is_flag=True, help="Plain output, no colours (also: NO_COLOR=1).")
@click.option("-q", "--quiet", is_flag=True, help="Print only results and errors.")
@click.version_option(__version__, "--version", prog_name="qctl", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context, app: str | None, broker: str | None, result_backend: str | None,
         config: str | None, workdir: str | None, no_color: bool, quiet: bool) -> None:
    """qctl: a distributed task queue with an operations-first command line.

    Commands and options follow Celery's: `qctl -A proj worker -l INFO` starts a worker,
    `qctl call proj.add --args '[2, 2]'` sends a task. With no broker configured anywhere,
    everything uses qctl.sqlite3 in the working directory.
    """
    ctx.meta["qctl.start_cwd"] = os.getcwd()   # a node restarting in place (HUP) returns here
    if workdir:
        os.chdir(workdir)
    obj = CliContext(app=app, broker=broker, result_backend=result_backend, config=config,
                     workdir=workdir, no_color=no_color, quiet=quiet)
    obj.export_environment()
    ctx.obj = obj
    ctx.call_on_close(obj.close)


#: The root group under the name click's docs and tests usually give it.
cli = main
