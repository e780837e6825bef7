"""Dead letters on RabbitMQ: ``DeadLetters``, the part of ``AmqpTransport`` that stores copies in
durable queue ``qctl.dead`` and browses, requeues and purges them."""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable
from uuid import uuid4

from . import DeadLetter, Envelope
from .amqp_conn import Link, _split, basic_properties

DEAD_QUEUE = "qctl.dead"


class DeadLetters:
    """Mixed into ``AmqpTransport``: uses its ``_declared``, ``_with_pub`` and ``_publish_now``."""

    _declared: set[Any]
    _with_pub: Callable[[str, Callable[[Link], Any]], Any]
    _publish_now: Callable[[Link, str, Any, bytes], None]

    def _store_dead(self, envelope: Envelope, queue: str, reason: str, priority: int) -> None:
        props = basic_properties(envelope, priority, {
            **envelope.headers, "x-qctl-reason": str(reason), "x-qctl-queue": queue,
            "x-qctl-died-at": int(time.time() * 1000), "x-qctl-dead-id": uuid4().hex}, expiration=False)
        props.delivery_mode = 2

        def run(link: Link) -> None:
            if ("queue", DEAD_QUEUE) not in self._declared:
                link.channel().queue_declare(DEAD_QUEUE, durable=True)
                self._declared.add(("queue", DEAD_QUEUE))
            link.channel().basic_publish("", DEAD_QUEUE, envelope.body, props, mandatory=True)
        self._with_pub("store a dead letter on", run)

    @staticmethod
    def _browse(link: Link, limit: int | None) -> tuple[Any, list[tuple[Any, Any, bytes]]]:
        """Dead letters taken unacked on a new channel (closing it puts them back in order)."""
        ch = link.conn.channel()
        ch.queue_declare(DEAD_QUEUE, durable=True)
        got = []
        while limit is None or len(got) < limit:
            method, props, body = ch.basic_get(DEAD_QUEUE, auto_ack=False)
            if method is None:
                break
            got.append((method, props, body))
        return ch, got

    @staticmethod
    def _letter(props: Any, body: bytes) -> DeadLetter:
        envelope, internal = _split(props, body)
        return DeadLetter(id=str(internal.get("x-qctl-dead-id") or ""), queue=str(internal.get("x-qctl-queue") or ""),
                          reason=str(internal.get("x-qctl-reason") or ""),
                          died_at=int(internal.get("x-qctl-died-at") or 0) / 1000.0, envelope=envelope)

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters (browsed: they stay in ``qctl.dead``)."""
        def run(link: Link) -> list[DeadLetter]:
            ch, got = self._browse(link, max(int(limit), 0))
            ch.close()
            return [self._letter(props, body) for _m, props, body in got]
        return self._with_pub("read dead letters on", run)

    def requeue_dead(self, ids: Iterable[Any] | None) -> int:
        """Publish the chosen dead letters to their queue (priority kept, count reset)."""
        wanted = None if ids is None else {str(i) for i in ids}

        def run(link: Link) -> int:
            ch, got = self._browse(link, None)
            done = 0
            try:
                for method, props, body in got:
                    letter = self._letter(props, body)
                    if letter.envelope is None or (wanted is not None and letter.id not in wanted):
                        continue
                    self._publish_now(link, letter.queue, basic_properties(
                        letter.envelope, props.priority or 0, expiration=False), letter.envelope.body)
                    ch.basic_ack(method.delivery_tag)
                    done += 1
            finally:
                ch.close()
            return done
        return int(self._with_pub("requeue dead letters on", run))

    def purge_dead(self) -> int:
        def run(link: Link) -> int:
            link.channel().queue_declare(DEAD_QUEUE, durable=True)
            return link.channel().queue_purge(DEAD_QUEUE).method.message_count
        return int(self._with_pub("purge dead letters on", run))
