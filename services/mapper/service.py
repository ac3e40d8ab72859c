"""The mapper: turns each ChangeEvent into an UpsertCommand shaped for the target, from the
flow's declarative mapping, and publishes the commands of one target entity as one message.

A record it cannot map (whatever the exception: a ``MappingError`` is permanent, anything
unforeseen transient, by ``shared.failures.classify``) fails alone: the records that failed are
split out, one message per failure class, to retry or the dead-letter queue with the reasons,
and their audit rows written; the others are published. A mapped record's row is the writer's
(the batch carries when and by whom it was mapped). A failure of the whole batch (its flow or
target connection missing) routes the whole batch; an outage of the database or broker is left
to the bus, which holds the message until they answer."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from aio_pika.abc import AbstractIncomingMessage

from services.runtime import ServiceContext
from shared import metrics
from shared.audit import AuditEvent
from shared.bus import H_REPLAYS, MAPPER_QUEUE, RecordFailure
from shared.failures import (
    MappingError,
    PermanentError,
    classify,
    describe,
    exception_name,
    is_infrastructure,
)
from shared.keys import load_case_sensitive_keys
from shared.mapping import map_event
from shared.messages import (
    ChangeBatch,
    ChangeEvent,
    CommandBatch,
    UpsertCommand,
    encode,
    subset_body,
    utcnow,
)

log = logging.getLogger(__name__)

# Commands per bus message: one target call's worth, so that writer replicas share the work
# evenly (a few large messages would all sit in one writer's prefetch).
COMMAND_BATCH = 100


class Mapper:
    def __init__(
        self, ctx: ServiceContext, *, prefetch: int = 10, command_batch: int = COMMAND_BATCH
    ) -> None:
        self.ctx = ctx
        self.prefetch = prefetch
        self.command_batch = command_batch

    async def run(self, stop: asyncio.Event) -> None:
        await self.ctx.bus.consume(MAPPER_QUEUE, self.on_message, prefetch=self.prefetch)
        await stop.wait()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        bus = self.ctx.bus
        batch = await self.ctx.decode_or_dead_letter(message, MAPPER_QUEUE, ChangeBatch)
        if batch is None:
            return
        # A replayed message is mapped with the flow as it is now: the operator replays after
        # fixing the cause, and a fixed mapping is a new version of the flow.
        replayed = bool((message.headers or {}).get(H_REPLAYS))
        try:
            commands, failed = await self.map_batch(batch, current=replayed)
            await self.publish(commands)
        except Exception as exc:
            if is_infrastructure(exc):
                raise  # the bus holds the message until the database and broker answer
            # The whole batch failed (its flow or target connection is missing, no writer
            # queue is bound for the target, ...): route it whole, with its class.
            await self._audit_failed(batch.events, exc)
            await bus.route_failure(
                message,
                MAPPER_QUEUE,
                classify(exc),
                describe(exc),
                body=encode(batch),
                service=self.ctx.actor,
                exception=exc,
            )
            await message.ack()
            return
        await self._audit(batch, commands, failed)
        if failed:
            index = {id(event): i for i, event in enumerate(batch.events)}
            await bus.route_records(
                message,
                MAPPER_QUEUE,
                [
                    RecordFailure(
                        index[id(event)],
                        f"{event.source_system}:{event.entity}:{event.key}",
                        classify(error),
                        describe(error),
                        None if isinstance(error, MappingError) else exception_name(error),
                    )
                    for event, error in failed
                ],
                lambda indexes: subset_body(batch, indexes),
                service=self.ctx.actor,
            )
        await message.ack()

    async def map_batch(
        self, batch: ChangeBatch, *, current: bool = False
    ) -> tuple[list[UpsertCommand], list[tuple[ChangeEvent, Exception]]]:
        """Map each event with the flow version it was polled under (a flow applied while
        events are in flight changes nothing for them), or with the current version. An event
        whose mapping raises, whatever it raises, fails alone."""
        stored = await self.ctx.flows.get(batch.flow)
        if not stored.enabled:
            raise PermanentError(f"flow {batch.flow!r} is disabled; enable it, then replay")
        target_system = await self.ctx.system_of(stored.flow.target)
        # parent keys are built as the poller built the keys (``shared.keys``)
        case_sensitive = await load_case_sensitive_keys(self.ctx.pool, stored.flow.source)
        commands: list[UpsertCommand] = []
        failed: list[tuple[ChangeEvent, Exception]] = []
        versions = {stored.version: stored.flow}  # a batch's events share their version
        for event in batch.events:
            version = stored.version if current else event.flow_version
            flow = versions.get(version)
            if flow is None:
                flow = versions[version] = await self.ctx.flows.get_version(batch.flow, version)
            try:
                commands.append(
                    map_event(
                        flow,
                        version,
                        event,
                        target_connection=flow.target,
                        target_system=target_system,
                        case_sensitive_keys=case_sensitive,
                    )
                )
            except KeyError as exc:
                failed.append((event, MappingError(str(exc))))
            except Exception as exc:
                if is_infrastructure(exc):
                    raise
                failed.append((event, exc))
        return commands, failed

    async def publish(self, commands: list[UpsertCommand]) -> None:
        groups: dict[tuple[str, str, str], list[UpsertCommand]] = defaultdict(list)
        for command in commands:
            key = (command.target_system, command.target_connection, command.target_entity)
            groups[key].append(command)
        size = self.command_batch
        mapped_at = utcnow()
        await self.ctx.bus.publish_many(
            (
                "commands",
                f"{system}.{entity}",
                CommandBatch(
                    target_connection=connection,
                    target_entity=entity,
                    mapped_at=mapped_at,
                    mapped_by=self.ctx.actor,
                    commands=group[i : i + size],
                ),
            )
            for (system, connection, entity), group in groups.items()
            for i in range(0, len(group), size)
        )

    async def _audit(
        self,
        batch: ChangeBatch,
        commands: list[UpsertCommand],
        failed: list[tuple[ChangeEvent, Exception]],
    ) -> None:
        """A mapped record's row is the writer's: it carries when and by whom the command was
        mapped (``CommandBatch.mapped_at``, ``mapped_by``). Only failures are the mapper's."""
        if failed:
            await self.ctx.audit.write(self._failed_rows(failed, batch.batch_id))
            metrics.RECORDS.labels(batch.flow, "failed").inc(len(failed))
        metrics.RECORDS.labels(batch.flow, "mapped").inc(len(commands))

    def _failed_rows(
        self, failed: list[tuple[ChangeEvent, Exception]], message_id: str
    ) -> list[AuditEvent]:
        return [
            AuditEvent(
                stage="mapped",
                status="dead_lettered",
                actor=self.ctx.actor,
                flow=e.flow,
                source_ref=f"{e.source_system}:{e.entity}:{e.key}",
                event_id=e.event_id,
                message_id=message_id,
                error_class=str(classify(error)),
                error=describe(error),
            )
            for e, error in failed
        ]

    async def _audit_failed(self, events: list[ChangeEvent], error: Exception) -> None:
        await self.ctx.audit.write(self._failed_rows([(e, error) for e in events], ""))


async def run(ctx: ServiceContext, stop: asyncio.Event) -> None:
    await Mapper(ctx).run(stop)
