"""Throw-away ``redis-server`` processes for tests: loopback only, a free port, no persistence.

- ``start_redis(tmpdir, port=None, password=None) -> (url, process)`` starts one and waits
  until it answers PING; ``stop_redis(process)`` stops it (by its own PID only).
- ``redis_server`` (session fixture) and ``redis_url`` (function fixture) can be imported
  into a test module or ``tests/conftest.py`` (``from tests.servers_redis import redis_server,
  redis_url``): one server per session, and every test gets a URL on a database that was just
  FLUSHDB-ed (db 1..15 in turn, so db numbers vary).

Without ``redis-server`` on PATH the tests are skipped, except in CI (``CI=true``) where
that is a failure.
"""
from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The path of ``redis-server``; skips the test (fails it in CI) when there is none."""
    path = shutil.which("redis-server") or ("/usr/bin/redis-server"
                                            if os.access("/usr/bin/redis-server", os.X_OK) else None)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server not installed (required in CI)", pytrace=False)
        pytest.skip("redis-server not installed")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int, password: str | None) -> bool:
    """True when the server on ``port`` replies +PONG (or -NOAUTH... means it is up too)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            if password:
                sock.sendall(f"AUTH {password}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(tmpdir: str | os.PathLike, port: int | None = None,
                password: str | None = None, durable: bool = False) -> tuple[str, subprocess.Popen]:
    """Start ``redis-server`` with its files in ``tmpdir``; returns (``redis://`` URL for db 0,
    process) once it answers PING. Retries on another port if a random one was taken.
    ``durable``: an append-only file synced at every write, so a restart keeps every message."""
    binary = redis_server_binary()
    folder = Path(tmpdir)
    folder.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port is not None else 3
    last_log = ""
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        log_path = folder / f"redis-{chosen}.log"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else \
            ["--appendonly", "no"]
        args = [binary, "--port", str(chosen), "--bind", "127.0.0.1", "--save", "",
                *persistence, "--dir", str(folder), "--daemonize", "no",
                "--protected-mode", "yes", "--logfile", str(log_path)]
        if password:
            args += ["--requirepass", password]
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(chosen, password):
                auth = f":{password}@" if password else ""
                return f"redis://{auth}127.0.0.1:{chosen}/0", process
            time.sleep(0.02)
        stop_redis(process)
        last_log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"redis-server did not start (port {chosen}):\n{last_log}")


def stop_redis(process: subprocess.Popen) -> None:
    """SIGTERM the server we started (SIGKILL after a deadline) and reap it. Idempotent."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


def with_db(url: str, db: int) -> str:
    """``url`` pointing at database ``db`` instead."""
    return url.rsplit("/", 1)[0] + f"/{db}"


def flushdb(url: str) -> None:
    import redis
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


_DBS = itertools.cycle(range(1, 16))
#: The session's server, shared by every module that imports the fixtures (each import makes
#: its own fixture definition; they must not start a server each).
_SHARED: dict[str, Any] = {}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """One ``redis-server`` for the session; yields its db-0 URL."""
    if "process" not in _SHARED or _SHARED["process"].poll() is not None:
        _SHARED["url"], _SHARED["process"] = start_redis(tmp_path_factory.mktemp("redis"))
    yield _SHARED["url"]
    stop_redis(_SHARED["process"])


@pytest.fixture
def redis_url(redis_server) -> str:
    """A URL on a freshly emptied database of the session's server."""
    url = with_db(redis_server, next(_DBS))
    flushdb(url)
    return url
