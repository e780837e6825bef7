"""Tests of qctl.routing: declarations, task_routes rules, exchange emulation, -Q/-X selection."""
from __future__ import annotations

import ast
import re
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from qctl.exceptions import ImproperlyConfigured, QueueNotFound
from qctl.routing import (Binding, Exchange, Queue, Router, parse_queue_list, select_queues,
                          topic_matches)

pytestmark = pytest.mark.timeout(30)


def qname(result: dict) -> str:
    return result["queue"].name


def dest(result: dict) -> tuple[str, str, str]:
    return qname(result), result["exchange"], result["routing_key"]


# -- declarations -----------------------------------------------------------------------------


def test_queue_defaults_follow_celery_missing_queue():
    q = Queue("video")
    assert q.exchange == Exchange("video", "direct")
    assert q.routing_key == "video"
    assert q.durable and not q.exclusive and not q.auto_delete
    assert q == Queue("video", Exchange("video"), "video")
    assert q != Queue("video", routing_key="other")
    assert q != Queue("audio")
    assert hash(q) == hash(Queue("video"))


def test_queue_with_string_exchange_and_as_dict_round_trip():
    q = Queue("v", "media", "media.video", max_priority=10, queue_arguments={"x-message-ttl": 5})
    assert q.exchange == Exchange("media")
    assert q.max_priority == 10
    assert q.declare_arguments() == {"x-message-ttl": 5, "x-max-priority": 10}
    data = q.as_dict()
    assert data["exchange"] == {"name": "media", "type": "direct", "durable": True,
                                "auto_delete": False, "arguments": {}}
    assert data["routing_key"] == "media.video" and data["max_priority"] == 10
    assert Queue(**data) == q
    assert Queue("p", queue_arguments={"x-max-priority": 3}).max_priority == 3


def test_exchange_types_and_validation():
    assert Exchange().name == "" and Exchange().type == "direct"
    for kind in ("direct", "topic", "fanout"):
        assert Exchange("x", kind).type == kind
    with pytest.raises(ImproperlyConfigured):
        Exchange("x", "bogus")
    with pytest.raises(ImproperlyConfigured):
        Queue("")
    assert Exchange("x", "topic") != Exchange("x", "fanout")
    assert Exchange("x").as_dict()["type"] == "direct"


def test_reprs_show_non_default_fields():
    assert repr(Exchange("x")) == "Exchange('x')"
    assert repr(Exchange("x", "topic")) == "Exchange('x', type='topic')"
    assert repr(Queue("a")) == "Queue('a')"
    text = repr(Queue("b", Exchange("m", "topic"), "m.#"))
    assert "Exchange('m', type='topic')" in text and "routing_key='m.#'" in text


def test_extra_bindings_replace_implicit_exchange():
    q = Queue("multi", bindings=[Binding(Exchange("a", "topic"), "x.*"), ("b", "k"),
                                 {"exchange": {"name": "c", "type": "fanout"}}])
    assert [(b.exchange.name, b.routing_key) for b in q.all_bindings()] == [("a", "x.*"), ("b", "k"), ("c", "")]
    both = Queue("both", Exchange("main"), "rk", bindings=[("b", "k")])
    assert [(b.exchange.name, b.routing_key) for b in both.all_bindings()] == [("main", "rk"), ("b", "k")]
    assert Queue(**q.as_dict()) == q


# -- topic matching ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,key,expected", [
    ("a.b", "a.b", True), ("a.b", "a.c", False),
    ("a.*", "a.b", True), ("a.*", "a", False), ("a.*", "a.b.c", False),
    ("*.b.*", "x.b.y", True), ("a.*.c", "a.c", False),
    ("a.#", "a", True), ("a.#", "a.b.c", True), ("a.#", "b.a", False),
    ("#", "", True), ("#", "x.y", True), ("*", "", False),
    ("a.#.z", "a.z", True), ("a.#.z", "a.b.c.z", True), ("a.#.z", "a.b.c", False),
    ("#.x", "a.b", False), ("#.x", "x", True),
])
def test_topic_matches(pattern, key, expected):
    assert topic_matches(pattern, key) is expected


# -- task_routes ------------------------------------------------------------------------------


def test_no_routes_uses_default_queue():
    r = Router(None, None)
    res = r.route({}, "proj.tasks.add")
    assert dest(res) == ("celery", "celery", "celery")
    assert isinstance(res["queue"], Queue)
    assert list(r.queues) == ["celery"]


