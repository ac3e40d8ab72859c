"""RabbitMQ: topology, publishing with confirms, consuming with explicit acks, failure routing.

Topology (names carry the prefix, ``mlc`` by default):

- topic exchanges ``<p>.changes``, ``<p>.notices``, ``<p>.commands``; routing keys are
  ``<system>.<entity>`` so that one target's writers can be scaled alone;
- a durable quorum work queue per consumer group (``<p>.mapper``, ``<p>.poller.notices``,
  ``<p>.writer.<target system>``), with a delivery limit whose overflow dead-letters;
- per work queue, delayed-retry quorum queues ``<q>.retry.<n>`` whose message TTL grows and which
  dead-letter back into the work queue, and a dead-letter queue ``<q>.dlq``.

Retry and dead-letter queues are reached through the default exchange, so a failed record goes
back to its own work queue only; the original exchange and routing key travel in headers and are
what ``dlq replay`` publishes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote, urlsplit

import aio_pika
import aiohttp
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aiormq.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic

from shared import metrics
from shared.failures import FailureClass
from shared.logs import redact
from shared.messages import Message, encode

log = logging.getLogger(__name__)

EXCHANGES = ("changes", "notices", "commands")
DEFAULT_WRITER_TARGETS = ("zoho_crm", "salesforce", "acumatica", "sage300")

H_ERROR_CLASS = "x-mlc-error-class"
H_ERROR = "x-mlc-error"
H_ATTEMPTS = "x-mlc-attempts"
H_FIRST_FAILED = "x-mlc-first-failed-at"
H_FAILED_AT = "x-mlc-failed-at"
H_ORIG_EXCHANGE = "x-mlc-original-exchange"
H_ORIG_ROUTING_KEY = "x-mlc-original-routing-key"
H_QUEUE = "x-mlc-queue"
H_SERVICE = "x-mlc-service"
H_REPLAYS = "x-mlc-replays"


class UnroutableError(RuntimeError):
    """The broker returned a mandatory message: no queue is bound for its routing key."""


class BrokerRefusedError(RuntimeError):
    """The broker nacked a publish (a full queue with reject-publish, an internal error)."""


class Routed(StrEnum):
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class WorkQueue:
    """A consumer group's queue: bound to an exchange by routing-key patterns."""

    name: str
    exchange: str
    binding_keys: tuple[str, ...] = ("#",)


def writer_queue(target_system: str) -> WorkQueue:
    return WorkQueue(f"writer.{target_system}", "commands", (f"{target_system}.#",))


MAPPER_QUEUE = WorkQueue("mapper", "changes")
NOTICES_QUEUE = WorkQueue("poller.notices", "notices")


@dataclass
class Topology:
    prefix: str = "mlc"
    retry_delays_s: list[int] = field(default_factory=lambda: [5, 30, 120, 600, 1800])
    writer_targets: tuple[str, ...] = DEFAULT_WRITER_TARGETS
    delivery_limit: int = 20

    @property
    def work_queues(self) -> list[WorkQueue]:
        return [MAPPER_QUEUE, NOTICES_QUEUE, *(writer_queue(t) for t in self.writer_targets)]

    def exchange(self, logical: str) -> str:
        return f"{self.prefix}.{logical}"

    def queue(self, wq: WorkQueue) -> str:
        return f"{self.prefix}.{wq.name}"

    def retry_queue(self, wq: WorkQueue, attempt: int) -> str:
        return f"{self.queue(wq)}.retry.{attempt}"

    def dlq(self, wq: WorkQueue) -> str:
        return f"{self.queue(wq)}.dlq"

    def all_queue_names(self) -> list[str]:
        names = []
        for wq in self.work_queues:
            names.append(self.queue(wq))
            names.extend(self.retry_queue(wq, i + 1) for i in range(len(self.retry_delays_s)))
            names.append(self.dlq(wq))
        return names

    def work_queue_by_name(self, queue_name: str) -> WorkQueue | None:
        for wq in self.work_queues:
            if queue_name in (self.queue(wq), self.dlq(wq)):
                return wq
        return None


