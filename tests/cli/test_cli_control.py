"""``qctl inspect``, ``qctl control`` and ``qctl status`` against a fake ``app.control``.

The fake records every call (checked against the real ``qctl.control`` signatures) and returns
canned replies, so these tests cover parsing, argument mapping, rendering and exit codes
without a worker. Real-worker tests live elsewhere.
"""
from __future__ import annotations

import inspect as pyinspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qctl import App
from qctl.cli import exitcodes, main
from qctl.cli.context import CliContext
from qctl.cli.output import Output
from qctl.exceptions import OperationalError

pytestmark = pytest.mark.timeout(60)

MAIN = Path(__file__).resolve().parents[2]
ENV_KEYS = ("QCTL_BROKER_URL", "QCTL_RESULT_BACKEND", "QCTL_APP", "QCTL_DEBUG", "NO_COLOR",
            "QCTL_WORKER_POOL")
NO_REPLY = "Error: No nodes replied within time constraint\n"


# -- a fake app.control ----------------------------------------------------------------------


def _check_call(cls_name: str, name: str, args: tuple, kwargs: dict) -> None:
    """Fail when the call does not fit the real method's explicit parameters."""
    from qctl import control as real
    method = getattr(getattr(real, cls_name), name)
    signature = pyinspect.signature(method)
    bound = signature.bind(None, *args, **kwargs)
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            extra = bound.arguments.get(param.name) or {}
            assert not extra, f"{cls_name}.{name} got unexpected keywords {extra}"


class FakeInspect:
    def __init__(self, fake: "FakeControl") -> None:
        self.fake = fake

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def method(*args: Any, **kwargs: Any) -> Any:
            _check_call("Inspect", name, args, kwargs)
            self.fake.calls.append((f"inspect.{name}", args, kwargs))
            value = self.fake.replies.get(name)
            if isinstance(value, Exception):
                raise value
            return value
        return method