def test_default_queue_name_exchange_and_key_are_configurable():
    r = Router(None, None, default_queue="jobs", default_exchange="jx", default_routing_key="job.key")
    res = r.route({}, "t")
    assert dest(res) == ("jobs", "jx", "job.key")
    assert r.queues["jobs"].exchange.name == "jx"
    assert Router(None, None, default_queue="jobs").route({}, "t")["exchange"] == "jobs"


def test_dict_exact_route():
    r = Router({"proj.tasks.add": {"queue": "math"}}, None)
    assert dest(r.route({}, "proj.tasks.add")) == ("math", "math", "math")
    assert qname(r.route({}, "proj.tasks.other")) == "celery"


def test_dict_plain_string_route_is_queue_name():
    r = Router({"proj.tasks.add": "math"}, None)
    assert qname(r.route({}, "proj.tasks.add")) == "math"


def test_dict_glob_route_and_exact_beats_glob():
    r = Router({"proj.tasks.*": {"queue": "proj"}, "proj.tasks.special": "special",
                "proj.?eports.build": "reports"}, None)
    assert qname(r.route({}, "proj.tasks.add")) == "proj"
    assert qname(r.route({}, "proj.tasks.special")) == "special"
    assert qname(r.route({}, "proj.reports.build")) == "reports"
    assert qname(r.route({}, "other.tasks.add")) == "celery"
    assert qname(r.route({}, "xproj.tasks.add")) == "celery"  # fnmatch matches the whole name


def test_dict_route_with_exchange_and_routing_key():
    media = Exchange("media", "topic")
    r = Router({"proj.encode": {"exchange": "media", "routing_key": "media.video"}},
               [Queue("video", media, "media.video"), Queue("images", media, "media.image"), Queue("celery")],
               create_missing=False)
    res = r.route({}, "proj.encode")
    assert dest(res) == ("video", "media", "media.video")


def test_route_may_name_an_exchange_object():
    r = Router({"t": {"exchange": Exchange("media", "topic"), "routing_key": "media.image"}},
               [Queue("images", Exchange("media", "topic"), "media.*")])
    res = r.route({}, "t")
    assert dest(res) == ("images", "media", "media.image")


def test_queue_route_keeps_queue_exchange_but_route_routing_key_wins():
    feeds = Queue("feeds", Exchange("feeds", "topic"), "feed.#")
    r = Router({"import_feed": {"queue": "feeds", "routing_key": "feed.import"}}, [feeds])
    assert dest(r.route({}, "import_feed")) == ("feeds", "feeds", "feed.import")


def test_list_of_pairs_with_regex_and_glob():
    routes = ([(re.compile(r"(video|image)\.tasks\..*"), {"queue": "media"}),
               ("admin.*", "admin")],)
    r = Router(routes, None)
    assert qname(r.route({}, "video.tasks.encode")) == "media"
    assert qname(r.route({}, "image.tasks.resize")) == "media"
    assert qname(r.route({}, "admin.purge")) == "admin"
    assert qname(r.route({}, "audio.tasks.x")) == "celery"


def test_single_pair_entry_and_order_of_pairs():
    r = Router([("a.*", "first"), [("a.b", "second"), ("c", "third")]], None)
    assert qname(r.route({}, "a.b")) == "first"
    assert qname(r.route({}, "c")) == "third"


def test_list_first_router_with_a_route_wins():
    calls = []

    def never(name, args, kwargs, options, task=None, **kw):
        calls.append(name)
        return None

    r = Router([never, {"t": "from_map"}, lambda *a, **k: "from_callable"], None)
    assert qname(r.route({}, "t")) == "from_map"
    assert qname(r.route({}, "u")) == "from_callable"
    assert calls == ["t", "u"]


def test_callable_router_receives_everything():
    seen = {}

    def router(name, args, kwargs, options, task=None, **kw):
        seen.update(name=name, args=args, kwargs=kwargs, options=options, task=task)
        if kwargs.get("big"):
            return {"queue": "big", "priority": 9}
        return None

    task = SimpleNamespace(name="t")
    r = Router(router, None)
    res = r.route({"countdown": 3}, "t", (1, 2), {"big": True}, task=task)
    assert qname(res) == "big" and res["priority"] == 9 and res["countdown"] == 3
    assert seen == {"name": "t", "args": (1, 2), "kwargs": {"big": True},
                    "options": {"countdown": 3}, "task": task}
    assert qname(r.route({}, "t", (), {})) == "celery"


