"""Settings: defaults, layers and their precedence, config sources, censored views."""
from __future__ import annotations

import os
import sys
import textwrap
import uuid
from datetime import timedelta

import pytest

from qctl import App
from qctl.conf import DEFAULT_SQLITE_URL, DEFAULTS, Settings, mask_url
from qctl.exceptions import ImproperlyConfigured

pytestmark = pytest.mark.timeout(30)

SECRET = "hunter2-s3cr3t"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No QCTL_* variable from the outside may leak into these tests."""
    for name in list(os.environ):
        if name.startswith("QCTL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config_module(tmp_path, monkeypatch):
    """``config_module(source)``: write a uniquely named module and return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    created = []

    def make(source: str) -> str:
        name = f"qctl_test_cfg_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        created.append(name)
        return name

    yield make
    for name in created:
        sys.modules.pop(name, None)


def make_app(**kwargs) -> App:
    return App("conftest", set_as_current=False, **kwargs)


# -- defaults and access --------------------------------------------------------------------


def test_defaults():
    conf = Settings()
    assert conf.broker_url is None
    assert conf.result_backend is None
    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.task_default_queue == "celery"
    assert conf.enable_utc is True
    assert conf.result_expires == timedelta(days=1)
    assert conf.worker_prefetch_multiplier == 4
    assert conf.task_acks_late is False
    assert conf.task_publish_retry is True
    assert set(conf.task_publish_retry_policy) >= {"max_retries", "interval_start",
                                                   "interval_step", "interval_max"}
    assert conf.control_exchange == "celery"
    assert conf.event_exchange == "celeryev"
    assert conf.security_key is None


def test_spec_settings_exist():
    names = """broker_url result_backend task_serializer result_serializer accept_content
    timezone enable_utc result_expires task_acks_late task_reject_on_worker_lost
    task_time_limit task_soft_time_limit task_default_queue task_routes task_queues
    task_annotations task_default_rate_limit worker_concurrency worker_prefetch_multiplier
    worker_max_tasks_per_child worker_max_memory_per_child worker_send_task_events
    beat_schedule beat_max_loop_interval broker_transport_options task_publish_retry
    task_publish_retry_policy control_exchange event_exchange""".split()
    conf = Settings()
    for name in names:
        assert name in conf, name
        conf[name]  # no KeyError


def test_attribute_and_mapping_access():
    conf = Settings()
    conf.update(task_default_queue="q1", result_expires=60)
    assert conf.task_default_queue == "q1" == conf["task_default_queue"]
    conf.task_serializer = "pickle"
    assert conf["task_serializer"] == "pickle"
    conf["timezone"] = "Europe/Paris"
    assert conf.timezone == "Europe/Paris"
    conf.update({"result_expires": 30})
    assert conf.result_expires == 30
    assert conf.get("no_such_setting", "fallback") == "fallback"
    with pytest.raises(KeyError):
        conf["no_such_setting"]
    with pytest.raises(AttributeError):
        conf.no_such_setting
    conf.update(my_own_setting=1)  # unknown names are allowed, as in Celery
    assert conf.my_own_setting == 1
    assert "my_own_setting" in conf and "task_default_queue" in conf
    assert len(conf) == len(list(conf))


def test_deleting_a_change_restores_the_lower_layer():
    conf = Settings()
    conf.task_default_queue = "changed"
    del conf["task_default_queue"]
    assert conf.task_default_queue == "celery"


def test_defaults_are_not_shared_between_apps():
    a, b = make_app(), make_app()
    a.conf.task_default_queue = "only-a"
    assert b.conf.task_default_queue == "celery"
    assert DEFAULTS["task_default_queue"] == "celery"


def test_app_constructor_settings():
    app = make_app(broker="memory://b", backend="memory://r", include=["x.tasks"],
                   task_default_queue="kw")
    assert app.conf.broker_url == "memory://b"
    assert app.conf.result_backend == "memory://r"
    assert app.conf.include == ["x.tasks"]
    assert app.conf.task_default_queue == "kw"


# -- precedence -----------------------------------------------------------------------------


