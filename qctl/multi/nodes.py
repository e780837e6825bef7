"""From ``multi``'s command line to nodes: names, per-node options, templates, command lines.

The grammar is Celery's ``multi``, with its traps closed:

- Node names: ``w1`` becomes ``w1@<hostname>``; ``name@host`` is kept (``%h`` in it is the
  host name); a single number ``3`` means three nodes ``qctl1@host`` .. ``qctl3@host``
  (prefix: ``--range-prefix``). A number among names, a duplicate or a malformed name is a
  `NodeSpecError`, never a node called ``INFO``.
- Options: every worker option, spelled as ``qctl worker`` accepts it. Whether an option takes
  a value is known from the worker's own option table, so ``--loglevel INFO`` works without
  ``=`` (Celery would take ``INFO`` for a node name). An unknown option is an error.
- Per-node options: ``-c:1-3 4`` (1-based positions, ranges and lists: ``1,3``, ``2-4``),
  ``-c:w1 2`` or ``--concurrency:w1,w2=2`` (names, short or full). A per-node option beats
  the same option given for all nodes, whatever their order; among per-node options the last
  one wins. A range may run past the last node (``-c:1-3`` with two nodes means both); a
  position or name that matches no node is an error.
- The root options ``-A/--app``, ``-b/--broker``, ``--result-backend``, ``--config`` and
  ``--workdir`` may come after the nodes too; they are kept apart (``MultiArgs.root``).
  ``-n/--hostname`` sets the host part of the generated names, as in Celery.
- Templates in option values: ``%n`` node name without host, ``%h`` and ``%p`` full node
  name, ``%d`` domain (the host part after its first dot, as the worker reads it). ``%i``,
  ``%I`` and ``%%`` reach the worker unchanged: it expands ``%i``/``%I`` per pool process and
  ``%%`` to ``%``.
- Defaults: ``--pidfile=%n.pid`` and ``--logfile=%n%I.log``, relative to the current folder;
  both are passed to the worker as absolute paths.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

DEFAULT_PIDFILE = "%n.pid"
DEFAULT_LOGFILE = "%n%I.log"
DEFAULT_RANGE_PREFIX = "qctl"
MAX_NODES = 1000

#: Options of the root ``qctl`` command that may follow the nodes; they go before ``worker``.
ROOT_OPTIONS = {"-A": "app", "--app": "app", "-b": "broker", "--broker": "broker",
                "--result-backend": "result_backend", "--config": "config",
                "--workdir": "workdir"}
#: Root flags that may follow the nodes: they shape multi's own output, not the workers'.
ROOT_FLAGS = {"-q": "quiet", "--quiet": "quiet", "--no-color": "no_color"}

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+\-]*$")
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_RANGE = re.compile(r"^(\d+)-(\d+)$")
_TEMPLATE = re.compile(r"%(.)", re.S)
_SIGNAL = re.compile(r"^-(?:SIG)?([A-Z][A-Z0-9]*|\d+)$")


class NodeSpecError(ValueError):
    """A node name, count, per-node scope or option that cannot be used (a usage error)."""


@dataclass(frozen=True)
class OptionSpec:
    """One worker option: its canonical ``key``, whether it is a ``flag`` (takes no value),
    and whether it may be given ``multiple`` times (values add up instead of replacing)."""

    key: str
    flag: bool = False
    multiple: bool = False


@dataclass
class Occurrence:
    """One option as written: ``-c:1-3 4`` is ``Occurrence('-c', spec, '4', scope='1-3')``."""

    opt: str
    spec: OptionSpec
    value: str | None
    scope: str | None = None

    def tokens(self) -> list[str]:
        return [self.opt] if self.spec.flag else [self.opt, self.value or ""]


@dataclass
class MultiArgs:
    """``multi``'s arguments, sorted: node specs, root options, worker options, a signal."""

    names: list[str] = field(default_factory=list)
    root: dict[str, Any] = field(default_factory=dict)
    options: list[Occurrence] = field(default_factory=list)
    signal: signal.Signals | None = None

    def global_value(self, key: str) -> str | None:
        """The value of worker option ``key`` given for all nodes (the last one), or None."""
        found = [o.value for o in self.options if o.spec.key == key and o.scope is None]
        return found[-1] if found else None