def test_callable_router_with_fewer_arguments():
    seen = []

    def four(name, args, kwargs, options):
        seen.append(("four", name, args, kwargs, options))
        return "q4"

    def three(name, args, kwargs):
        seen.append(("three", name, args, kwargs))
        return None

    def two(name, args):
        seen.append(("two", name, args))
        return None

    def one(name):
        seen.append(("one", name))
        return None

    r = Router([one, two, three, four], None)
    assert qname(r.route({"countdown": 1}, "t", (1,), {"a": 1}, task=object())) == "q4"
    assert seen == [("one", "t"), ("two", "t", (1,)), ("three", "t", (1,), {"a": 1}),
                    ("four", "t", (1,), {"a": 1}, {"countdown": 1})]


def test_callable_router_typeerror_inside_is_not_swallowed():
    def router(name, args, kwargs, options, task=None):
        raise TypeError("bug in router")

    with pytest.raises(TypeError, match="bug in router"):
        Router(router, None).route({}, "t")


def test_router_returning_queue_object():
    q = Queue("special", Exchange("sx", "direct"), "sk")
    r = Router(lambda name, *a, **k: q, None)
    assert dest(r.route({}, "t")) == ("special", "sx", "sk")


def test_pre_4_router_class_with_route_for_task():
    class OldRouter:
        def route_for_task(self, task, args=None, kwargs=None):
            return {"queue": "old"} if task == "t" else None

    assert qname(Router([OldRouter], None).route({}, "t")) == "old"
    assert qname(Router([OldRouter()], None).route({}, "u")) == "celery"


@pytest.fixture
def router_module(tmp_path, monkeypatch):
    pkg = tmp_path / "routepkg_qctl_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "routers.py").write_text(textwrap.dedent("""
        IMPORTED = []
        IMPORTED.append(1)

        def route_task(name, args, kwargs, options, task=None, **kw):
            if name.startswith("imp."):
                return {"queue": "imported"}

        ROUTES = {"map.*": "mapped"}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "routepkg_qctl_test.routers"
    for mod in [m for m in sys.modules if m.startswith("routepkg_qctl_test")]:
        del sys.modules[mod]


@pytest.mark.parametrize("sep", [".", ":"])
def test_router_imported_by_string(router_module, sep):
    r = Router([f"{router_module}{sep}route_task"], None)
    assert router_module not in sys.modules  # imported on first use, not at configuration
    assert qname(r.route({}, "imp.x")) == "imported"
    assert qname(r.route({}, "other")) == "celery"
    assert sys.modules[router_module].IMPORTED == [1]


def test_single_string_route_and_imported_mapping(router_module):
    assert qname(Router(f"{router_module}.route_task", None).route({}, "imp.y")) == "imported"
    assert qname(Router([f"{router_module}:ROUTES"], None).route({}, "map.z")) == "mapped"


def test_bad_import_string_raises():
    r = Router(["no_such_module_qctl.router"], None)
    with pytest.raises(ImproperlyConfigured):
        r.route({}, "t")


def test_invalid_routes_are_rejected():
    with pytest.raises(ImproperlyConfigured):
        Router([42], None)
    with pytest.raises(ImproperlyConfigured):
        Router([[(1, "q")]], None)
    with pytest.raises(ImproperlyConfigured):
        Router(lambda *a, **k: 42, None).route({}, "t")


# -- options over routes ----------------------------------------------------------------------


def test_explicit_queue_option_overrides_route():
    r = Router({"t": {"queue": "routed"}}, None)
    res = r.route({"queue": "explicit", "priority": 5}, "t")
    assert dest(res) == ("explicit", "explicit", "explicit")
    assert res["priority"] == 5


def test_explicit_queue_option_drops_routes_exchange_and_key():
    r = Router({"t": {"exchange": "media", "routing_key": "media.video"}},
               [Queue("video", Exchange("media", "topic"), "media.#"), Queue("other")])
    assert dest(r.route({"queue": "other"}, "t")) == ("other", "other", "other")


def test_explicit_routing_key_merges_over_routed_queue():
    feeds = Queue("feeds", Exchange("feeds", "topic"), "feed.#")
    r = Router({"t": "feeds"}, [feeds])
    assert dest(r.route({"routing_key": "feed.special"}, "t")) == ("feeds", "feeds", "feed.special")