class FakeControl:
    """Stands in for ``app.control``: ``replies[method]`` is what the method returns."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.replies: dict[str, Any] = {}

    def inspect(self, destination: Any = None, timeout: float = 1.0, **kwargs: Any) -> FakeInspect:
        assert not kwargs
        self.calls.append(("inspect", (), {"destination": destination, "timeout": timeout}))
        return FakeInspect(self)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)

        def method(*args: Any, **kwargs: Any) -> Any:
            _check_call("Control", name, args, kwargs)
            self.calls.append((name, args, kwargs))
            value = self.replies.get(name, [])
            if isinstance(value, Exception):
                raise value
            return value
        return method

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fake():
    return FakeControl()


@pytest.fixture
def loads(monkeypatch, fake):
    """The CLI gets an in-memory app whose ``control`` is ``fake``; counts app loads."""
    app = App("ctl-test", broker="memory://", set_as_current=False)
    app._control = fake
    loaded: list[int] = []

    def load(self):
        loaded.append(1)
        return app
    monkeypatch.setattr(CliContext, "_load_app", load)
    return loaded


@pytest.fixture
def runner(loads):
    return CliRunner(env={key: None for key in ENV_KEYS}, catch_exceptions=False)


def invoke(runner, *args):
    return runner.invoke(main, list(args))


def one_line_error(result, code):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# -- inspect: plain output (Celery's text) ---------------------------------------------------


def test_inspect_ping_plain(runner, fake):
    fake.replies["ping"] = {"w1@vm": {"ok": "pong"}}
    result = invoke(runner, "inspect", "ping")
    assert result.exit_code == 0, result.output
    assert result.stdout == "->  w1@vm: OK\n        pong\n\n1 node(s) online.\n"
    assert result.stderr == ""
    assert fake.calls == [("inspect", (), {"destination": None, "timeout": 1.0}),
                          ("inspect.ping", (), {})]


def test_inspect_two_nodes_sorted_footer(runner, fake):
    fake.replies["ping"] = {"w2@vm": {"ok": "pong"}, "w1@vm": {"ok": "pong"}}
    result = invoke(runner, "inspect", "ping")
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "->  w1@vm: OK", "        pong", "->  w2@vm: OK", "        pong", "", "2 node(s) online."]


def test_inspect_empty_list(runner, fake):
    fake.replies["active"] = {"w1@vm": []}
    result = invoke(runner, "inspect", "active")
    assert result.stdout == "->  w1@vm: OK\n    - empty -\n\n1 node(s) online.\n"
    assert fake.calls[-1] == ("inspect.active", (), {})


def test_inspect_registered_items(runner, fake):
    fake.replies["registered"] = {"w1@vm": ["proj.add [rate_limit=10/m]", "proj.fail"]}
    result = invoke(runner, "inspect", "registered")
    assert result.stdout == ("->  w1@vm: OK\n    * proj.add [rate_limit=10/m]\n    * proj.fail\n"
                             "\n1 node(s) online.\n")


def test_inspect_registered_attributes(runner, fake):
    fake.replies["registered"] = {"w1@vm": []}
    invoke(runner, "inspect", "registered", "rate_limit", "time_limit")
    assert fake.calls[-1] == ("inspect.registered", ("rate_limit", "time_limit"), {})


def test_inspect_dict_is_indented_sorted_json(runner, fake):
    fake.replies["clock"] = {"w1@vm": {"clock": 151}}
    result = invoke(runner, "inspect", "clock")
    assert result.stdout == ("->  w1@vm: OK\n    {\n        \"clock\": 151\n    }\n"
                             "\n1 node(s) online.\n")
    fake.replies["stats"] = {"w1@vm": {"total": {"proj.add": 2}, "pid": 42}}
    out = invoke(runner, "inspect", "stats").stdout.splitlines()
    assert out[:8] == ["->  w1@vm: OK", "    {", '        "pid": 42,', '        "total": {',
                       '            "proj.add": 2', "        }", "    }", ""]


def test_inspect_multiline_ok_and_active_items(runner, fake):
    fake.replies["report"] = {"w1@vm": {"ok": "software -> qctl\nplatform -> linux"}}
    result = invoke(runner, "inspect", "report")
    assert result.stdout.splitlines()[:3] == [
        "->  w1@vm: OK", "        software -> qctl", "        platform -> linux"]
    info = {"id": "t1", "name": "proj.add", "args": [1, 2]}
    fake.replies["active"] = {"w1@vm": [info]}
    result = invoke(runner, "inspect", "active")
    assert result.stdout.splitlines()[1] == f"    * {info}"  # Celery prints the dict's repr


def test_inspect_json_is_one_flat_object(runner, fake):
    fake.replies["ping"] = {"w1@vm": {"ok": "pong"}, "w2@vm": {"ok": "pong"}}
    result = invoke(runner, "inspect", "ping", "--json")
    assert result.exit_code == 0
    assert result.stdout.count("\n") == 1
    assert json.loads(result.stdout) == {"w1@vm": {"ok": "pong"}, "w2@vm": {"ok": "pong"}}
    assert "online" not in result.output
    assert json.loads(invoke(runner, "inspect", "-j", "ping").stdout)["w1@vm"] == {"ok": "pong"}


def test_inspect_no_reply(runner, fake):
    fake.replies["ping"] = None
    result = invoke(runner, "inspect", "ping")
    assert result.exit_code == exitcodes.UNAVAILABLE == 69
    assert result.stderr == NO_REPLY
    assert result.stdout == ""
    assert invoke(runner, "inspect", "ping", "--json").exit_code == 69


def test_inspect_destination_and_timeout(runner, fake):
    fake.replies["stats"] = {"w1@vm": {}, "w2@vm": {}}
    result = invoke(runner, "inspect", "stats", "-d", "w1@vm, w2@vm", "-t", "2.5")
    assert result.exit_code == 0, result.output
    assert fake.calls[0] == ("inspect", (), {"destination": ["w1@vm", "w2@vm"], "timeout": 2.5})
    invoke(runner, "inspect", "--destination", "w1@vm", "--timeout", "3", "stats")
    assert fake.calls[2] == ("inspect", (), {"destination": ["w1@vm"], "timeout": 3.0})


def test_inspect_named_node_missing_warns_and_fails(runner, fake):
    fake.replies["ping"] = {"w1@vm": {"ok": "pong"}}
    result = invoke(runner, "inspect", "ping", "-d", "w1@vm,w9@vm")
    assert result.exit_code == 1
    assert "->  w1@vm: OK" in result.stdout and "1 node(s) online." in result.stdout
    assert "w9@vm" in result.stderr and "Warning" in result.stderr


def test_inspect_error_reply(runner, fake):
    fake.replies["clock"] = {"w1@vm": {"error": "KeyError('clock')"}, "w2@vm": {"clock": 3}}
    result = invoke(runner, "inspect", "clock")
    assert result.exit_code == 1
    assert result.stdout.startswith("->  w1@vm: ERROR\n        KeyError('clock')\n->  w2@vm: OK\n")


def test_inspect_query_task_and_conf(runner, fake):
    fake.replies["query_task"] = {"w1@vm": {}}
    assert invoke(runner, "inspect", "query_task", "id1", "id2").exit_code == 0
    assert fake.calls[-1] == ("inspect.query_task", ("id1", "id2"), {})
    fake.replies["conf"] = {"w1@vm": {"broker_url": "memory://"}}
    invoke(runner, "inspect", "conf")
    assert fake.calls[-1] == ("inspect.conf", (), {"with_defaults": False})
    invoke(runner, "inspect", "conf", "--with-defaults")
    assert fake.calls[-1] == ("inspect.conf", (), {"with_defaults": True})
    invoke(runner, "inspect", "conf", "true")  # Celery's positional form
    assert fake.calls[-1] == ("inspect.conf", (), {"with_defaults": True})


@pytest.mark.parametrize("args", [["query_task"], ["ping", "extra"], ["active", "x"],
                                  ["ping", "--with-defaults"], ["conf", "a", "b"]])
def test_inspect_bad_arguments_are_usage_errors(runner, fake, loads, args):
    result = invoke(runner, "inspect", *args)
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.stderr and "Traceback" not in result.output
    assert fake.calls == [] and loads == []


def test_inspect_unknown_command(runner, fake, loads):
    result = invoke(runner, "inspect", "hello")
    assert result.exit_code == 2
    assert ("Error: Command hello not recognized. Available inspect commands: active, "
            "active_queues, clock, conf, ping, query_task, registered, report, reserved, "
            "revoked, scheduled, stats") in result.stderr
    assert fake.calls == [] and loads == []
    result = invoke(runner, "inspect", "stat")
    assert result.exit_code == 2 and "Did you mean stats?" in result.stderr
    result = invoke(runner, "inspect")
    assert result.exit_code == 2 and "Available inspect commands" in result.stderr


def test_inspect_list_and_help(runner, fake):
    result = invoke(runner, "inspect", "--list")
    assert result.exit_code == 0
    assert "|- query_task ID...: " in result.stdout and "|- ping: " in result.stdout
    result = invoke(runner, "inspect", "--help")
    assert result.exit_code == 0
    for word in ("active_queues", "query_task", "--destination", "--timeout", "--json"):
        assert word in result.stdout
    assert fake.calls == []


def test_quiet_drops_the_footer(runner, fake):
    fake.replies["ping"] = {"w1@vm": {"ok": "pong"}}
    result = invoke(runner, "-q", "inspect", "ping")
    assert result.stdout == "->  w1@vm: OK\n        pong\n"


def test_broker_down_is_one_line(runner, fake):
    fake.replies["ping"] = OperationalError("cannot connect to redis://localhost:1: refused")
    result = invoke(runner, "status")
    assert one_line_error(result, exitcodes.UNAVAILABLE).startswith("Error: cannot connect")
    fake.replies["rate_limit"] = OperationalError("cannot connect")
    one_line_error(invoke(runner, "control", "rate_limit", "a", "1/s"), exitcodes.UNAVAILABLE)


# -- inspect: rich output (terminal) ---------------------------------------------------------


@pytest.fixture
def rich_on(monkeypatch):
    # As on a terminal: rich unless colour is off (--no-color, NO_COLOR).
    monkeypatch.setattr(Output, "rich_enabled", property(lambda self: not self.no_color))


def test_rich_ping_is_one_table(runner, fake, rich_on):
    fake.replies["ping"] = {"w1@vm": {"ok": "pong"}, "w2@vm": {"error": "nope"}}
    result = invoke(runner, "inspect", "ping")
    assert result.exit_code == 1
    assert "->" not in result.stdout
    for word in ("Node", "Status", "w1@vm", "pong", "w2@vm", "ERROR", "nope",
                 "2 node(s) online."):
        assert word in result.stdout


def test_rich_tables_per_node(runner, fake, rich_on):
    info = {"id": "t-1", "name": "proj.add", "args": [1, 2], "kwargs": {}, "time_start": 1.0e9,
            "worker_pid": 77}
    fake.replies["active"] = {"w1@vm": [info], "w2@vm": []}
    result = invoke(runner, "inspect", "active")
    assert result.exit_code == 0, result.output
    for word in ("w1@vm: OK", "w2@vm: OK", "t-1", "proj.add", "[1, 2]", "77", "- empty -"):
        assert word in result.stdout
    fake.replies["stats"] = {"w1@vm": {"pool": {"max-concurrency": 4}, "total": {}}}
    result = invoke(runner, "inspect", "stats")
    assert "pool.max-concurrency" in result.stdout and "4" in result.stdout
    fake.replies["query_task"] = {"w1@vm": {"t-1": ["active", info]}}
    result = invoke(runner, "inspect", "query_task", "t-1")
    assert "active" in result.stdout and "proj.add" in result.stdout
    fake.replies["query_task"] = {"w1@vm": {}, "w2@vm": {"t-1": ["ready", info]}}
    result = invoke(runner, "inspect", "query_task", "t-1")
    assert "- empty -" in result.stdout and "ready" in result.stdout


def test_rich_status_and_control(runner, fake, rich_on):
    fake.replies["ping"] = [{"w1@vm": {"ok": "pong"}}]
    result = invoke(runner, "status")
    assert "w1@vm" in result.stdout and "OK" in result.stdout and "pong" not in result.stdout
    assert "1 node(s) online." in result.stdout
    fake.replies["rate_limit"] = [{"w1@vm": {"ok": "new rate limit set successfully"}}]
    result = invoke(runner, "control", "rate_limit", "proj.add", "10/m")
    assert "new rate limit set successfully" in result.stdout and "online" not in result.stdout


def test_no_color_keeps_plain_text(runner, fake, rich_on):
    fake.replies["ping"] = {"w1@vm": {"ok": "pong"}}
    result = invoke(runner, "--no-color", "inspect", "ping")
    assert result.stdout == "->  w1@vm: OK\n        pong\n\n1 node(s) online.\n"


# -- control ---------------------------------------------------------------------------------

REMOTE = {"destination": None, "reply": True, "timeout": 1.0}


def test_control_rate_limit(runner, fake):
    fake.replies["rate_limit"] = [{"w1@vm": {"ok": "new rate limit set successfully"}}]
    result = invoke(runner, "control", "rate_limit", "proj.add", "10/m")
    assert result.exit_code == 0, result.output
    assert result.stdout == "->  w1@vm: OK\n        new rate limit set successfully\n"
    assert fake.calls == [("rate_limit", ("proj.add", "10/m"), REMOTE)]


@pytest.mark.parametrize("rate", ["64/2", "fast", "10/x", "-1", "1/s/s", ""])
def test_control_bad_rate_never_contacts_the_fleet(runner, fake, loads, rate):
    result = invoke(runner, "control", "rate_limit", "--", "proj.add", rate)
    line = one_line_error(result, 2)
    assert "rate" in line
    assert result.stdout == ""
    assert fake.calls == [] and loads == []


@pytest.mark.parametrize("rate,sent", [("0", "0"), ("100/s", "100/s"), ("5/h", "5/h"),
                                       ("3", "3"), ("1.5/m", "1.5/m")])
def test_control_good_rates(runner, fake, rate, sent):
    fake.replies["rate_limit"] = [{"w1@vm": {"ok": "rate limit disabled successfully"}}]
    assert invoke(runner, "control", "rate_limit", "t", rate).exit_code == 0
    assert fake.calls[-1] == ("rate_limit", ("t", sent), REMOTE)


def test_bad_rate_in_a_real_process_touches_no_broker(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    environ["PYTHONPATH"] = str(MAIN)
    proc = subprocess.run([sys.executable, "-m", "qctl", "control", "rate_limit", "proj.add",
                           "64/2"], cwd=tmp_path, env=environ, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "Error: bad rate '64/2': expected N, N/s, N/m or N/h (e.g. 10/m)"]
    assert proc.stdout == ""
    assert not (tmp_path / "qctl.sqlite3").exists()  # the default broker was never opened


def test_control_error_reply_exits_1(runner, fake):
    fake.replies["rate_limit"] = [{"w1@vm": {"ok": "new rate limit set successfully"}},
                                  {"w2@vm": {"error": "unknown task"}}]
    result = invoke(runner, "control", "rate_limit", "proj.nope", "1/s")
    assert result.exit_code == 1
    assert result.stdout == ("->  w1@vm: OK\n        new rate limit set successfully\n"
                             "->  w2@vm: ERROR\n        unknown task\n")


def test_control_no_reply_and_json(runner, fake):
    fake.replies["enable_events"] = []
    result = invoke(runner, "control", "enable_events")
    assert result.exit_code == 69 and result.stderr == NO_REPLY
    fake.replies["enable_events"] = None
    assert invoke(runner, "control", "enable_events").exit_code == 69
    fake.replies["enable_events"] = [{"w1@vm": {"ok": "task events enabled"}},
                                     {"w2@vm": {"ok": "task events already enabled"}}]
    result = invoke(runner, "control", "enable_events", "--json", "-d", "w1@vm,w2@vm", "-t", "5")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"w1@vm": {"ok": "task events enabled"},
                                         "w2@vm": {"ok": "task events already enabled"}}
    assert fake.calls[-1] == ("enable_events", (), {"destination": ["w1@vm", "w2@vm"],
                                                    "reply": True, "timeout": 5.0})


def test_control_named_node_missing(runner, fake):
    fake.replies["disable_events"] = [{"w1@vm": {"ok": "task events disabled"}}]
    result = invoke(runner, "control", "disable_events", "-d", "w1@vm,w2@vm")
    assert result.exit_code == 1
    assert "->  w1@vm: OK" in result.stdout and "w2@vm" in result.stderr


def test_control_time_limit_order(runner, fake):
    fake.replies["time_limit"] = [{"w1@vm": {"ok": "time limits set successfully"}}]
    result = invoke(runner, "control", "time_limit", "proj.add", "10", "20.5")
    assert result.exit_code == 0
    assert result.stdout == "->  w1@vm: OK\n        time limits set successfully\n"
    assert fake.calls[-1] == ("time_limit", ("proj.add",), {"soft": 10.0, "hard": 20.5, **REMOTE})
    invoke(runner, "control", "time_limit", "proj.add", "7")
    assert fake.calls[-1] == ("time_limit", ("proj.add",), {"soft": 7.0, "hard": None, **REMOTE})


def test_control_revoke(runner, fake):
    fake.replies["revoke"] = [{"w1@vm": {"ok": "tasks {'a'} flagged as revoked"}}]
    result = invoke(runner, "control", "revoke", "a")
    assert result.stdout == "->  w1@vm: OK\n        tasks {'a'} flagged as revoked\n"
    assert fake.calls[-1] == ("revoke", (["a"],), {"terminate": False, "signal": "SIGTERM",
                                                   **REMOTE})
    invoke(runner, "control", "revoke", "a", "b", "--terminate", "--signal", "KILL")
    assert fake.calls[-1] == ("revoke", (["a", "b"],), {"terminate": True, "signal": "SIGKILL",
                                                        **REMOTE})
    invoke(runner, "control", "revoke", "--terminate", "--signal", "9", "c")
    assert fake.calls[-1][2]["signal"] == "SIGKILL"
    invoke(runner, "control", "terminate", "sigint", "d", "e")
    assert fake.calls[-1] == ("revoke", (["d", "e"],), {"terminate": True, "signal": "SIGINT",
                                                        **REMOTE})


def test_control_revoke_bad_input(runner, fake, loads):
    one_line_error(invoke(runner, "control", "revoke", "a", "--terminate", "--signal", "NOPE"), 2)
    one_line_error(invoke(runner, "control", "terminate", "999", "a"), 2)
    result = invoke(runner, "control", "revoke")
    assert result.exit_code == 2 and "revoke ID..." in result.stderr
    result = invoke(runner, "control", "rate_limit", "a", "1/s", "--terminate")
    assert result.exit_code == 2 and "--terminate cannot be used with rate_limit" in result.stderr
    assert fake.calls == [] and loads == []


def test_control_consumers(runner, fake):
    fake.replies["add_consumer"] = [{"w1@vm": {"ok": "add consumer foo"}}]
    result = invoke(runner, "control", "add_consumer", "foo")
    assert result.stdout == "->  w1@vm: OK\n        add consumer foo\n"
    assert fake.calls[-1] == ("add_consumer", ("foo",), {
        "exchange": None, "exchange_type": "direct", "routing_key": None, **REMOTE})
    invoke(runner, "control", "add_consumer", "foo", "ex", "topic", "foo.#")
    assert fake.calls[-1] == ("add_consumer", ("foo",), {
        "exchange": "ex", "exchange_type": "topic", "routing_key": "foo.#", **REMOTE})
    one_line_error(invoke(runner, "control", "add_consumer", "foo", "ex", "weird"), 2)
    fake.replies["cancel_consumer"] = [{"w1@vm": {"ok": "no longer consuming from foo"}}]
    result = invoke(runner, "control", "cancel_consumer", "foo")
    assert result.stdout == "->  w1@vm: OK\n        no longer consuming from foo\n"
    assert fake.calls[-1] == ("cancel_consumer", ("foo",), REMOTE)


def test_control_pool_commands(runner, fake):
    fake.replies["pool_grow"] = [{"w1@vm": {"ok": "pool will grow"}}]
    assert invoke(runner, "control", "pool_grow").exit_code == 0
    assert fake.calls[-1] == ("pool_grow", (), {"n": 1, **REMOTE})
    invoke(runner, "control", "pool_grow", "3")
    assert fake.calls[-1] == ("pool_grow", (), {"n": 3, **REMOTE})
    fake.replies["pool_shrink"] = [{"w1@vm": {"ok": "pool will shrink"}}]
    invoke(runner, "control", "pool_shrink", "2")
    assert fake.calls[-1] == ("pool_shrink", (), {"n": 2, **REMOTE})
    fake.replies["autoscale"] = [{"w1@vm": {"error": "ValueError('Autoscale not enabled')"}}]
    result = invoke(runner, "control", "autoscale", "10", "3")
    assert result.exit_code == 1
    assert result.stdout == "->  w1@vm: ERROR\n        ValueError('Autoscale not enabled')\n"
    assert fake.calls[-1] == ("autoscale", (10, 3), REMOTE)
    fake.replies["pool_restart"] = [{"w1@vm": {"ok": "reload started"}}]
    invoke(runner, "control", "pool_restart")
    assert fake.calls[-1] == ("pool_restart", (), REMOTE)


@pytest.mark.parametrize("args", [["pool_grow", "0"], ["pool_shrink", "x"],
                                  ["autoscale", "3", "10"], ["autoscale", "0", "0"],
                                  ["time_limit", "t", "soon"], ["time_limit", "--", "t", "-1"],
                                  ["time_limit", "t", "1", "nan"]])
def test_control_bad_numbers_are_one_line(runner, fake, loads, args):
    one_line_error(invoke(runner, "control", *args), 2)
    assert fake.calls == [] and loads == []


@pytest.mark.parametrize("args", [["rate_limit", "t"], ["rate_limit"], ["time_limit", "t"],
                                  ["autoscale", "3"], ["shutdown", "now"],
                                  ["add_consumer", "q", "e", "direct", "rk", "more"],
                                  ["cancel_consumer"]])
def test_control_wrong_argument_count(runner, fake, loads, args):
    result = invoke(runner, "control", *args)
    assert result.exit_code == 2 and "Usage:" in result.stderr, result.output
    assert fake.calls == [] and loads == []


def test_control_unknown_command(runner, fake, loads):
    result = invoke(runner, "control", "ping")
    assert result.exit_code == 2
    assert "Error: Command ping not recognized. Available control commands: add_consumer, " \
           "autoscale, cancel_consumer" in result.stderr
    assert fake.calls == [] and loads == []


def test_control_heartbeat_null_reply(runner, fake):
    fake.replies["heartbeat"] = [{"w1@vm": None}]
    result = invoke(runner, "control", "heartbeat")
    assert result.exit_code == 0
    assert result.stdout == "->  w1@vm: OK\n    None\n"


def test_control_shutdown_silence_is_not_an_error(runner, fake):
    fake.replies["shutdown"] = []
    result = invoke(runner, "control", "shutdown", "-d", "w1@vm")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and "qctl status" in result.stderr
    assert fake.calls == [("shutdown", (), {**REMOTE, "destination": ["w1@vm"]})]
    assert json.loads(invoke(runner, "control", "shutdown", "--json").stdout) == {}


# -- status ----------------------------------------------------------------------------------


def test_status(runner, fake):
    fake.replies["ping"] = [{"w2@vm": {"ok": "pong"}}, {"w1@vm": {"ok": "pong"}}]
    result = invoke(runner, "status")
    assert result.exit_code == 0
    assert result.stdout == "->  w1@vm: OK\n->  w2@vm: OK\n\n2 node(s) online.\n"
    assert fake.calls == [("ping", (), {"destination": None, "timeout": 1.0})]
    invoke(runner, "status", "-d", "w1@vm", "-t", "0.5")
    assert fake.calls[-1] == ("ping", (), {"destination": ["w1@vm"], "timeout": 0.5})


def test_status_json_quiet_and_none(runner, fake):
    fake.replies["ping"] = [{"w1@vm": {"ok": "pong"}}]
    result = invoke(runner, "status", "--json")
    assert json.loads(result.stdout) == {"w1@vm": {"ok": "pong"}}
    assert invoke(runner, "-q", "status").stdout == "->  w1@vm: OK\n"
    result = invoke(runner, "status", "-d", "w1@vm,w2@vm")
    assert result.exit_code == 1 and "w2@vm" in result.stderr
    fake.replies["ping"] = []
    result = invoke(runner, "status")
    assert result.exit_code == 69 and result.stderr == NO_REPLY and result.stdout == ""


def test_status_rejects_bad_timeout(runner, fake):
    result = invoke(runner, "status", "-t", "0")
    assert result.exit_code == 2 and fake.calls == []


def test_root_help_lists_remote_commands(runner):
    result = invoke(runner, "--help")
    for name in ("inspect", "control", "status"):
        assert name in result.stdout
        assert invoke(runner, name, "--help").exit_code == 0


def test_no_worker_real_process(tmp_path):
    """End to end on the embedded broker with nobody listening: the one-line error, exit 69."""
    environ = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    environ["PYTHONPATH"] = str(MAIN)
    for args in (["inspect", "ping"], ["status"], ["control", "rate_limit", "a", "1/s"]):
        proc = subprocess.run([sys.executable, "-m", "qctl", *args, "-t", "0.2"], cwd=tmp_path,
                              env=environ, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 69, (args, proc.stderr)
        assert proc.stderr == NO_REPLY and proc.stdout == ""