def parse_signal(token: str) -> signal.Signals | None:
    """``-KILL``, ``-SIGKILL``, ``-9`` -> the signal; None when ``token`` is no signal."""
    match = _SIGNAL.match(token)
    if not match:
        return None
    name = match.group(1)
    try:
        return signal.Signals(int(name)) if name.isdigit() else signal.Signals[f"SIG{name}"]
    except (KeyError, ValueError):
        return None


def parse_args(tokens: Sequence[str], worker_options: Mapping[str, OptionSpec],
               accept_signal: bool = False) -> MultiArgs:
    """Sort ``multi``'s free arguments (everything click did not consume).

    ``worker_options`` maps every spelling of every worker option (``-c``, ``--concurrency``)
    to its `OptionSpec`. With ``accept_signal``, ``-KILL``/``-9`` style tokens name the signal
    to send (``stop``, ``stopwait``). Raises `NodeSpecError` for anything unusable.
    """
    args = MultiArgs()
    queue = list(tokens)
    while queue:
        token = queue.pop(0)
        if token == "-" or not token.startswith("-"):
            args.names.append(token)
            continue
        if accept_signal:
            signum = parse_signal(token)
            if signum is not None:
                args.signal = signum
                continue
        opt, scope, value = _split_option(token, worker_options)
        if opt is None:  # a cluster of short flags: -EB
            for letter in token[1:]:
                args.options.append(Occurrence(f"-{letter}", worker_options[f"-{letter}"], None))
            continue
        if opt in ROOT_FLAGS:
            if value is not None or scope is not None:
                raise NodeSpecError(f"{opt} takes no value and applies to all nodes")
            args.root[ROOT_FLAGS[opt]] = True
            continue
        if opt in ROOT_OPTIONS:
            if scope is not None:
                raise NodeSpecError(f"{opt} applies to all nodes; it cannot be given per node")
            args.root[ROOT_OPTIONS[opt]] = _take_value(opt, value, queue)
            continue
        spec = worker_options[opt]
        if spec.flag:
            if value is not None:
                raise NodeSpecError(f"option {opt} takes no value (got {value!r})")
        else:
            value = _take_value(opt, value, queue)
        if spec.key == "hostname" and scope is not None:
            raise NodeSpecError(f"{opt} sets the host part of every node name; "
                                "it cannot be given per node")
        if spec.key == "detach":
            continue  # start always detaches, run never does
        args.options.append(Occurrence(opt, spec, value, scope))
    return args


def _split_option(token: str, known: Mapping[str, OptionSpec]) -> tuple[str | None, str | None,
                                                                        str | None]:
    """``token`` -> (option, scope, attached value); option None for a flag cluster.

    ``--opt[:scope][=value]``, ``-o[:scope][=value]``, ``-oVALUE`` (an option that takes a
    value) and ``-EB`` (flags only) are understood.
    """
    if token.startswith("--"):
        head, eq, attached = token.partition("=")
        opt, colon, scope = head.partition(":")
    elif token[2:3] == ":":
        opt, colon = token[:2], ":"
        scope, eq, attached = token[3:].partition("=")
    else:
        opt, colon, scope, eq, attached = token[:2], "", "", "", ""
        rest = token[2:]
        spec = known.get(opt)
        if rest and (opt in ROOT_OPTIONS or (spec is not None and not spec.flag)):
            attached, eq = (rest[1:] if rest.startswith("=") else rest), "="   # -c4, -Aproj
        elif rest:
            if all(known.get(f"-{c}") is not None and known[f"-{c}"].flag for c in token[1:]):
                return None, None, None
            raise NodeSpecError(f"unknown worker option {token!r}")
    if opt not in known and opt not in ROOT_OPTIONS and opt not in ROOT_FLAGS:
        raise NodeSpecError(f"unknown worker option {opt!r} (see qctl worker --help)")
    if colon and not scope:
        raise NodeSpecError(f"{token!r}: name the nodes after ':' (e.g. {opt}:1-3 or {opt}:w1)")
    return opt, (scope if colon else None), (attached if eq else None)


