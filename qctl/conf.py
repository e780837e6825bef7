"""Settings: the one table of defaults, the precedence rules, and censored views.

Precedence, highest first: ``QCTL_*`` environment variables, changes made at run time
(``conf.update``, ``conf.x = ...``, ``App(broker=...)``), the config module
(``config_from_object``), the defaults below. Names are Celery 4+'s lower-case settings.
"""
from __future__ import annotations

import importlib
import os
import re
from datetime import timedelta
from typing import Any, Iterator, Mapping, MutableMapping

#: The embedded default broker and result store, used when nothing else is configured.
DEFAULT_SQLITE_URL = "sqlite:///qctl.sqlite3"

DEFAULTS: dict[str, Any] = {
    "broker_url": None,
    "broker_transport_options": {},
    "broker_connection_retry_on_startup": True,
    "broker_connection_max_retries": 100,
    "broker_heartbeat": 120,
    "result_backend": None,
    "result_serializer": "json",
    "result_accept_content": None,
    "result_expires": timedelta(days=1),
    "result_extended": False,
    "result_persistent": None,
    "result_backend_transport_options": {},
    "task_serializer": "json",
    "task_compression": None,
    "accept_content": ["json"],
    "timezone": None,
    "enable_utc": True,
    "task_acks_late": False,
    "task_acks_on_failure_or_timeout": True,
    "task_reject_on_worker_lost": False,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_default_queue": "celery",
    "task_default_exchange": None,
    "task_default_exchange_type": "direct",
    "task_default_routing_key": None,
    "task_default_priority": None,
    "task_default_delivery_mode": "persistent",
    "task_default_rate_limit": None,
    "task_routes": None,
    "task_queues": None,
    "task_create_missing_queues": True,
    "task_annotations": None,
    "task_ignore_result": False,
    "task_store_errors_even_if_ignored": False,
    "task_track_started": False,
    "task_always_eager": False,
    "task_eager_propagates": False,
    "task_publish_retry": True,
    "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0,
                                  "interval_step": 0.2, "interval_max": 0.2},
    "task_send_sent_event": False,
    "task_max_deliveries": 3,
    "worker_concurrency": None,
    "worker_pool": "prefork",
    "worker_prefetch_multiplier": 4,
    "worker_max_tasks_per_child": None,
    "worker_max_memory_per_child": None,
    "worker_send_task_events": False,
    "worker_hijack_root_logger": True,
    "worker_log_format": "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s",
    "worker_task_log_format": ("[%(asctime)s: %(levelname)s/%(processName)s] "
                               "%(task_name)s[%(task_id)s]: %(message)s"),
    "worker_state_db": None,
    "worker_shutdown_timeout": None,
    "worker_pool_restarts": False,
    "worker_lost_wait": 10.0,
    "beat_schedule": {},
    "beat_schedule_filename": "qctl-beat-schedule",
    "beat_max_loop_interval": 300,
    "beat_lease_name": "qctl.beat",
    "beat_lease_ttl": 6.0,
    "control_exchange": "celery",
    "event_exchange": "celeryev",
    "event_queue_prefix": "celeryev",
    "security_key": None,
    "include": [],
    "imports": [],
}

#: Environment variables that always win over the app's own values.
ENV_OVERRIDES = {"broker_url": "QCTL_BROKER_URL", "result_backend": "QCTL_RESULT_BACKEND"}

_SECRET = re.compile(r"API|TOKEN|KEY|SECRET|PASS|SIGNATURE|DATABASE|CREDENTIAL", re.I)
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z0-9+.-]+://)(?P<user>[^:@/]*):(?P<pw>[^@/]+)@", re.I)
CENSORED = "********"


def mask_url(url: Any) -> Any:
    """``redis://:secret@h/0`` -> ``redis://:********@h/0``; other values unchanged."""
    if isinstance(url, str):
        return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{CENSORED}@", url)
    return url


def censor(key: str, value: Any) -> Any:
    """The value to show for setting ``key``: secrets hidden, URL passwords masked."""
    if isinstance(value, Mapping):
        if _SECRET.search(key) and not key.endswith("_options"):
            return CENSORED
        return {k: censor(str(k), v) for k, v in value.items()}
    if _SECRET.search(key) and not key.endswith(("_url", "_backend")) and value not in (None, ""):
        return CENSORED
    if isinstance(value, (list, tuple)):
        return type(value)(mask_url(v) for v in value)
    return mask_url(value)