def test_precedence_module_over_defaults_and_runtime_over_module():
    app = make_app()
    app.config_from_object({"task_default_queue": "from-module", "result_expires": 10})
    assert app.conf.task_default_queue == "from-module"
    app.conf.update(task_default_queue="runtime")
    assert app.conf.task_default_queue == "runtime"
    assert app.conf.result_expires == 10
    # Loading a config module later does not beat run-time changes either.
    app.config_from_object({"task_default_queue": "module-2"})
    assert app.conf.task_default_queue == "runtime"


def test_app_broker_argument_beats_config_module():
    app = make_app(broker="memory://ctor")
    app.config_from_object({"broker_url": "memory://module"})
    assert app.conf.broker_url == "memory://ctor"


def test_env_broker_and_backend_beat_everything(monkeypatch):
    monkeypatch.setenv("QCTL_BROKER_URL", "memory://from-env")
    monkeypatch.setenv("QCTL_RESULT_BACKEND", "memory://results-from-env")
    app = make_app(broker="memory://ctor", backend="memory://ctor-r")
    app.config_from_object({"broker_url": "memory://module"})
    app.conf.broker_url = "memory://runtime"
    assert app.conf.broker_url == "memory://from-env"
    assert app.conf["result_backend"] == "memory://results-from-env"
    assert app.conf.effective_broker_url == "memory://from-env"
    assert app.conf.effective_result_backend == "memory://results-from-env"
    monkeypatch.delenv("QCTL_BROKER_URL")
    assert app.conf.broker_url == "memory://runtime"


def test_empty_env_variable_is_ignored(monkeypatch):
    monkeypatch.setenv("QCTL_BROKER_URL", "")
    app = make_app(broker="memory://ctor")
    assert app.conf.broker_url == "memory://ctor"


def test_generic_env_override(monkeypatch):
    monkeypatch.setenv("QCTL_TASK_DEFAULT_QUEUE", "env-queue")
    conf = Settings()
    conf.update(task_default_queue="runtime")
    assert conf.task_default_queue == "env-queue"


@pytest.mark.parametrize("name,text,expected", [
    ("worker_prefetch_multiplier", "2", 2),
    ("task_acks_late", "true", True),
    ("task_acks_late", "0", False),
    ("enable_utc", "no", False),
    ("beat_max_loop_interval", "15", 15),
    ("worker_lost_wait", "2.5", 2.5),
    ("accept_content", "json, pickle", ["json", "pickle"]),
])
def test_env_values_are_typed_by_the_default(monkeypatch, name, text, expected):
    monkeypatch.setenv("QCTL_" + name.upper(), text)
    value = Settings()[name]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("name,text,expected", [
    ("worker_concurrency", "4", 4),
    ("task_time_limit", "30", 30),
    ("task_soft_time_limit", "2.5", 2.5),
])
def test_env_numbers_for_settings_whose_default_is_none(monkeypatch, name, text, expected):
    """A setting whose default is None has no type to copy; a number must still not come
    back as a string (``QCTL_TASK_TIME_LIMIT=30`` would put ``["30", null]`` on the wire)."""
    monkeypatch.setenv("QCTL_" + name.upper(), text)
    value = Settings()[name]
    assert value == expected and not isinstance(value, str)


def test_env_for_unknown_setting_is_ignored(monkeypatch):
    monkeypatch.setenv("QCTL_NOT_A_SETTING", "x")
    conf = Settings()
    assert "not_a_setting" not in conf
    with pytest.raises(KeyError):
        conf["not_a_setting"]


# -- config sources -------------------------------------------------------------------------


def test_config_from_object_module_path(config_module):
    name = config_module("""
        broker_url = 'memory://cfg-module'
        task_default_queue = 'module-q'
        UPPER_CASE = 'ignored'
        def helper():
            return 1
    """)
    app = make_app()
    app.config_from_object(name)
    assert app.conf.broker_url == "memory://cfg-module"
    assert app.conf.task_default_queue == "module-q"
    assert "helper" not in app.conf
    assert "UPPER_CASE" not in app.conf