def _take_value(opt: str, attached: str | None, queue: list[str]) -> str:
    if attached is not None:
        return attached
    if not queue:
        raise NodeSpecError(f"option {opt} needs a value")
    return queue.pop(0)


# -- names ----------------------------------------------------------------------------------


def node_names(specs: Sequence[str], host: str | None = None,
               range_prefix: str = DEFAULT_RANGE_PREFIX) -> list[str]:
    """Full node names for the node arguments (see the module docstring)."""
    host = host or socket.gethostname()
    if not specs:
        raise NodeSpecError("no nodes given: name them (w1 w2) or give a count (3)")
    if len(specs) == 1 and specs[0].isdigit():
        count = int(specs[0])
        if not 1 <= count <= MAX_NODES:
            raise NodeSpecError(f"node count must be between 1 and {MAX_NODES}, got {count}")
        if not _NAME.match(range_prefix):
            raise NodeSpecError(f"bad --range-prefix {range_prefix!r}")
        return [f"{range_prefix}{i}@{host}" for i in range(1, count + 1)]
    names: list[str] = []
    for spec in specs:
        if spec.isdigit():
            raise NodeSpecError(f"a node count ({spec}) must be the only node argument")
        name, at, node_host = spec.replace("%h", host).partition("@")
        node_host = node_host if at else host
        if not _NAME.match(name) or not _HOST.match(node_host):
            raise NodeSpecError(f"bad node name {spec!r} (expected NAME or NAME@HOST)")
        full = f"{name}@{node_host}"
        if full in names:
            raise NodeSpecError(f"node {full} is given twice")
        names.append(full)
    return names


def scope_indexes(scope: str, names: Sequence[str]) -> set[int]:
    """0-based indexes of the nodes a per-node scope (``1-3``, ``1,3``, ``w1``) names."""
    found: set[int] = set()
    shorts = [n.partition("@")[0] for n in names]
    for item in (part.strip() for part in scope.split(",")):
        if not item:
            raise NodeSpecError(f"empty node in ':{scope}'")
        match = _RANGE.match(item)
        if item.isdigit() or match:
            first, last = (int(item), int(item)) if item.isdigit() else map(int, match.groups())
            if not 1 <= first <= min(last, len(names)):
                raise NodeSpecError(f"':{scope}': position {item} is outside 1-{len(names)}")
            found.update(range(first - 1, min(last, len(names))))  # 1-3 of 2 nodes: both
            continue
        hits = [i for i, (full, short) in enumerate(zip(names, shorts)) if item in (full, short)]
        if not hits:
            raise NodeSpecError(f"':{scope}': {item!r} names no node (nodes: {', '.join(names)})")
        found.update(hits)
    return found


# -- templates ------------------------------------------------------------------------------


def expand_template(template: str, nodename: str) -> str:
    """Expand ``%n`` ``%h`` ``%p`` ``%d`` for ``nodename``; keep ``%i`` ``%I`` ``%%`` (and
    anything unknown) for the worker."""
    name, _, host = nodename.partition("@")
    values = {"n": name, "h": nodename, "p": nodename, "d": host.partition(".")[2]}
    return _TEMPLATE.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def worker_path(path: str, index: int | None = 0) -> str:
    """The file a worker uses for a path given to it: ``%%`` is ``%``; for a log file of
    process ``index`` (0 = main), ``%i`` is the index and ``%I`` ``-<index>`` (nothing in the
    main process). ``index=None`` (pidfiles) leaves ``%i``/``%I`` alone."""
    text = path.replace("%%", "\0")
    if index is not None:
        text = text.replace("%i", str(index)).replace("%I", f"-{index}" if index else "")
    return text.replace("\0", "%")


# -- nodes ----------------------------------------------------------------------------------