def _quorum_args(**extra: Any) -> dict[str, Any]:
    return {"x-queue-type": "quorum", **extra}


@dataclass
class QueueDepth:
    name: str
    ready: int
    unacked: int | None
    consumers: int | None


Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


class Bus:
    def __init__(self, url: str, topology: Topology, *, management_url: str | None = None):
        self.url = url
        self.topology = topology
        self.management_url = management_url
        self.connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._consumer_channels: list[AbstractChannel] = []

    async def connect(self) -> Bus:
        self.connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": f"ml-connector {self.topology.prefix}"}
        )
        self._publish_channel = await self.connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        return self

    async def close(self) -> None:
        for channel in self._consumer_channels:
            with contextlib.suppress(Exception):
                await channel.close()
        self._consumer_channels.clear()
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    async def __aenter__(self) -> Bus:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def channel(self) -> AbstractChannel:
        if self._publish_channel is None:
            raise RuntimeError("bus is not connected")
        return self._publish_channel

    # -- topology -----------------------------------------------------------------------------

    async def declare(self) -> None:
        """Declare every exchange and queue; declaring twice changes nothing."""
        topo = self.topology
        channel = self.channel
        for logical in EXCHANGES:
            self._exchanges[logical] = await channel.declare_exchange(
                topo.exchange(logical), aio_pika.ExchangeType.TOPIC, durable=True
            )
        for wq in topo.work_queues:
            work_name, dlq_name = topo.queue(wq), topo.dlq(wq)
            await channel.declare_queue(dlq_name, durable=True, arguments=_quorum_args())
            queue = await channel.declare_queue(
                work_name,
                durable=True,
                arguments=_quorum_args(
                    **{
                        "x-delivery-limit": topo.delivery_limit,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": dlq_name,
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                    }
                ),
            )
            for key in wq.binding_keys:
                await queue.bind(topo.exchange(wq.exchange), routing_key=key)
            for attempt, delay in enumerate(topo.retry_delays_s, start=1):
                await channel.declare_queue(
                    topo.retry_queue(wq, attempt),
                    durable=True,
                    arguments=_quorum_args(
                        **{
                            "x-message-ttl": int(delay * 1000),
                            "x-dead-letter-exchange": "",
                            "x-dead-letter-routing-key": work_name,
                            "x-dead-letter-strategy": "at-least-once",
                            "x-overflow": "reject-publish",
                        }
                    ),
                )

    async def delete_topology(self) -> None:
        """Remove every queue and exchange of this prefix (tests and ``bus reset``)."""
        channel = await self.connection.channel()  # type: ignore[union-attr]
        try:
            for name in self.topology.all_queue_names():
                await channel.queue_delete(name)
            for logical in EXCHANGES:
                await channel.exchange_delete(self.topology.exchange(logical))
        finally:
            await channel.close()

    async def _exchange(self, logical: str) -> aio_pika.abc.AbstractExchange:
        exchange = self._exchanges.get(logical)
        if exchange is None:
            exchange = await self.channel.get_exchange(self.topology.exchange(logical))
            self._exchanges[logical] = exchange
        return exchange

    # -- publishing ---------------------------------------------------------------------------

    @staticmethod
    def build_message(
        body: bytes,
        *,
        kind: str | None,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> aio_pika.Message:
        return aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            type=kind,
            message_id=message_id,
            timestamp=datetime.now(UTC),
            headers=headers or {},
        )

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        message: Message,
        *,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish persistent and mandatory; returns once the broker confirmed it."""
        amqp = self.build_message(
            encode(message),
            kind=message.kind,
            message_id=getattr(message, "batch_id", None),
            headers=headers,
        )
        await self._send(await self._exchange(exchange), amqp, routing_key)

    async def publish_many(self, items: Iterable[tuple[str, str, Message]]) -> None:
        """Publish several messages with their confirms in flight together."""
        await asyncio.gather(*(self.publish(ex, key, msg) for ex, key, msg in items))

    async def publish_raw(
        self, exchange_name: str, routing_key: str, amqp: aio_pika.Message
    ) -> None:
        """Publish to a physical exchange name ('' is the default exchange)."""
        if exchange_name == "":
            exchange = self.channel.default_exchange
        else:
            exchange = await self.channel.get_exchange(exchange_name, ensure=False)
        await self._send(exchange, amqp, routing_key)

    async def _send(
        self, exchange: aio_pika.abc.AbstractExchange, amqp: aio_pika.Message, routing_key: str
    ) -> None:
        try:
            confirmation = await exchange.publish(amqp, routing_key=routing_key, mandatory=True)
        except PublishError as exc:
            raise UnroutableError(
                f"no queue is bound to {exchange.name or '(default)'!s} for {routing_key!r}"
            ) from exc
        except DeliveryError as exc:
            raise BrokerRefusedError(f"broker refused the message for {routing_key!r}") from exc
        if isinstance(confirmation, aio_pika.abc.AbstractIncomingMessage):
            raise UnroutableError(f"{routing_key!r} was returned by the broker")
        if confirmation is not None and not isinstance(confirmation, Basic.Ack):
            raise BrokerRefusedError(f"broker refused the message for {routing_key!r}")

    # -- consuming ----------------------------------------------------------------------------

    async def consume(
        self, wq: WorkQueue, handler: Handler, *, prefetch: int = 200
    ) -> AbstractQueue:
        """Deliver messages of a work queue to ``handler`` with manual acks.

        The handler acks (or routes the failure and acks) itself. If it raises, the message
        is returned to the queue (nack with requeue) and the error is logged: the delivery limit
        of the quorum queue dead-letters a message that keeps crashing its consumer.
        """
        assert self.connection is not None
        channel = await self.connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=prefetch)
        self._consumer_channels.append(channel)
        queue = await channel.get_queue(self.topology.queue(wq), ensure=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                await handler(message)
            except Exception:
                log.exception("handler failed on %s; message returned to the queue", wq.name)
                metrics.MESSAGES.labels(wq.name, "requeued").inc()
                with contextlib.suppress(Exception):
                    await message.nack(requeue=True)

        await queue.consume(on_message, no_ack=False)
        return queue

    # -- failures -----------------------------------------------------------------------------

    async def route_failure(
        self,
        message: AbstractIncomingMessage,
        wq: WorkQueue,
        failure: FailureClass,
        error: str,
        *,
        body: bytes | None = None,
        service: str = "",
    ) -> Routed:
        """Send a failed message (or one record split out of it, ``body``) to the next retry
        queue or to the dead-letter queue, with the failure headers stamped. Does not ack."""
        headers = dict(message.headers or {})
        attempts = int(headers.get(H_ATTEMPTS, 0) or 0) + 1
        now = datetime.now(UTC).isoformat()
        headers.update(
            {
                H_ERROR_CLASS: str(failure),
                H_ERROR: error[:1000],
                H_ATTEMPTS: attempts,
                H_FAILED_AT: now,
                H_QUEUE: self.topology.queue(wq),
                H_SERVICE: service,
            }
        )
        headers.setdefault(H_FIRST_FAILED, now)
        headers.setdefault(H_ORIG_EXCHANGE, message.exchange or "")
        headers.setdefault(H_ORIG_ROUTING_KEY, message.routing_key or "")
        retryable = failure in (FailureClass.TRANSIENT, FailureClass.THROTTLED, FailureClass.AUTH)
        if retryable and attempts <= len(self.topology.retry_delays_s):
            target, routed = self.topology.retry_queue(wq, attempts), Routed.RETRY
        else:
            target, routed = self.topology.dlq(wq), Routed.DEAD
        amqp = self.build_message(
            message.body if body is None else body,
            kind=message.type,
            message_id=message.message_id,
            headers=headers,
        )
        await self.publish_raw("", target, amqp)
        metrics.MESSAGES.labels(wq.name, str(routed)).inc()
        log.log(
            logging.ERROR if routed is Routed.DEAD else logging.WARNING,
            "%s after attempt %d: %s",
            "dead-lettered" if routed is Routed.DEAD else "retry scheduled",
            attempts,
            error[:300],
            extra={
                "queue": wq.name,
                "message_id": message.message_id,
                "error_class": str(failure),
                "service": service or None,
            },
        )
        return routed

    async def dead_letter(
        self,
        wq: WorkQueue,
        routing_key: str,
        message: Message,
        failure: FailureClass,
        error: str,
        *,
        service: str = "",
    ) -> None:
        """Put a message that never reached ``wq`` (records the poller read but could not
        publish) straight into ``wq``'s dead-letter queue, with the headers ``route_failure``
        stamps: ``dlq replay`` publishes it to ``wq``'s exchange with ``routing_key``. The error
        text is redacted."""
        now = datetime.now(UTC).isoformat()
        headers: dict[str, Any] = {
            H_ERROR_CLASS: str(failure),
            H_ERROR: redact(error)[:1000],
            H_ATTEMPTS: 1,
            H_FIRST_FAILED: now,
            H_FAILED_AT: now,
            H_ORIG_EXCHANGE: self.topology.exchange(wq.exchange),
            H_ORIG_ROUTING_KEY: routing_key,
            H_QUEUE: self.topology.queue(wq),
            H_SERVICE: service,
        }
        amqp = self.build_message(
            encode(message),
            kind=message.kind,
            message_id=getattr(message, "batch_id", None),
            headers=headers,
        )
        await self.publish_raw("", self.topology.dlq(wq), amqp)
        metrics.MESSAGES.labels(wq.name, str(Routed.DEAD)).inc()
        log.error(
            "dead-lettered: %s",
            redact(error)[:300],
            extra={
                "queue": wq.name,
                "message_id": amqp.message_id,
                "error_class": str(failure),
                "service": service or None,
            },
        )

    # -- monitoring ---------------------------------------------------------------------------

    async def queue_depths(self) -> list[QueueDepth]:
        """Ready and unacked counts of every queue of the topology.

        Ready counts come over AMQP (a passive declare). Unacked counts need the management
        plugin's HTTP API; without it they are ``None``."""
        from_api = await self._depths_from_management()
        depths = []
        channel = await self.connection.channel()  # type: ignore[union-attr]
        try:
            for name in self.topology.all_queue_names():
                if name in from_api:
                    depths.append(from_api[name])
                    continue
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    channel = await self.connection.channel()  # type: ignore[union-attr]
                    continue
                result = queue.declaration_result
                depths.append(
                    QueueDepth(name, result.message_count or 0, None, result.consumer_count)
                )
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        for depth in depths:
            metrics.QUEUE_READY.labels(depth.name).set(depth.ready)
            if depth.unacked is not None:
                metrics.QUEUE_UNACKED.labels(depth.name).set(depth.unacked)
        return depths

    async def _depths_from_management(self) -> dict[str, QueueDepth]:
        if not self.management_url:
            return {}
        parts = urlsplit(self.url)
        vhost = quote(parts.path.lstrip("/") or "/", safe="")
        auth = aiohttp.BasicAuth(parts.username or "guest", parts.password or "guest")
        url = f"{self.management_url.rstrip('/')}/api/queues/{vhost}"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
                session.get(
                    url,
                    auth=auth,
                    params={"columns": "name,messages_ready,messages_unacknowledged,consumers"},
                ) as response,
            ):
                if response.status != 200:
                    return {}
                rows = await response.json()
        except (aiohttp.ClientError, TimeoutError):
            return {}
        wanted = set(self.topology.all_queue_names())
        return {
            row["name"]: QueueDepth(
                row["name"],
                int(row.get("messages_ready") or 0),
                int(row.get("messages_unacknowledged") or 0),
                int(row.get("consumers") or 0),
            )
            for row in rows
            if row.get("name") in wanted
        }
