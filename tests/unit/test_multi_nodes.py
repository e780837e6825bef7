"""``qctl.multi.nodes``: node names, per-node options, templates and worker command lines; and
the pidfile identity check ``multi`` relies on. No worker is started here (the pidfile tests
use a plain ``sleep``-like process whose command line looks like a node's)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from qctl.cli.multi import worker_option_table
from qctl.multi.nodes import (MultiArgs, NodeSpecError, build_nodes, expand_template, find_node,
                              node_names, parse_args, parse_signal, root_arguments, scope_indexes,
                              worker_path)
from qctl.pidfile import Pidfile, PidfileError, command_names_node

pytestmark = pytest.mark.timeout(30)

HOST = "box.example.com"
OPTIONS = worker_option_table()


def nodes_for(*argv, cwd="/srv/q", accept_signal=False, **kwargs):
    return build_nodes(parse_args(argv, OPTIONS, accept_signal=accept_signal), cwd=cwd,
                       host=HOST, python="py", **kwargs)


def options_of(*argv, **kwargs):
    return {node.shortname: node.options for node in nodes_for(*argv, **kwargs)}


# -- names ------------------------------------------------------------------------------------


def test_plain_names_get_the_host_and_full_names_are_kept():
    assert node_names(["w1", "w2@other.host", "w3@%h"], host=HOST) == [
        f"w1@{HOST}", "w2@other.host", f"w3@{HOST}"]


def test_a_single_number_is_that_many_nodes_named_with_the_range_prefix():
    assert node_names(["3"], host="h") == ["qctl1@h", "qctl2@h", "qctl3@h"]
    assert node_names(["2"], host="h", range_prefix="worker") == ["worker1@h", "worker2@h"]


@pytest.mark.parametrize("specs, message", [
    ([], "no nodes given"),
    (["0"], "between 1 and"),
    (["w1", "3"], "must be the only node argument"),
    (["w1", "w1"], "given twice"),
    (["w1", f"w1@{HOST}"], "given twice"),
    (["bad name"], "bad node name"),
    (["w1@"], "bad node name"),
    (["@host"], "bad node name"),
    (["w/1"], "bad node name"),
])
def test_unusable_node_specs_are_errors(specs, message):
    with pytest.raises(NodeSpecError, match=message):
        node_names(specs, host=HOST)


def test_hostname_option_sets_the_host_part_of_generated_names():
    assert [n.name for n in nodes_for("2", "-n", "h.example.com")] == [
        "qctl1@h.example.com", "qctl2@h.example.com"]
    assert [n.name for n in nodes_for("w1", "w2@x", "--hostname=y")] == ["w1@y", "w2@x"]


# -- options ----------------------------------------------------------------------------------


def test_options_for_all_nodes_and_per_node_by_position_range_and_name():
    got = options_of("w1", "w2", "w3", "-c", "2", "-c:1-2", "4", "-Q:w3", "images",
                     "--loglevel:w2=DEBUG")
    assert got == {"w1": ["-c", "4"], "w2": ["-c", "4", "--loglevel", "DEBUG"],
                   "w3": ["-c", "2", "-Q", "images"]}


def test_a_count_with_per_node_lists_and_ranges():
    got = options_of("4", "-c:1,4", "8", "-X:2-3", "slow")
    assert got == {"qctl1": ["-c", "8"], "qctl2": ["-X", "slow"], "qctl3": ["-X", "slow"],
                   "qctl4": ["-c", "8"]}


def test_per_node_beats_all_nodes_whatever_the_order_and_the_last_per_node_wins():
    assert options_of("w1", "w2", "-c:w1", "9", "-c", "3") == {"w1": ["-c", "9"], "w2": ["-c", "3"]}
    assert options_of("w1", "-c:1", "5", "-c:w1", "6") == {"w1": ["-c", "6"]}
    # the same option under another spelling is the same option
    assert options_of("w1", "--concurrency", "2", "-c", "7") == {"w1": ["-c", "7"]}


def test_values_are_taken_from_the_worker_option_table_not_guessed():
    # Celery would make INFO a node name; the worker's table says --loglevel takes a value.
    args = parse_args(["w1", "--loglevel", "INFO", "-E", "w2"], OPTIONS)
    assert args.names == ["w1", "w2"]
    assert [(o.opt, o.value) for o in args.options] == [("--loglevel", "INFO"), ("-E", None)]


def test_attached_values_flag_clusters_and_equals_forms():
    got = options_of("w1", "-c4", "-EB", "--prefetch-multiplier=2", "-Qa,b")
    assert got == {"w1": ["-c", "4", "-E", "-B", "--prefetch-multiplier", "2", "-Q", "a,b"]}


@pytest.mark.parametrize("argv, message", [
    (["w1", "--no-such-option"], "unknown worker option '--no-such-option'"),
    (["w1", "-Z"], "unknown worker option"),
    (["w1", "-c"], "needs a value"),
    (["w1", "-E=1"], "unknown worker option"),
    (["w1", "--task-events=yes"], "takes no value"),
    (["w1", "-c:", "2"], "name the nodes after ':'"),
    (["w1", "-A:w1", "proj"], "cannot be given per node"),
    (["w1", "-n:w1", "h"], "cannot be given per node"),
    (["w1", "--check"], "unknown worker option"),
])
def test_unusable_options_are_errors(argv, message):
    with pytest.raises(NodeSpecError, match=message):
        parse_args(argv, OPTIONS)


@pytest.mark.parametrize("argv, message", [
    (["w1", "w2", "-c:3", "2"], "outside 1-2"),
    (["w1", "w2", "-c:2-1", "2"], "outside 1-2"),
    (["w1", "w2", "-c:3-4", "2"], "outside 1-2"),
    (["w1", "w2", "-c:w3", "2"], "'w3' names no node"),
])
def test_a_scope_that_matches_no_node_is_an_error(argv, message):
    with pytest.raises(NodeSpecError, match=message):
        nodes_for(*argv)


def test_scope_indexes_accept_full_and_short_names():
    names = ["a@h", "b@h", "c@x"]
    assert scope_indexes("a,c@x", names) == {0, 2}
    assert scope_indexes("2-3,1", names) == {0, 1, 2}


def test_a_range_past_the_last_node_covers_the_nodes_there_are():
    assert options_of("w1", "w2", "-c:1-3", "4") == {"w1": ["-c", "4"], "w2": ["-c", "4"]}


def test_root_options_after_the_nodes_are_kept_apart():
    args = parse_args(["w1", "-A", "proj", "-c", "2", "--broker=redis://h/0",
                       "--result-backend", "redis://h/1", "--config", "cfg",
                       "--workdir", "/srv", "-q"], OPTIONS)
    assert args.root == {"app": "proj", "broker": "redis://h/0", "result_backend": "redis://h/1",
                         "config": "cfg", "workdir": "/srv", "quiet": True}
    assert [(o.opt, o.value) for o in args.options] == [("-c", "2")]


def test_detach_is_dropped_and_signals_are_read_only_where_accepted():
    assert parse_args(["w1", "--detach"], OPTIONS).options == []
    args = parse_args(["w1", "-KILL"], OPTIONS, accept_signal=True)
    assert args.signal == signal.SIGKILL and args.names == ["w1"]
    assert parse_signal("-9") == signal.SIGKILL and parse_signal("-SIGQUIT") == signal.SIGQUIT
    assert parse_signal("-images") is None
    # -QUIT is a signal where signals are accepted; -Qimages is always a queue
    assert parse_args(["w1", "-QUIT"], OPTIONS, accept_signal=True).signal == signal.SIGQUIT
    args = parse_args(["w1", "-Qimages"], OPTIONS, accept_signal=True)
    assert args.signal is None and args.options[0].value == "images"
    with pytest.raises(NodeSpecError):
        parse_args(["w1", "-KILL"], OPTIONS)


# -- templates and files ------------------------------------------------------------------------


def test_templates_expand_name_parts_and_leave_the_pool_index_to_the_worker():
    expanded = expand_template("n=%n h=%h p=%p d=%d i=%i I=%I pct=%% x=%x", "w1@box.example.com")
    assert expanded == ("n=w1 h=w1@box.example.com p=w1@box.example.com d=example.com "
                        "i=%i I=%I pct=%% x=%x")
    assert expand_template("%d", "w1@localhost") == ""


def test_default_pidfile_and_logfile_are_absolute_in_the_current_folder():
    node, = nodes_for("w1", cwd="/srv/q")
    assert node.pidfile == "/srv/q/w1.pid"
    assert node.logfile == "/srv/q/w1%I.log"
    assert node.main_logfile == "/srv/q/w1.log"
    assert worker_path(node.logfile, 2) == "/srv/q/w1-2.log"


def test_file_templates_per_node_and_relative_paths():
    first, second = nodes_for("w1", "w2", "--pidfile=run/%n.pid", "--logfile:w2=/var/log/%p-%i.log",
                              "--statedb", "%n.state", cwd="/srv/q")
    assert first.pidfile == "/srv/q/run/w1.pid"
    assert second.pidfile == "/srv/q/run/w2.pid"
    assert first.logfile == "/srv/q/w1%I.log"
    assert second.logfile == f"/var/log/w2@{HOST}-%i.log"
    assert second.main_logfile == f"/var/log/w2@{HOST}-0.log"
    assert second.options == ["--statedb", "w2.state"]
    # %% reaches the worker as it is and is a plain % in the file it writes
    node, = nodes_for("w1", "--pidfile", "/p/%%%n.pid")
    assert node.pidfile == "/p/%%w1.pid" and node.pidfile_path == "/p/%w1.pid"


def test_empty_pidfile_and_logfile_mean_none():
    node, = nodes_for("w1", "--pidfile=", "--logfile=")
    assert node.pidfile is None and node.logfile is None
    assert "--pidfile" not in node.argv() and "--logfile" not in node.argv()


# -- command lines ------------------------------------------------------------------------------


def test_command_line_of_a_detached_node():
    node, = nodes_for("w1", "-c", "3", "-l", "INFO",
                      root_args=root_arguments("proj", "settings", "/srv/q"))
    assert node.argv() == ["py", "-m", "qctl", "-A", "proj", "--config", "settings",
                           "--workdir", "/srv/q", "worker", "--detach", "-n", f"w1@{HOST}",
                           "--pidfile", "/srv/q/w1.pid", "--logfile", "/srv/q/w1%I.log",
                           "-c", "3", "-l", "INFO"]
    assert "--detach" not in node.argv(detach=False)
    assert node.command_line().startswith("py -m qctl -A proj --config settings")


def test_broker_urls_are_not_put_on_the_command_line():
    assert root_arguments(app="proj") == ["-A", "proj"]
    node, = nodes_for("w1", "-b", "redis://:secret@h/0")
    assert "secret" not in node.command_line()


def test_find_node_by_name_short_name_or_position():
    nodes = nodes_for("w1", "w2")
    assert find_node(nodes, "w2").name == f"w2@{HOST}"
    assert find_node(nodes, f"w1@{HOST}").index == 1
    assert find_node(nodes, "2").shortname == "w2"
    with pytest.raises(NodeSpecError, match="no node 'w9'"):
        find_node(nodes, "w9")


def test_global_value_reads_the_last_option_for_all_nodes():
    args = MultiArgs()
    assert args.global_value("hostname") is None
    args = parse_args(["w1", "-n", "a", "--hostname", "b"], OPTIONS)
    assert args.global_value("hostname") == "b"


# -- the pidfile identity check -----------------------------------------------------------------


def test_command_names_node_needs_qctl_worker_and_the_exact_name():
    base = ["python", "-m", "qctl", "-A", "proj", "worker", "--detach"]
    assert command_names_node(base + ["-n", "w1@h"], "w1@h")
    assert command_names_node(base + ["--hostname=w1@h"], "w1@h")
    assert command_names_node(base + ["-nw1@h"], "w1@h")
    assert not command_names_node(base + ["-n", "w10@h"], "w1@h")
    assert not command_names_node(["python", "-m", "qctl", "inspect", "-n", "w1@h"], "w1@h")
    assert not command_names_node(["sleep", "worker", "-n", "w1@h"], "w1@h")


@pytest.fixture
def lookalike():
    """A process whose command line reads like node w1@h's worker (it only sleeps)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "qctl", "worker", "-n", "w1@h"])
    yield proc
    proc.kill()
    proc.wait()