@dataclass
class Node:
    """One worker node and everything needed to start it."""

    name: str                     # w1@host
    index: int                    # 1-based position on the command line
    options: list[str]            # worker options, per-node resolved and expanded
    pidfile: str | None           # absolute, as passed to the worker (None: no pidfile)
    logfile: str | None           # absolute, as passed to the worker (None: stderr)
    root_args: list[str] = field(default_factory=list)
    python: str = sys.executable

    @property
    def shortname(self) -> str:
        return self.name.partition("@")[0]

    @property
    def pidfile_path(self) -> str | None:
        """The file the worker writes its PID to."""
        return worker_path(self.pidfile, None) if self.pidfile else None

    @property
    def main_logfile(self) -> str | None:
        """The main process's log file (``%I`` -> nothing, ``%i`` -> ``0``)."""
        return worker_path(self.logfile) if self.logfile else None

    def argv(self, detach: bool = True) -> list[str]:
        """``python -m qctl [root options] worker [--detach] -n NAME --pidfile P --logfile L
        [options]``."""
        argv = [self.python, "-m", "qctl", *self.root_args, "worker"]
        if detach:
            argv.append("--detach")
        argv += ["-n", self.name]
        if self.pidfile:
            argv += ["--pidfile", self.pidfile]
        if self.logfile:
            argv += ["--logfile", self.logfile]
        return argv + self.options

    def command_line(self, detach: bool = True) -> str:
        return shlex.join(self.argv(detach))


def root_arguments(app: str | None = None, config: str | None = None,
                   workdir: str | None = None) -> list[str]:
    """The root options every node gets, before ``worker``. ``-b``/``--result-backend`` are
    not among them: nodes inherit them as ``QCTL_BROKER_URL``/``QCTL_RESULT_BACKEND``, so that
    passwords never show in ``ps``."""
    args: list[str] = []
    if app:
        args += ["-A", app]
    if config:
        args += ["--config", config]
    if workdir:
        args += ["--workdir", workdir]
    return args


def build_nodes(args: MultiArgs, cwd: str | None = None, host: str | None = None,
                range_prefix: str = DEFAULT_RANGE_PREFIX, root_args: Iterable[str] = (),
                python: str = sys.executable) -> list[Node]:
    """The nodes ``args`` describe, with per-node options resolved and templates expanded.

    ``cwd`` (default: the current folder) anchors relative pidfile and logfile paths. An empty
    ``--pidfile=``/``--logfile=`` means none (for ``multi run``: log to stderr).
    """
    cwd = cwd or os.getcwd()
    names = node_names(args.names, host=args.global_value("hostname") or host,
                       range_prefix=range_prefix)
    scoped = [(o, scope_indexes(o.scope, names)) for o in args.options if o.scope is not None]
    nodes = []
    for i, name in enumerate(names):
        chosen: dict[str, list[Occurrence]] = {}
        picked = [o for o in args.options if o.scope is None] + \
                 [o for o, where in scoped if i in where]
        for occ in picked:
            if occ.spec.key == "hostname":
                continue
            if occ.spec.multiple:
                chosen.setdefault(occ.spec.key, []).append(occ)
            else:
                chosen[occ.spec.key] = [occ]
        pidfile = _path_option(chosen.pop("pidfile", None), DEFAULT_PIDFILE, name, cwd)
        logfile = _path_option(chosen.pop("logfile", None), DEFAULT_LOGFILE, name, cwd)
        options: list[str] = []
        for occurrences in chosen.values():
            for occ in occurrences:
                value = None if occ.value is None else expand_template(occ.value, name)
                options += Occurrence(occ.opt, occ.spec, value).tokens()
        nodes.append(Node(name=name, index=i + 1, options=options, pidfile=pidfile,
                          logfile=logfile, root_args=list(root_args), python=python))
    return nodes


def _path_option(given: list[Occurrence] | None, default: str, name: str, cwd: str) -> str | None:
    value = given[-1].value if given else default
    if not value:
        return None
    return os.path.normpath(os.path.join(cwd, expand_template(os.path.expanduser(value), name)))


def find_node(nodes: Sequence[Node], wanted: str) -> Node:
    """The node called ``wanted`` (full or short name, or 1-based position)."""
    for node in nodes:
        if wanted in (node.name, node.shortname) or (wanted.isdigit() and int(wanted) == node.index):
            return node
    raise NodeSpecError(f"no node {wanted!r} among {', '.join(n.name for n in nodes)}")
