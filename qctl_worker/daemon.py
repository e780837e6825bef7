"""Running a node in the background: ``--detach``, file-name templates, privileges.

``detach()`` forks twice (the daemon is in a new session, not a child of the shell) and
keeps the foreground process waiting on a pipe until the daemon reports. The foreground
process exits 0 only once the daemon is *consuming*, or with the daemon's exit code and
its one-line reason when it failed to start; ``qctl multi start`` builds on exactly that.

    foreground ──fork──> session leader ──fork──> daemon: setsid, umask, workdir, ids,
        │                     (exits at once)         stdio -> /dev/null, run the node,
        └── waits for "READY" / "FAIL <code> <reason>" on the pipe ───────┘
"""
from __future__ import annotations

import errno
import grp
import os
import pwd
import select
import sys
import time

#: Set in the environment of a node that re-executes itself on HUP: it is a daemon already.
REEXEC_ENV = "QCTL_DETACHED_REEXEC"
START_TIMEOUT = 120.0

EX_SOFTWARE, EX_NOPERM, EX_TEMPFAIL = 70, 77, 75


def expand_node_template(template: str, nodename: str) -> str:
    """File-name templates of Celery's ``multi``: ``%n`` name without host, ``%h``/``%p``
    full node name, ``%d`` domain. ``%i``/``%I`` (pool process index) are left for the
    logging setup, which knows the index."""
    name, _, host = nodename.partition("@")
    domain = host.partition(".")[2]
    out, i = [], 0
    while i < len(template):
        ch = template[i]
        if ch == "%" and i + 1 < len(template):
            code = template[i + 1]
            repl = {"n": name, "h": nodename, "p": nodename, "d": domain, "%": "%"}.get(code)
            if repl is not None:
                out.append(repl)
                i += 2
                continue
        out.append(ch)
        i += 1
    return "".join(out)


class ReadyPipe:
    """The daemon's end of the start-up pipe. Say ``ready()`` or ``fail()`` once."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def _say(self, text: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, text.encode("utf-8", "replace")[:4000])
        except OSError:
            pass  # the foreground process is gone (killed): nothing to tell
        finally:
            os.close(self.fd)
            self.fd = None

    def ready(self) -> None:
        self._say("READY\n")

    def fail(self, code: int, reason: str) -> None:
        self._say(f"FAIL {int(code)} {' '.join(str(reason).split())}\n")


def parse_umask(value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 8)
    except ValueError:
        raise ValueError(f"--umask {value!r} is not an octal number such as 022") from None


def resolve_ids(uid: str | None, gid: str | None) -> tuple[int | None, int | None]:
    """User and group names or numbers -> ids; the user's primary group when no gid."""
    user_id = group_id = None
    if uid:
        try:
            entry = pwd.getpwuid(int(uid)) if uid.isdigit() else pwd.getpwnam(uid)
        except (KeyError, ValueError):
            if not uid.isdigit():
                raise ValueError(f"--uid: no such user {uid!r}") from None
            user_id = int(uid)
        else:
            user_id, group_id = entry.pw_uid, entry.pw_gid
    if gid:
        try:
            group_id = int(gid) if gid.isdigit() else grp.getgrnam(gid).gr_gid
        except KeyError:
            raise ValueError(f"--gid: no such group {gid!r}") from None
    return user_id, group_id


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid``/``gid`` for good (group first, while we still may change it)."""
    if gid is not None and gid != os.getgid():
        if uid is not None:
            try:
                os.initgroups(pwd.getpwuid(uid).pw_name, gid)
            except KeyError:
                os.setgroups([gid])
        os.setgid(gid)
    if uid is not None and uid != os.getuid():
        os.setuid(uid)


def prepare_process(workdir: str | None, umask: int | None, uid: int | None,
                    gid: int | None) -> None:
    """What a node does before it opens any file, detached or not."""
    if umask is not None:
        os.umask(umask)
    if workdir:
        os.chdir(workdir)
    drop_privileges(uid, gid)


def detach(nodename: str, logfile: str | None, timeout: float = START_TIMEOUT) -> ReadyPipe:
    """Fork into the background. Returns in the daemon; the foreground process never
    returns (it exits with the daemon's start-up verdict)."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    first = os.fork()
    if first > 0:
        os.close(write_fd)
        os.waitpid(first, 0)
        code, message = _await_verdict(read_fd, timeout, nodename, logfile)
        if message:
            sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(code)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)  # the daemon is re-parented to init (or the subreaper)
    _redirect_stdio()
    return ReadyPipe(write_fd)


def _redirect_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def _await_verdict(fd: int, timeout: float, nodename: str,
                   logfile: str | None) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return EX_TEMPFAIL, (f"Error: node {nodename} did not report ready within "
                                 f"{timeout:g}s; it may still be starting (see {logfile or 'its log'})")
        try:
            readable, _, _ = select.select([fd], [], [], left)
        except InterruptedError:
            continue
        if not readable:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError as exc:
            if exc.errno == errno.EINTR:
                continue
            chunk = b""
        if not chunk:
            break
        data += chunk
        if data.endswith(b"\n"):
            break
    text = data.decode("utf-8", "replace").strip()
    if text == "READY":
        return 0, ""
    if text.startswith("FAIL "):
        _, code, reason = (text.split(" ", 2) + [""])[:3]
        return int(code) if code.isdigit() else EX_SOFTWARE, f"Error: node {nodename}: {reason}"
    where = f" (see {logfile})" if logfile else ""
    return EX_SOFTWARE, f"Error: node {nodename} exited during start-up{where}"
