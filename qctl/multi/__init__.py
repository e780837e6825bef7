"""``qctl multi``: many worker nodes on one host.

- ``nodes``: the command line of ``multi`` turned into nodes: names (``w1``, ``3``,
  ``w1@host``), per-node options (``-c:1-3 4``), file-name templates, worker command lines.
- ``control``: start, stop, stopwait, restart, kill and status of detached nodes, each node
  found through its pidfile and trusted only when psutil confirms it (``qctl.pidfile``).
- ``supervisor``: ``multi run``, the nodes as child processes of one foreground process.

Nothing here imports click or the worker runtime; ``qctl.cli.multi`` parses and renders.
"""
from __future__ import annotations

from .nodes import MultiArgs, Node, NodeSpecError, OptionSpec, build_nodes, expand_template, parse_args

__all__ = ["MultiArgs", "Node", "NodeSpecError", "OptionSpec", "build_nodes", "expand_template",
           "parse_args"]
