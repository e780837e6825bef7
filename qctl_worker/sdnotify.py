"""The sd_notify(3) protocol: tell the service manager that the node is ready, stopping or alive.

One ``KEY=VALUE`` line per field, sent as a single datagram to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET``. No dependency on libsystemd: any supervisor that implements the protocol
(systemd for ``Type=notify`` units, container runtimes, test harnesses) can listen.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
from typing import Mapping

logger = logging.getLogger("qctl.worker.sdnotify")

_KEY = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class Notifier:
    """A connectionless sender to one notification socket.

    ``send`` and its shortcuts never raise and may be called from any thread: a lost
    notification must not stop a worker that is otherwise healthy (the service manager times
    the start or the watchdog out and says so). The first failure is logged at debug level,
    later ones are silent.
    """

    def __init__(self, address: str, watchdog_usec: int | None = None,
                 watchdog_pid: int | None = None) -> None:
        """``address``: a filesystem path, or an abstract name starting with NUL."""
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._lock = threading.Lock()
        self._failed_once = False
        self._sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Notifier | None":
        """The notifier ``$NOTIFY_SOCKET`` asks for, or None when it is unset, empty or unusable.

        ``/path`` is a socket file, ``@name`` an abstract socket. The variables are left in
        place: a process that re-executes itself keeps notifying the same manager.
        """
        value = environ.get("NOTIFY_SOCKET", "")
        if value.startswith("@") and len(value) > 1:
            address = "\0" + value[1:]
        elif value.startswith("/"):
            address = value
        else:
            if value:
                logger.debug("NOTIFY_SOCKET=%r is neither a path nor @abstract: not notifying",
                             value)
            return None
        try:
            return cls(address, _positive_int(environ.get("WATCHDOG_USEC")),
                       _positive_int(environ.get("WATCHDOG_PID")))
        except OSError as exc:  # e.g. AF_UNIX forbidden by the sandbox
            logger.debug("Cannot open a notification socket: %s", exc)
            return None

    def send(self, **fields: str) -> bool:
        """Send ``fields`` as one datagram (``KEY=VALUE`` lines, in the order given).

        Returns True when the datagram left, False otherwise (no socket, closed, bad field).
        """
        try:
            payload = _encode(fields)
            with self._lock:
                if self._sock is None:
                    return False
                self._sock.sendto(payload, self.address)
            return True
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            if not self._failed_once:
                self._failed_once = True
                logger.debug("Cannot notify the service manager at %r: %s",
                             self.address.replace("\0", "@"), exc)
            return False

    def ready(self, status: str = "") -> None:
        """Start-up is complete: ``READY=1``, the optional ``STATUS`` and ``MAINPID``."""
        fields = {"READY": "1"}
        if status:
            fields["STATUS"] = status
        fields["MAINPID"] = str(os.getpid())
        self.send(**fields)

    def stopping(self, status: str = "") -> None:
        """Shutdown has begun: ``STOPPING=1`` and the optional ``STATUS``."""
        fields = {"STOPPING": "1"}
        if status:
            fields["STATUS"] = status
        self.send(**fields)

    def status(self, text: str) -> None:
        """A one-line state for ``systemctl status``."""
        self.send(STATUS=text)

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls, or None when no watchdog is armed for us.

        Half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises, so one late ping is not
        fatal. A ``WATCHDOG_PID`` naming another process (the variable leaked from a parent)
        means the watchdog is not ours.
        """
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def watchdog(self) -> None:
        """Still alive: ``WATCHDOG=1``."""
        self.send(WATCHDOG="1")

    def close(self) -> None:
        """Release the socket; later sends return False. Idempotent."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Notifier {self.address.replace(chr(0), '@')!r}>"


def _encode(fields: Mapping[str, str]) -> bytes:
    if not fields:
        raise ValueError("nothing to send")
    lines = []
    for key, value in fields.items():
        if not _KEY.match(key):
            raise ValueError(f"invalid notification key {key!r}")
        # A newline would start a new assignment: keep STATUS texts on one line.
        text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode("utf-8")


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value else 0
    except ValueError:
        return None
    return number if number > 0 else None