def _coerce(text: str, default: Any) -> Any:
    """Read an environment variable with the type of the setting's default (raises ValueError)."""
    if default is None:  # no type to go by: numbers and booleans as such, else text
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    if isinstance(default, bool):
        return text.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int) and not isinstance(default, bool):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, timedelta):
        return float(text)
    if isinstance(default, (list, tuple)):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


class Settings(MutableMapping):
    """``app.conf``: mapping and attribute access over the layered settings."""

    def __init__(self, changes: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "_defaults", dict(DEFAULTS))
        object.__setattr__(self, "_module", {})
        object.__setattr__(self, "_changes", dict(changes or {}))

    # -- layers -----------------------------------------------------------------------

    def _env(self, key: str) -> Any:
        name = ENV_OVERRIDES.get(key) or "QCTL_" + key.upper()
        value = os.environ.get(name)
        if value is None or value == "":
            return _MISSING
        default = self._defaults.get(key)
        if default is None and key not in ENV_OVERRIDES and key not in self._defaults:
            return _MISSING
        try:
            return _coerce(value, default)
        except ValueError:
            from .exceptions import ImproperlyConfigured
            raise ImproperlyConfigured(f"environment variable {name}={value!r} is not a valid "
                                       f"{type(default).__name__} for setting {key!r}") from None

    def __getitem__(self, key: str) -> Any:
        value = self._env(key)
        if value is not _MISSING:
            return value
        for layer in (self._changes, self._module, self._defaults):
            if key in layer:
                return layer[key]
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._changes[key] = value

    def __delitem__(self, key: str) -> None:
        del self._changes[key]

    def __iter__(self) -> Iterator[str]:
        seen: dict[str, None] = {}
        for layer in (self._changes, self._module, self._defaults):
            seen.update(dict.fromkeys(layer))
        return iter(seen)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"no setting named {key!r}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def update(self, other: Any = (), **kwargs: Any) -> None:  # type: ignore[override]
        self._changes.update(dict(other), **kwargs)

    def setdefault(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            self._defaults[key] = default
        return self[key]

    def load_object(self, obj: Any, namespace: str | None = None) -> None:
        """Replace the config-module layer with the settings found on ``obj``."""
        if isinstance(obj, str):
            obj = import_object(obj)
        if isinstance(obj, Mapping):
            items = dict(obj)
        else:
            items = {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_")}
        prefix = f"{namespace}_" if namespace else ""
        loaded = {}
        for key, value in items.items():
            if prefix:
                if not key.startswith(prefix):
                    continue
                key = key[len(prefix):].lower()
            elif not key.islower():
                continue
            if callable(value) and not isinstance(value, type) and key not in self._defaults:
                continue
            loaded[key] = value
        object.__setattr__(self, "_module", loaded)

    def changes(self) -> dict[str, Any]:
        """Every setting that differs from its default (what ``humanize()`` shows)."""
        return {k: self[k] for k in self if k not in self._defaults or self[k] != self._defaults[k]}

    def table(self, with_defaults: bool = False, censored: bool = True) -> dict[str, Any]:
        """Settings as a dict, secrets censored unless ``censored=False``."""
        items = {k: self[k] for k in self} if with_defaults else self.changes()
        return {k: (censor(k, v) if censored else v) for k, v in sorted(items.items())}

    def humanize(self, with_defaults: bool = False, censored: bool = True) -> str:
        """``key: value`` lines, secrets censored."""
        return "\n".join(f"{k}: {v!r}" for k, v in self.table(with_defaults, censored).items())

    # Shortcuts with the embedded default filled in.
    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or DEFAULT_SQLITE_URL

    @property
    def effective_result_backend(self) -> str:
        backend = self.result_backend
        if backend:
            return backend
        broker = self.broker_url
        if not broker:
            return DEFAULT_SQLITE_URL
        scheme = broker.split("://", 1)[0].lower()
        if scheme in ("sqlite", "memory", "redis", "rediss"):
            return broker
        if scheme in ("amqp", "amqps", "pyamqp"):
            return "rpc://"
        return "disabled://"


class _Missing:
    pass


_MISSING = _Missing()


def import_object(path: str) -> Any:
    """Import ``'pkg.mod'``, ``'pkg.mod:attr'`` or ``'pkg.mod.attr'``."""
    if ":" in path:
        module_name, _, attr = path.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    try:
        return importlib.import_module(path)
    except ImportError:
        module_name, _, attr = path.rpartition(".")
        if not module_name:
            raise
        return getattr(importlib.import_module(module_name), attr)
