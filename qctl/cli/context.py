"""``CliContext``, the one object every command receives (``click.pass_obj``), and ``-A`` lookup.

It holds the global options, owns the ``Output``, and loads the app only when a command first
asks for ``obj.app``, so ``--help`` and commands that need no app never import user code.
``CliError`` is the one way a command stops with a message and a named exit code.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from types import ModuleType
from typing import Any, NoReturn

import click

from ..app import App
from ..conf import mask_url
from ..exceptions import ImproperlyConfigured
from . import exitcodes
from .output import Output


def debug_enabled() -> bool:
    """``QCTL_DEBUG=1``: show tracebacks instead of hiding them behind one-line errors."""
    return os.environ.get("QCTL_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def one_line(message: Any) -> str:
    """``message`` on one line with URL passwords masked: what every error prints."""
    text = " ".join(str(message).split())
    return mask_url(text)


class CliError(click.ClickException):
    """Stop the command: ``Error: <message>`` on stderr, exit ``exit_code``."""

    def __init__(self, message: Any, exit_code: int = exitcodes.FAILURE) -> None:
        super().__init__(one_line(message))
        self.exit_code = exit_code


class AppNotFound(Exception):
    """``-A`` named something that exists but is not (or does not hold) one qctl App."""


# -- -A resolution --------------------------------------------------------------------------


def _import_module_or_attr(name: str) -> Any:
    """Import ``name``; for ``pkg.mod.attr`` where only ``pkg.mod`` is a module, the attribute."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        parent, _, attr = name.rpartition(".")
        if not parent or exc.name != name:  # something else is missing: report that
            raise
        module = importlib.import_module(parent)
        if not hasattr(module, attr):
            raise
        return getattr(module, attr)


def _app_in_module(module: ModuleType) -> App | None:
    """``module.app`` if it is an App, else the module's only App; None when it has none."""
    candidate = getattr(module, "app", None)
    if isinstance(candidate, App):
        return candidate
    found: dict[int, list[str]] = {}
    for name, value in vars(module).items():
        if isinstance(value, App) and not name.startswith("__"):
            found.setdefault(id(value), []).append(name)
    if len(found) > 1:
        names = ", ".join(sorted(n for group in found.values() for n in group))
        raise AppNotFound(f"module {module.__name__!r} has several qctl apps ({names}); "
                          f"choose one with -A {module.__name__}:NAME")
    if found:
        return getattr(module, next(iter(found.values()))[0])
    return None


def find_app(spec: str) -> App:
    """The App that ``-A spec`` names, as Celery resolves ``-A``.

    ``module:attr`` -> that attribute; ``module`` -> its ``app`` attribute, else its only App,
    else the same search in the submodule ``module.qctl`` (then ``module.celery``). The current directory is put at
    the front of ``sys.path`` first, so ``-A proj`` finds ``./proj.py`` as it does in Celery.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module_name, colon, attr = spec.partition(":")
    if colon:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise AppNotFound(f"module {module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if not isinstance(obj, App):
            raise AppNotFound(f"{spec!r} is not a qctl App (got {type(obj).__name__})")
        return obj
    obj = _import_module_or_attr(module_name)
    if isinstance(obj, App):
        return obj
    if not isinstance(obj, ModuleType):
        raise AppNotFound(f"{spec!r} is not a qctl App (got {type(obj).__name__})")
    app = _app_in_module(obj)
    # Then the submodule `pkg.qctl`; `pkg.celery` last, for projects migrating from Celery
    # that kept their `proj/celery.py` and now build a qctl App (`from qctl import Celery`).
    for submodule in ("qctl", "celery"):
        if app is not None or not hasattr(obj, "__path__"):
            break
        name = f"{obj.__name__}.{submodule}"
        try:
            sub = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
        else:
            app = _app_in_module(sub)
    if app is None:
        raise AppNotFound(f"no qctl App in module {module_name!r} (looked for 'app', a single "
                          f"App instance, and the submodules {module_name}.qctl and "
                          f"{module_name}.celery)")
    return app


def _describe_import_error(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        where = f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
        return f"SyntaxError: {exc.msg}{where}"
    if isinstance(exc, (ImportError, AppNotFound)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# -- the context ----------------------------------------------------------------------------


class CliContext:
    """Global options, the lazily loaded app, and the output of one ``qctl`` invocation."""

    def __init__(self, app: str | None = None, broker: str | None = None,
                 result_backend: str | None = None, config: str | None = None,
                 workdir: str | None = None, no_color: bool = False, quiet: bool = False) -> None:
        self.app_spec = app or None
        self.broker = broker or None
        self.result_backend = result_backend or None
        self.config = config or None
        self.workdir = workdir
        self.out = Output(no_color=no_color, quiet=quiet)
        self.no_color = self.out.no_color
        self.quiet = quiet
        self._app: App | None = None

    def export_environment(self) -> None:
        """Make ``-b``/``--result-backend`` win everywhere, as Celery's ``-b`` does: over the
        app's settings and ``QCTL_BROKER_URL`` here, and in every process we start (worker
        children, detached nodes), which inherit the environment."""
        if self.broker:
            os.environ["QCTL_BROKER_URL"] = self.broker
        if self.result_backend:
            os.environ["QCTL_RESULT_BACKEND"] = self.result_backend

    @property
    def app(self) -> App:
        """The app named by ``-A`` (or the default one), configured and finalized."""
        if self._app is None:
            self._app = self._load_app()
        return self._app

    @property
    def app_loaded(self) -> bool:
        return self._app is not None

    def _load_app(self) -> App:
        if self.app_spec:
            try:
                app = find_app(self.app_spec)
            except Exception as exc:
                self._app_error(exc)
        else:
            # Nothing named: the embedded SQLite broker in the working directory (§3).
            app = App()
        if self.config:
            try:
                app.config_from_object(self.config)
            except ImproperlyConfigured as exc:
                raise CliError(exc, exitcodes.USAGE) from exc
        if self.broker:
            app.conf["broker_url"] = self.broker
        if self.result_backend:
            app.conf["result_backend"] = self.result_backend
        try:
            app.finalize()  # imports `include`: user code, whose errors are loading errors
        except Exception as exc:
            self._app_error(exc)
        return app

    def _app_error(self, exc: BaseException) -> NoReturn:
        if debug_enabled():
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        name = self.app_spec or "default"
        raise CliError(f"cannot load app {name!r}: {_describe_import_error(exc)}",
                       exitcodes.USAGE) from exc

    def abort(self, message: Any, exit_code: int = exitcodes.FAILURE) -> NoReturn:
        """Stop with ``Error: message`` on stderr and ``exit_code``."""
        raise CliError(message, exit_code)

    def close(self) -> None:
        """Release the app's connections, if it was loaded (end of the command)."""
        if self._app is not None:
            try:
                self._app.close()
            except Exception:  # closing must never turn success into failure
                pass