def test_explicit_exchange_option_overrides_routed_queue():
    fan = Exchange("bcast", "fanout")
    r = Router({"t": "routed"}, [Queue("routed"), Queue("f1", fan), Queue("f2", fan)])
    res = r.route({"exchange": "bcast"}, "t")
    assert res["exchange"] == "bcast" and qname(res) == "f1"


def test_none_valued_options_do_not_override_and_other_keys_are_kept():
    r = Router({"t": {"queue": "routed", "priority": 3}}, None)
    res = r.route({"queue": None, "priority": None, "exchange": None, "countdown": 10,
                   "expires": None}, "t")
    assert dest(res) == ("routed", "routed", "routed")
    assert res["priority"] == 3 and res["countdown"] == 10 and "expires" in res
    res = Router(None, None).route({"priority": 7, "serializer": "json"}, "t")
    assert res["priority"] == 7 and res["serializer"] == "json" and qname(res) == "celery"


def test_route_does_not_mutate_options():
    options = {"queue": "x", "priority": 1}
    Router(None, None).route(options, "t")
    assert options == {"queue": "x", "priority": 1}


def test_queue_option_may_be_a_queue_object():
    q = Queue("obj", Exchange("ox", "topic"), "o.k")
    r = Router(None, None, create_missing=False)
    assert dest(r.route({"queue": q}, "t")) == ("obj", "ox", "o.k")


def test_default_exchange_option_targets_queue_named_by_routing_key():
    r = Router(None, [Queue("celery"), Queue("direct_q")])
    assert dest(r.route({"exchange": "", "routing_key": "direct_q"}, "t")) == ("direct_q", "", "direct_q")


# -- task defaults ----------------------------------------------------------------------------


def test_task_defaults_used_when_nothing_else_sets_them():
    task = SimpleNamespace(queue="task_q", priority=4)
    r = Router(None, None)
    res = r.route({}, "t", task=task)
    assert qname(res) == "task_q" and res["priority"] == 4
    assert "priority" not in r.route({}, "t", task=SimpleNamespace(queue=None, priority=None))
    assert qname(r.route({}, "t", task=SimpleNamespace(queue=None, priority=None))) == "celery"


def test_route_and_options_beat_task_defaults():
    task = SimpleNamespace(queue="task_q", priority=4)
    r = Router({"t": {"queue": "routed", "priority": 6}}, None)
    res = r.route({}, "t", task=task)
    assert qname(res) == "routed" and res["priority"] == 6
    res = r.route({"queue": "opt", "priority": 1}, "t", task=task)
    assert qname(res) == "opt" and res["priority"] == 1
    res = r.route({}, "u", task=task)  # no route for u
    assert qname(res) == "task_q" and res["priority"] == 4


# -- task_queues and create_missing -----------------------------------------------------------


def test_known_queue_object_is_used_for_its_name():
    q = Queue("hi", Exchange("hx", "direct"), "hk", max_priority=10)
    r = Router({"t": "hi"}, [q, Queue("celery")], create_missing=False)
    res = r.route({}, "t")
    assert res["queue"] is q and dest(res) == ("hi", "hx", "hk")


def test_create_missing_remembers_new_queue():
    r = Router({"t": "fresh"}, [Queue("celery")])
    res = r.route({}, "t")
    assert res["queue"] == Queue("fresh")
    assert "fresh" in r.queues and r.queues["fresh"] is r.route({}, "t")["queue"]
    assert "fresh" in r.resolve_exchange("fresh", "fresh")


def test_missing_queue_raises_when_create_missing_off():
    r = Router({"t": "nowhere"}, [Queue("celery")], create_missing=False)
    with pytest.raises(QueueNotFound):
        r.route({}, "t")
    with pytest.raises(QueueNotFound):
        r.route({"queue": "nope"}, "u")
    with pytest.raises(KeyError):  # QueueNotFound is a KeyError, as in Celery
        r.get_queue("nope")
    assert "nowhere" not in r.queues
    assert qname(r.route({}, "u")) == "celery"


def test_default_queue_must_exist_when_task_queues_given_and_create_missing_off():
    r = Router(None, [Queue("a")], create_missing=False)
    with pytest.raises(QueueNotFound):
        r.route({}, "t")
    r = Router(None, [Queue("a")], create_missing=True)
    assert dest(r.route({}, "t")) == ("celery", "celery", "celery")


def test_queues_attribute_maps_names_to_queues():
    a, b = Queue("a"), Queue("b", Exchange("x", "fanout"))
    r = Router(None, [a, b])
    assert r.queues == {"a": a, "b": b}
    assert set(r.exchanges) == {"a", "x"} and r.exchanges["x"].type == "fanout"