def test_config_from_object_module_colon_attr(config_module):
    name = config_module("""
        class Settings:
            task_default_queue = 'class-q'
            result_expires = 5
        settings_dict = {'task_default_queue': 'dict-q'}
    """)
    app = make_app()
    app.config_from_object(f"{name}:Settings")
    assert app.conf.task_default_queue == "class-q"
    assert app.conf.result_expires == 5
    app.config_from_object(f"{name}:settings_dict")
    assert app.conf.task_default_queue == "dict-q"
    # The config layer is replaced, not merged: result_expires is the default again.
    assert app.conf.result_expires == timedelta(days=1)


def test_config_from_object_dotted_attr(config_module):
    name = config_module("""
        class Settings:
            task_default_queue = 'dotted-q'
    """)
    app = make_app()
    app.config_from_object(f"{name}.Settings")
    assert app.conf.task_default_queue == "dotted-q"


def test_config_from_object_class_and_module_objects(config_module):
    class Config:
        task_default_queue = "cls-q"
        worker_concurrency = 3

        def method(self):  # not a setting
            return 0

    app = make_app()
    app.config_from_object(Config)
    assert app.conf.task_default_queue == "cls-q"
    assert app.conf.worker_concurrency == 3
    assert "method" not in app.conf

    module = __import__(config_module("task_default_queue = 'modobj-q'\n"))
    app.config_from_object(module)
    assert app.conf.task_default_queue == "modobj-q"


def test_config_from_object_dict():
    app = make_app()
    app.config_from_object({"task_serializer": "msgpack", "accept_content": ["msgpack"]})
    assert app.conf.task_serializer == "msgpack"
    assert app.conf.accept_content == ["msgpack"]


def test_config_from_object_namespace():
    app = make_app()
    app.config_from_object({"CELERY_TASK_DEFAULT_QUEUE": "ns-q", "OTHER": 1},
                           namespace="CELERY")
    assert app.conf.task_default_queue == "ns-q"
    assert "other" not in app.conf


def test_config_from_object_missing():
    app = make_app()
    with pytest.raises(ImproperlyConfigured):
        app.config_from_object("qctl_no_such_module_hopefully")
    with pytest.raises(ImproperlyConfigured):
        app.config_from_object("qctl.conf:NoSuchAttr")
    app.config_from_object("qctl_no_such_module_hopefully", silent=True)  # no error


def test_config_source_in_constructor(config_module):
    name = config_module("task_default_queue = 'ctor-src'\n")
    app = App("x", config_source=name, set_as_current=False)
    assert app.conf.task_default_queue == "ctor-src"


def test_config_from_envvar(config_module, monkeypatch):
    name = config_module("task_default_queue = 'from-envvar'\n")
    monkeypatch.setenv("QCTL_TEST_CONFIG_MODULE", name)
    app = make_app()
    assert app.config_from_envvar("QCTL_TEST_CONFIG_MODULE") is True
    assert app.conf.task_default_queue == "from-envvar"


def test_config_from_envvar_unset(monkeypatch):
    monkeypatch.delenv("QCTL_TEST_CONFIG_MODULE", raising=False)
    app = make_app()
    with pytest.raises(ImproperlyConfigured) as info:
        app.config_from_envvar("QCTL_TEST_CONFIG_MODULE")
    assert "QCTL_TEST_CONFIG_MODULE" in str(info.value)
    assert app.config_from_envvar("QCTL_TEST_CONFIG_MODULE", silent=True) is False


def test_config_from_envvar_names_a_missing_module(monkeypatch):
    monkeypatch.setenv("QCTL_TEST_CONFIG_MODULE", "qctl_no_such_module_hopefully")
    app = make_app()
    with pytest.raises(ImproperlyConfigured):
        app.config_from_envvar("QCTL_TEST_CONFIG_MODULE")


# -- censored views -------------------------------------------------------------------------


def test_mask_url():
    assert mask_url(f"redis://:{SECRET}@h/0") == "redis://:********@h/0"
    assert mask_url(f"amqp://user:{SECRET}@host:5672//") == "amqp://user:********@host:5672//"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"
    assert mask_url("sqlite:///qctl.sqlite3") == "sqlite:///qctl.sqlite3"
    assert mask_url(None) is None


