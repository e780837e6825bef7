"""ETA delivery inside RabbitMQ: the delay exchanges and queues (one level per bit of the delay
in ms), the routing-key encoding, and ``DelayQueues``, the part of ``AmqpTransport`` that
declares them, publishes into them and counts them. ``qctl.transports.amqp``'s docstring
describes the scheme."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import pika.exceptions as pex

from .amqp_conn import Link

LEVELS = 32
DELAY_EXCHANGE = "qctl.delayed.{}"
DELAY_QUEUE = "qctl.delayed.{}.{}"
DELIVERY_EXCHANGE = "qctl.delayed.delivery"
MAX_DELAY_MS = (1 << LEVELS) - 1


def _next_hop(k: int) -> str:
    return DELAY_EXCHANGE.format(k - 1) if k else DELIVERY_EXCHANGE


def _delayable(queue: str) -> bool:
    words = queue.split(".")
    return bool(queue) and len(queue.encode()) <= 190 and "*" not in words and "#" not in words


class DelayQueues:
    """Mixed into ``AmqpTransport``: uses its ``_declared``, ``_ensure_queue`` and ``_with_pub``."""

    _declared: set[Any]
    _ensure_queue: Callable[[Link, str], None]
    _with_pub: Callable[[str, Callable[[Link], Any]], Any]

    def _publish_delayed(self, link: Link, queue: str, props: Any, body: bytes, eta: float) -> None:
        for attempt in (0, 1):
            delay_ms = 0
            while True:   # the delay is taken after declaring (the first time takes ~0.2 s)
                delay_ms = max(0, min(math.ceil((eta - time.time()) * 1000), MAX_DELAY_MS))
                if self._ensure_delay(link, queue, delay_ms):
                    break
            key = ".".join(str(delay_ms >> k & 1) for k in reversed(range(LEVELS))) + "." + queue
            try:
                link.channel().basic_publish(DELAY_EXCHANGE.format(LEVELS - 1), key, body, props, mandatory=True)
                return
            except pex.UnroutableError:  # a delay queue was deleted behind our back
                if attempt:
                    raise
                self._declared.clear()

    def _ensure_delay(self, link: Link, queue: str, delay_ms: int) -> bool:
        """Declare what a delay of ``delay_ms`` needs; True when all was there already."""
        done = self._declared
        missing = [k for k in range(LEVELS) if delay_ms >> k & 1 and ("delay", queue, k) not in done]
        if "delay-chain" in done and ("delay", queue) in done and not missing:
            return True
        if "delay-chain" not in done:
            ch = link.channel()
            ch.exchange_declare(DELIVERY_EXCHANGE, "topic", durable=True)
            for k in range(LEVELS):
                ch.exchange_declare(DELAY_EXCHANGE.format(k), "topic", durable=True)
            for k in range(LEVELS):              # bit k is 0: straight on to the next level
                ch.exchange_bind(_next_hop(k), DELAY_EXCHANGE.format(k), routing_key="*." * (LEVELS - 1 - k) + "0.#")
            done.add("delay-chain")
        if ("delay", queue) not in done:
            self._ensure_queue(link, queue)
            link.channel().queue_bind(queue, DELIVERY_EXCHANGE, routing_key="*." * LEVELS + queue)
            done.add(("delay", queue))
        for k in missing:                        # bit k is 1: wait 2**k ms in this queue
            name = DELAY_QUEUE.format(queue, k)
            link.channel().queue_declare(name, durable=True, arguments={
                "x-message-ttl": 1 << k, "x-dead-letter-exchange": _next_hop(k)})
            link.channel().queue_bind(name, DELAY_EXCHANGE.format(k),
                                      routing_key="*." * (LEVELS - 1 - k) + "1." + "*." * k + queue)
            done.add(("delay", queue, k))
        return False

    def _with_delayed(self, queue: str, fn: Callable[[Link, str], int]) -> int:
        """Sum of ``fn(link, name)`` over ``queue`` and its delay queues that exist."""
        def run(link: Link) -> int:
            names = [queue, *(DELAY_QUEUE.format(queue, k) for k in range(LEVELS))]
            return sum(fn(link, name) for name in names if link.ready_count(name) is not None)
        return int(self._with_pub(f"reach {queue!r} on", run))
