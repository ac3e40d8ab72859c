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

Every failure of a handler goes through ``shared.failures.classify`` (see ``Bus.consume``): an
outage of the database or broker holds the message and runs the handler again once they answer;
any other exception routes the message to retry or the dead-letter queue with its class, the
error and the original exchange and routing key. No message is ever requeued by a nack, so the
broker's delivery limit is only a last resort (a consumer process that dies on a message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
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
from shared.failures import (
    FailureClass,
    classify,
    describe,
    exception_name,
    is_infrastructure,
)
from shared.logs import redact
from shared.messages import Message, encode

log = logging.getLogger(__name__)

EXCHANGES = ("changes", "notices", "commands")


def default_writer_targets() -> tuple[str, ...]:
    """The systems a connection can write to (``shared.connectors.registry``)."""
    from shared.connectors.registry import writer_targets

    return writer_targets()


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
H_EXCEPTION = "x-mlc-exception"  # the Python class of an unexpected exception
H_FAILED_RECORDS = "x-mlc-failed-records"  # records in a letter that groups several failures
H_RECORD_ERRORS = "x-mlc-record-errors"  # their errors, one string each (the first ones)
H_DELIVERY_COUNT = "x-delivery-count"  # set by quorum queues on a redelivery

# A dead letter that groups records lists at most this many of their errors in its headers (the
# audit trail has every one): headers must fit in one AMQP frame.
MAX_RECORD_ERRORS = 50


class TopologyError(RuntimeError):
    """A queue exists with other arguments than this build declares, and cannot be migrated
    automatically. The message is one line naming the queue and what to do."""


class UnroutableError(RuntimeError):
    """The broker returned a mandatory message: no queue is bound for its routing key (a
    writer target that is not configured: MLC_WRITER_TARGETS)."""

    failure_class = FailureClass.PERMANENT


class BrokerRefusedError(RuntimeError):
    """The broker nacked a publish (a full queue with reject-publish, an internal error)."""

    failure_class = FailureClass.TRANSIENT


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
    writer_targets: tuple[str, ...] = field(default_factory=default_writer_targets)
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


Probe = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class RecordFailure:
    """One record of a batch that failed: its position in the batch, a reference that names it
    to a reader (``syspro:ArCustomer:C1``), its class and error, and the class of an
    unexpected exception when there was one."""

    index: int
    ref: str
    failure: FailureClass
    error: str
    exception: str | None = None