# -- exchange emulation -----------------------------------------------------------------------


def mesh_queues() -> list[Queue]:
    media = Exchange("media", "topic")
    fan = Exchange("bcast", "fanout")
    direct = Exchange("jobs", "direct")
    return [
        Queue("celery"),
        Queue("video", media, "media.video.*"),
        Queue("all_media", media, "media.#"),
        Queue("images", media, "media.image"),
        Queue("f1", fan), Queue("f2", fan, "ignored"),
        Queue("high", direct, "high"), Queue("high2", direct, "high"), Queue("low", direct, "low"),
        Queue("extra", bindings=[("jobs", "low"), Binding(media, "*.audio")]),
    ]


@pytest.fixture
def mesh() -> Router:
    return Router(None, mesh_queues())


def test_resolve_direct(mesh):
    assert mesh.resolve_exchange("jobs", "high") == ["high", "high2"]
    assert mesh.resolve_exchange("jobs", "low") == ["low", "extra"]
    assert mesh.resolve_exchange("jobs", "none") == []
    assert mesh.resolve_exchange("video", "video") == []  # implicit exchange not bound: bindings given
    assert mesh.resolve_exchange("celery", "celery") == ["celery"]


def test_resolve_topic(mesh):
    assert mesh.resolve_exchange("media", "media.video.hd") == ["video", "all_media"]
    assert mesh.resolve_exchange(Exchange("media", "topic"), "media.image") == ["all_media", "images"]
    assert mesh.resolve_exchange("media", "media") == ["all_media"]
    assert mesh.resolve_exchange("media", "media.audio") == ["all_media", "extra"]
    assert mesh.resolve_exchange("media", "other.x") == []


def test_resolve_fanout(mesh):
    assert mesh.resolve_exchange("bcast", "") == ["f1", "f2"]
    assert mesh.resolve_exchange("bcast", "anything") == ["f1", "f2"]


def test_resolve_default_exchange_and_unknown(mesh):
    assert mesh.resolve_exchange("", "images") == ["images"]
    assert mesh.resolve_exchange("", "unknown") == []
    assert mesh.resolve_exchange("no_such_exchange", "x") == []


def test_route_to_exchange_without_queue_picks_first_reached_queue():
    mesh = Router({"t": {"exchange": "jobs", "routing_key": "low"}}, mesh_queues())
    assert dest(mesh.route({}, "t")) == ("low", "jobs", "low")
    res = mesh.route({"exchange": "media", "routing_key": "unmatched.key"}, "u")
    assert dest(res) == ("celery", "media", "unmatched.key")  # Celery: default queue, given exchange


# -- worker -Q / -X ---------------------------------------------------------------------------


def test_parse_queue_list():
    assert parse_queue_list("a,b") == ["a", "b"]
    assert parse_queue_list(" a , b ,, a ") == ["a", "b"]
    assert parse_queue_list(["a,b", "c", ("d", "a")]) == ["a", "b", "c", "d"]
    assert parse_queue_list([Queue("q1"), "q2"]) == ["q1", "q2"]
    assert parse_queue_list({"x": Queue("x"), "y": Queue("y")}) == ["x", "y"]
    assert parse_queue_list(None) == [] and parse_queue_list("") == []


def test_select_queues():
    everything = ["celery", "a", "b", "c"]
    assert select_queues(everything, None, None) == everything
    assert select_queues(everything, "b,a", None) == ["b", "a"]
    assert select_queues(everything, ["a", "new"], None) == ["a", "new"]  # -Q creates missing
    assert select_queues(everything, None, "c") == ["celery", "a", "b"]
    assert select_queues(everything, "a,b", ["b"]) == ["a"]
    assert select_queues(everything, [], []) == everything
    assert select_queues([Queue("x"), Queue("y")], None, "x") == ["y"]
    assert select_queues(Router(None, None).queues, None, None) == ["celery"]
    assert select_queues(everything, None, everything) == []


# -- module hygiene ---------------------------------------------------------------------------


def test_routing_imports_only_the_standard_library():
    source = Path(__file__).resolve().parents[2] / "qctl" / "routing.py"
    tree = ast.parse(source.read_text())
    top = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            top.add(node.module.split(".")[0])
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top
    assert not top & {"click", "rich", "redis", "pika", "psutil"}