def test_humanize_hides_url_passwords():
    app = make_app(broker=f"redis://:{SECRET}@h/0",
                   backend=f"db+postgresql://scott:{SECRET}@localhost/mydb")
    text = app.conf.humanize()
    assert SECRET not in text
    assert "redis://:********@h/0" in text
    table = app.conf.table()
    assert table["broker_url"] == "redis://:********@h/0"
    assert SECRET not in table["result_backend"]
    assert app.safe_broker_url == "redis://:********@h/0"


def test_humanize_hides_env_supplied_url_password(monkeypatch):
    monkeypatch.setenv("QCTL_BROKER_URL", f"amqp://u:{SECRET}@rabbit//")
    app = make_app()
    assert SECRET not in app.conf.humanize()
    assert SECRET not in app.conf.humanize(with_defaults=True)
    assert SECRET not in repr(app.conf.table(with_defaults=True))


@pytest.mark.parametrize("name", ["security_key", "db_password", "api_token", "my_secret",
                                  "signing_key", "REDIS_PASSWORD_FILE_TEXT", "github_token"])
def test_humanize_hides_secret_named_settings(name):
    app = make_app()
    app.conf.update({name: SECRET})
    text = app.conf.humanize()
    assert name in text
    assert SECRET not in text
    assert app.conf.table()[name] == "********"
    assert SECRET not in app.conf.humanize(with_defaults=True)


def test_humanize_censored_false_shows_secrets():
    app = make_app()
    app.conf.update(security_key=SECRET)
    assert SECRET in app.conf.humanize(censored=False)
    assert app.conf.table(censored=False)["security_key"] == SECRET


def test_secrets_inside_mappings_are_hidden():
    app = make_app()
    app.conf.update(broker_transport_options={"visibility_timeout": 10, "password": SECRET,
                                              "sentinel_kwargs": {"password": SECRET}})
    text = app.conf.humanize()
    assert SECRET not in text
    assert "visibility_timeout" in text and "10" in text


def test_urls_in_lists_are_masked():
    app = make_app()
    app.conf.update(broker_failover=[f"redis://:{SECRET}@h1/0", f"redis://:{SECRET}@h2/0"])
    assert SECRET not in app.conf.humanize()


def test_mapping_under_a_secret_name_is_hidden_entirely():
    """A setting named like *SECRET*/*TOKEN* is hidden whatever its value's type."""
    app = make_app()
    app.conf.update(api_tokens={"stripe": SECRET}, oauth_secrets=[SECRET])
    text = app.conf.humanize()
    assert SECRET not in text


def test_humanize_shows_changed_settings_only():
    app = make_app()
    app.conf.update(task_default_queue="changed-q")
    text = app.conf.humanize()
    assert "task_default_queue: 'changed-q'" in text
    assert "worker_prefetch_multiplier" not in text
    assert "control_exchange" not in text
    full = app.conf.humanize(with_defaults=True)
    assert "worker_prefetch_multiplier: 4" in full
    assert "task_default_queue: 'changed-q'" in full
    assert set(app.conf.table()) == {"task_default_queue"}
    assert set(app.conf.table(with_defaults=True)) >= set(DEFAULTS)


def test_setting_a_default_value_is_not_a_change():
    app = make_app()
    app.conf.update(task_default_queue="celery")
    assert "task_default_queue" not in app.conf.table()


# -- the embedded default -------------------------------------------------------------------


def test_effective_urls_default_to_embedded_sqlite():
    conf = Settings()
    assert DEFAULT_SQLITE_URL == "sqlite:///qctl.sqlite3"
    assert conf.effective_broker_url == "sqlite:///qctl.sqlite3"
    assert conf.effective_result_backend == "sqlite:///qctl.sqlite3"


@pytest.mark.parametrize("broker,backend", [
    ("memory://", "memory://"),
    ("sqlite:///x.db", "sqlite:///x.db"),
    ("redis://h/0", "redis://h/0"),
    ("amqp://guest@h//", "rpc://"),
])
def test_effective_result_backend_follows_broker(broker, backend):
    conf = Settings()
    conf.broker_url = broker
    assert conf.effective_result_backend == backend


def test_explicit_backend_wins():
    conf = Settings()
    conf.update(broker_url="redis://h/0", result_backend="memory://")
    assert conf.effective_result_backend == "memory://"