class Bus:
    def __init__(
        self,
        url: str,
        topology: Topology,
        *,
        management_url: str | None = None,
        hold_backoff_s: tuple[float, float] = (0.5, 30.0),
        hold_strikes: int = 5,
    ):
        self.url = url
        self.topology = topology
        self.management_url = management_url
        self.connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._consumer_channels: list[AbstractChannel] = []
        # While the database or broker is away, a message is held and its handler run again
        # after a delay that doubles from the first value up to the second.
        self.hold_backoff_s = hold_backoff_s
        # ``infrastructure_probe`` (set by the service: ``SELECT 1``) tells a real outage from a
        # handler that raises a database error for another reason: once the probe answers,
        # the held handler gets ``hold_strikes`` more runs, then the message is routed as
        # transient like any other failure.
        self.infrastructure_probe: Probe | None = None
        self.hold_strikes = hold_strikes
        self.actor = ""  # the service replica, stamped on the dead letters it routes

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

    async def plain_channel(self) -> AbstractChannel:
        """A channel that is not restored when the broker closes it: for operations that may
        be refused (a declaration that does not match, an exchange that may not exist). A
        robust channel would be reopened and replayed after such a refusal."""
        assert self.connection is not None, "bus is not connected"
        channel = aio_pika.Channel(self.connection, publisher_confirms=False)
        await channel
        return channel

    # -- topology -----------------------------------------------------------------------------

    async def declare(self) -> None:
        """Declare every exchange and queue; declaring twice changes nothing.

        A retry queue declared earlier with another delay (``MLC_RETRY_DELAYS_S`` changed) is
        migrated when it is empty: deleted and declared again. One that holds messages, or any
        other queue whose arguments differ, stops the start with a ``TopologyError`` naming it.
        Declares on a channel of its own: the broker closes a channel on such a mismatch."""
        topo = self.topology
        channel = await self.plain_channel()
        try:
            for logical in EXCHANGES:
                await channel.declare_exchange(
                    topo.exchange(logical), aio_pika.ExchangeType.TOPIC, durable=True
                )
            for wq in topo.work_queues:
                work_name, dlq_name = topo.queue(wq), topo.dlq(wq)
                channel, _ = await self._declare_queue(channel, dlq_name, _quorum_args())
                channel, queue = await self._declare_queue(
                    channel,
                    work_name,
                    _quorum_args(
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
                    channel, _ = await self._declare_queue(
                        channel,
                        topo.retry_queue(wq, attempt),
                        _quorum_args(
                            **{
                                "x-message-ttl": int(delay * 1000),
                                "x-dead-letter-exchange": "",
                                "x-dead-letter-routing-key": work_name,
                                "x-dead-letter-strategy": "at-least-once",
                                "x-overflow": "reject-publish",
                            }
                        ),
                        retry_of=work_name,
                    )
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        self._exchanges.clear()  # looked up again on the publishing channel

    async def _declare_queue(
        self,
        channel: AbstractChannel,
        name: str,
        arguments: dict[str, Any],
        *,
        retry_of: str | None = None,
    ) -> tuple[AbstractChannel, AbstractQueue]:
        """Declare one queue; returns the channel to go on with (a new one after a mismatch)
        and the queue. ``retry_of``: the work queue of a retry queue, which may be migrated."""
        try:
            return channel, await channel.declare_queue(name, durable=True, arguments=arguments)
        except aio_pika.exceptions.ChannelPreconditionFailed:
            pass
        channel = await self.plain_channel()  # the broker closed the other one
        if retry_of is None:
            raise TopologyError(
                f"queue {name} exists with other arguments than this version declares"
                f" (x-delivery-limit {self.topology.delivery_limit}, quorum type); move its"
                f" messages elsewhere and delete it, then start again"
            )
        ttl = arguments["x-message-ttl"] / 1000
        held = (await channel.declare_queue(name, passive=True)).declaration_result.message_count
        if held:
            raise TopologyError(
                f"retry queue {name} holds {held} message(s) and was declared with another"
                f" delay than MLC_RETRY_DELAYS_S gives now ({ttl:g} s): start with the previous"
                f" MLC_RETRY_DELAYS_S until it is empty (its messages go back to {retry_of} as"
                f" their delay ends), then change it"
            )
        # Quorum queues cannot be deleted "if empty": it was empty a moment ago. Only a
        # replica still running with the old delays routes into it; should a message have
        # arrived in between, the broker's answer counts it and we say so.
        deleted = await channel.queue_delete(name)
        lost = getattr(deleted, "message_count", 0) or 0
        if lost:
            log.error(
                "retry queue %s received %d message(s) while it was migrated; they are lost:"
                " `ml-connector flows resync` reads their records again",
                name,
                lost,
            )
        log.warning(
            "retry queue %s declared again with a delay of %g s (MLC_RETRY_DELAYS_S)", name, ttl
        )
        return channel, await channel.declare_queue(name, durable=True, arguments=arguments)

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

        The handler acks (or routes the failure and acks) itself. If it raises, the failure
        goes through the one classification (``_handle``); the message is never nacked back
        to the queue, so a failing handler cannot spin on it."""
        assert self.connection is not None
        channel = await self.connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=prefetch)
        self._consumer_channels.append(channel)
        queue = await channel.get_queue(self.topology.queue(wq), ensure=True)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._handle(wq, handler, message)

        await queue.consume(on_message, no_ack=False)
        return queue

    async def _handle(
        self, wq: WorkQueue, handler: Handler, message: AbstractIncomingMessage
    ) -> None:
        """Run ``handler``; what it raises decides what happens to the message:

        - the database or broker is unavailable (``is_infrastructure``): the message is held
          (not acked, not requeued: its delivery count does not grow) and the handler runs
          again after a back-off that doubles up to a cap, until they answer. A stop of the
          service cancels the wait, and the broker delivers the message again later;
        - anything else: the message goes to the next retry queue or the dead-letter queue
          with its failure class, the exception's class and message, and the original
          exchange and routing key (``route_failure``), and is acked."""
        delay, cap = self.hold_backoff_s
        strikes = 0
        while True:
            try:
                await handler(message)
                return
            except Exception as exc:
                if message.processed:  # acked or routed already: nothing left to decide
                    log.error(
                        "handler of %s failed after settling message %s: %s",
                        wq.name,
                        message.message_id,
                        describe(exc),
                    )
                    return
                if not is_infrastructure(exc) or strikes >= self.hold_strikes:
                    await self._route_unhandled(wq, message, exc)
                    return
                if not _channel_open(message):
                    log.warning(
                        "%s: the broker connection went away during message %s (%s); the"
                        " broker delivers it again",
                        wq.name,
                        message.message_id,
                        describe(exc),
                    )
                    return
                log.warning(
                    "%s: the database or broker is unavailable (%s); holding message %s and"
                    " trying again in %.1f s",
                    wq.name,
                    describe(exc),
                    message.message_id,
                    delay,
                    extra={"queue": wq.name, "message_id": message.message_id},
                )
                metrics.MESSAGES.labels(wq.name, "held").inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
                if await self._infrastructure_answers():
                    strikes += 1

    async def _infrastructure_answers(self) -> bool:
        """Whether the database and broker answer now (False when there is no probe)."""
        if self.infrastructure_probe is None:
            return False
        connection = self.connection
        if connection is None or connection.is_closed:
            return False
        try:
            await asyncio.wait_for(self.infrastructure_probe(), 5)
        except Exception:
            return False
        return True

    async def _route_unhandled(
        self, wq: WorkQueue, message: AbstractIncomingMessage, exc: Exception
    ) -> None:
        failure, error = classify(exc), describe(exc)
        log.error(
            "%s: message %s failed (%s): %s",
            wq.name,
            message.message_id,
            failure,
            error,
            extra={"queue": wq.name, "message_id": message.message_id},
        )
        log.debug("the failure of message %s", message.message_id, exc_info=exc)
        delay, cap = self.hold_backoff_s
        while True:
            try:
                await self.route_failure(
                    message, wq, failure, error, service=self.actor, exception=exc
                )
                break
            except Exception as route_exc:
                if not _channel_open(message):
                    return  # the broker delivers the message again
                log.warning(
                    "%s: cannot route failed message %s yet (%s); trying again in %.1f s",
                    wq.name,
                    message.message_id,
                    describe(route_exc),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
        with contextlib.suppress(Exception):
            await message.ack()

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
        exception: BaseException | str | None = None,
        extra_headers: dict[str, Any] | None = None,
    ) -> Routed:
        """Send a failed message (or records split out of it, ``body``) to the next retry
        queue or to the dead-letter queue, with the failure headers stamped: the class, the
        error, the attempts, when, and the original exchange and routing key. ``exception``:
        the unexpected exception (or its class name) behind the failure. Does not ack."""
        headers = dict(message.headers or {})
        for stale in (H_EXCEPTION, H_FAILED_RECORDS, H_RECORD_ERRORS, H_DELIVERY_COUNT):
            headers.pop(stale, None)
        attempts = int(headers.get(H_ATTEMPTS, 0) or 0) + 1
        now = datetime.now(UTC).isoformat()
        headers.update(
            {
                H_ERROR_CLASS: str(failure),
                H_ERROR: error[:1000],
                H_ATTEMPTS: attempts,
                H_FAILED_AT: now,
                H_QUEUE: self.topology.queue(wq),
                H_SERVICE: service or self.actor,
            }
        )
        if isinstance(exception, BaseException):
            exception = exception_name(exception)
        if exception:
            headers[H_EXCEPTION] = exception
        headers.update(extra_headers or {})
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
                "service": service or self.actor or None,
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

    async def route_records(
        self,
        message: AbstractIncomingMessage,
        wq: WorkQueue,
        failures: Sequence[RecordFailure],
        body_for: Callable[[list[int]], bytes],
        *,
        service: str = "",
    ) -> list[Routed]:
        """Route the failed records of one batch message: one message per failure class,
        carrying those records (``body_for`` builds the body from their positions), never one
        message per record. Its error header summarises them; ``x-mlc-record-errors`` lists
        each record's error (the first ``MAX_RECORD_ERRORS``; the audit trail has all)."""
        groups: dict[FailureClass, list[RecordFailure]] = {}
        for failure in failures:
            groups.setdefault(failure.failure, []).append(failure)
        routed = []
        for failure_class, group in groups.items():
            exceptions = sorted({f.exception for f in group if f.exception})
            routed.append(
                await self.route_failure(
                    message,
                    wq,
                    failure_class,
                    summarize(group),
                    body=body_for([f.index for f in group]),
                    service=service,
                    exception=", ".join(exceptions[:5]) or None,
                    extra_headers={
                        H_FAILED_RECORDS: len(group),
                        H_RECORD_ERRORS: record_errors(group),
                    },
                )
            )
        return routed

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


def _channel_open(message: AbstractIncomingMessage) -> bool:
    """Whether the channel the message came on is still open (it can still be acked)."""
    try:
        return not message.channel.is_closed
    except Exception:
        return False


def summarize(failures: Sequence[RecordFailure]) -> str:
    """The error of a letter that carries ``failures``: a single record's own error, or how
    many failed and the first few references with their errors."""
    if len(failures) == 1:
        return failures[0].error
    if len({f.error for f in failures}) == 1:
        return f"{len(failures)} records: {failures[0].error}"
    shown = "; ".join(f"{f.ref}: {f.error[:200]}" for f in failures[:5])
    more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
    return f"{len(failures)} records failed: {shown}{more}"


def record_errors(failures: Sequence[RecordFailure]) -> list[str]:
    out = [f"{f.ref}: {f.error[:300]}" for f in failures[:MAX_RECORD_ERRORS]]
    if len(failures) > MAX_RECORD_ERRORS:
        out.append(f"and {len(failures) - MAX_RECORD_ERRORS} more (ml-connector audit --failed)")
    return out