def _write(path, pid, age=0.0):
    path.write_text(f"{pid}\n")
    if age:
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))


def test_pidfile_is_trusted_only_for_that_nodes_live_process(tmp_path, lookalike):
    path = tmp_path / "w1.pid"
    _write(path, lookalike.pid)
    pidfile = Pidfile(str(path))
    assert pidfile.process(node="w1@h").pid == lookalike.pid
    assert pidfile.process(node="w2@h") is None            # another node's process
    _write(path, os.getpid())
    assert pidfile.process(node="w1@h") is None            # not a qctl worker at all
    _write(path, lookalike.pid, age=3600)                  # written before the process began
    assert pidfile.process(node="w1@h") is None


def test_remove_if_stale_keeps_a_live_nodes_file_and_a_replaced_one(tmp_path, lookalike):
    path = tmp_path / "w1.pid"
    _write(path, lookalike.pid)
    pidfile = Pidfile(str(path))
    assert not pidfile.remove_if_stale(node="w1@h")
    assert path.exists()
    assert pidfile.remove_if_stale(node="w2@h")            # for node w2 it is stale
    assert not path.exists()
    _write(path, 999_999_999)
    assert not pidfile.remove_if_stale(node="w1@h", pid=12345)   # names another PID now
    assert pidfile.remove_if_stale(node="w1@h", pid=999_999_999)


def test_acquire_refuses_a_live_node_and_replaces_a_stale_file(tmp_path, lookalike):
    path = tmp_path / "w1.pid"
    _write(path, lookalike.pid)
    with pytest.raises(PidfileError, match=f"pid {lookalike.pid}"):
        Pidfile(str(path)).acquire(node="w1@h")
    Pidfile(str(path)).acquire(node="w9@h")                # not w9's process: stale
    assert path.read_text() == f"{os.getpid()}\n"
    Pidfile(str(path)).release()
    assert not path.exists()
