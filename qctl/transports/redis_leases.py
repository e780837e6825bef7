"""Scheduler leases and fenced state for the Redis broker (``qctl.transports.redis``).

Keys (never one of kombu's: those have no ``qctl.`` prefix)::

    qctl.lease.<name>    string: the holder's owner name, with a PX expiry of its ttl
    qctl.state.<name>    string: the state as JSON text (no expiry)

Expiry runs on the server's clock, so holders on different hosts need no common time. Each
check-and-write is one Lua script: take-or-renew, release-if-ours, store-if-ours.
``save_state`` returns once Redis acknowledged the write; whether it also survives a restart
of Redis is the server's persistence setting (``appendonly yes`` with ``appendfsync always``
or ``everysec``), as for every message.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from . import check_lease_ttl, state_from_text, state_text

# KEYS[1]: the lease. ARGV: owner, ttl ms. 1 when the owner holds it afterwards.
_ACQUIRE = r"""local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1"""
# KEYS[1]: the lease. ARGV: owner.
_RELEASE = r"""if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end"""
# KEYS: the lease, the state. ARGV: owner, JSON text. 1 when stored.
_SAVE_STATE = r"""if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1"""

#: Merged into the transport's script table (``RedisTransport._run`` names).
LEASE_SCRIPTS = {"lease_acquire": _ACQUIRE, "lease_release": _RELEASE, "state_save": _SAVE_STATE}


def lease_key(name: str) -> str:
    return f"qctl.lease.{name}"


def state_key(name: str) -> str:
    return f"qctl.state.{name}"


class RedisLeases:
    """Mixed into ``RedisTransport``; uses its script runner and client (fork-safe there)."""

    _run: Callable[..., Any]
    _redis: Callable[[], Any]
    _errors: Any

    def _get(self, key: str) -> Any:
        client = self._redis()
        with self._errors:
            return client.get(key)

    def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        """``SET qctl.lease.<name> owner PX ttl`` unless another owner's key is there."""
        ttl_ms = max(1, math.ceil(check_lease_ttl(ttl) * 1000))
        return bool(self._run("lease_acquire", [owner, ttl_ms], keys=[lease_key(name)]))

    def release_lease(self, name: str, owner: str) -> None:
        """``DEL qctl.lease.<name>`` if it holds ``owner``."""
        self._run("lease_release", [owner], keys=[lease_key(name)])

    def lease_holder(self, name: str) -> str | None:
        """``GET qctl.lease.<name>`` (an expired key is gone)."""
        value = self._get(lease_key(name))
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def load_state(self, name: str) -> dict | None:
        """``GET qctl.state.<name>``, parsed."""
        return state_from_text(self._get(state_key(name)))

    def save_state(self, name: str, owner: str, state: dict) -> bool:
        """``SET qctl.state.<name>`` in the same script that checks the lease."""
        keys: Sequence[str] = [lease_key(name), state_key(name)]
        return bool(self._run("state_save", [owner, state_text(state)], keys=keys))
