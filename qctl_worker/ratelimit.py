"""Token buckets for task rate limits (``rate_limit='10/m'``): a task over its rate waits."""
from __future__ import annotations

import time

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_rate(rate: str | int | float | None) -> float:
    """``'10/m'`` -> 0.1666 tasks per second; ``0``/``None``/``''`` -> 0.0 (no limit).

    Raises ValueError with a readable message for anything else.
    """
    if rate is None or rate == "":
        return 0.0
    if isinstance(rate, (int, float)):
        if rate < 0:
            raise ValueError(f"Invalid rate limit string: {rate!r}")
        return float(rate)
    text = str(rate).strip()
    number, _, unit = text.partition("/")
    try:
        ops = float(number)
    except ValueError:
        raise ValueError(f"Invalid rate limit string: {rate!r}") from None
    unit = (unit or "s").strip().lower()
    if ops < 0 or not unit or unit[0] not in _UNITS:
        raise ValueError(f"Invalid rate limit string: {rate!r}")
    return ops / _UNITS[unit[0]]


class TokenBucket:
    """``fill_rate`` tokens per second, holding at most ``capacity``."""

    def __init__(self, fill_rate: float, capacity: float = 1.0) -> None:
        self.fill_rate = float(fill_rate)
        self.capacity = float(capacity)
        self._tokens = self.capacity
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.fill_rate)
        self._stamp = now

    def can_consume(self, tokens: float = 1.0) -> bool:
        """Take ``tokens`` if there are enough; False (and nothing taken) otherwise."""
        self._refill()
        if self._tokens >= tokens:
            self._tokens -= tokens
            return True
        return False

    def expected_time(self, tokens: float = 1.0) -> float:
        """Seconds until ``tokens`` will be there."""
        self._refill()
        missing = tokens - self._tokens
        return max(missing / self.fill_rate, 0.0) if self.fill_rate else 0.0
