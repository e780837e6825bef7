"""``qctl report``: what to paste into a bug report (Celery's ``celery report``).

Versions, platform, the app, the broker and result URLs and the changed settings, with every
password and key hidden. It never connects to the broker, so it also works when the broker is
the problem.
"""
from __future__ import annotations

import platform
import sys

import click

from .. import __version__
from .context import CliContext


def _field(label: str, lines: list[str]) -> str:
    pad = " " * 12
    return f"{label:<8} -> " + f"\n{pad}".join(lines)


@click.command()
@click.pass_obj
def report(obj: CliContext) -> None:
    """Print versions, platform, app, broker and settings (secrets hidden) for bug reports."""
    app = obj.app
    conf = app.conf
    python = f"{platform.python_version()} ({platform.python_implementation()})"
    tasks = sorted(app.tasks.regular())
    lines = [
        _field("software", [f"qctl:{__version__} python:{python}"]),
        _field("platform", [f"system:{platform.system()} arch:{platform.machine()}",
                            f"kernel version:{platform.release()} executable:{sys.executable}"]),
        _field("app", [f"{app.main or 'default'} (-A {obj.app_spec})" if obj.app_spec
                       else "default (no -A given)"]),
        _field("settings", [f"transport:{app.safe_broker_url.split('://', 1)[0]} "
                            f"results:{app.safe_result_backend.split('://', 1)[0]}"]),
        _field("broker", [app.safe_broker_url]),
        _field("results", [app.safe_result_backend]),
        _field("tasks", [f"{len(tasks)} registered"]),
        "",
    ]
    obj.out.print("\n".join(lines))
    obj.out.print(conf.humanize(with_defaults=False, censored=True))
