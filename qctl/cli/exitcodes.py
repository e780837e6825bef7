"""Named exit codes of the ``qctl`` command (BSD ``sysexits.h`` values, as Celery uses).

Scripts and systemd units rely on these numbers, so they never change meaning:

====  ===========  ==================================================================
code  name         when
====  ===========  ==================================================================
0     OK           the command did what was asked
1     FAILURE      the operation ran but failed: a task FAILED or was REVOKED, the
                   user declined a confirmation, some ids were not found
2     (click)      command-line syntax: unknown option, bad option value, bad JSON in
                   ``--args`` (click's own usage error; not defined here)
64    USAGE        the command line names something unusable: ``-A`` cannot be
                   loaded, ``--config`` cannot be imported, an option not supported yet
65    DATAERR      stored data cannot be read (undecodable result, content refused)
66    NOINPUT      a named input (file, id) does not exist
69    UNAVAILABLE  the broker or result backend cannot be reached, no node replied
70    SOFTWARE     an internal error (a bug: run with ``QCTL_DEBUG=1`` for the traceback)
                   or a feature that is not implemented yet
73    CANTCREAT    a pidfile names a running node, or cannot be created
75    TEMPFAIL     a wait timed out (``--wait --timeout``); trying again may succeed
77    NOPERM       ``--uid``/``--gid`` could not be taken (not root)
78    CONFIG       the configuration is wrong: unknown URL scheme, bad setting value
====  ===========  ==================================================================
"""
from __future__ import annotations

OK = 0
FAILURE = 1
USAGE = 64
DATAERR = 65
NOINPUT = 66
UNAVAILABLE = 69
SOFTWARE = 70
CANTCREAT = 73
TEMPFAIL = 75
NOPERM = 77
CONFIG = 78

__all__ = ["OK", "FAILURE", "USAGE", "DATAERR", "NOINPUT", "UNAVAILABLE", "SOFTWARE",
           "CANTCREAT", "TEMPFAIL", "NOPERM", "CONFIG"]
