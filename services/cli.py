"""``ml-connector``: run the services and operate them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import click

from shared import db
from shared.settings import Settings, load_settings

T = TypeVar("T")

SERVICES = ("poller", "mapper", "writer", "webhooks")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"ml-connector: {message}", err=True)
    sys.exit(code)


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


@asynccontextmanager
async def _context(service: str = "cli", *, declare: bool = False):  # type: ignore[no-untyped-def]
    from services.runtime import open_context

    settings = load_settings()
    try:
        ctx = await open_context(settings, service, declare=declare)
    except OSError as exc:
        _fail(f"cannot reach the broker or the database: {exc}")
    try:
        yield ctx
    finally:
        await ctx.close()


@asynccontextmanager
async def _pool():  # type: ignore[no-untyped-def]
    settings = load_settings()
    try:
        pool = await db.create_pool(settings.database_url.get_secret_value(), max_size=2)
    except (OSError, Exception) as exc:
        _fail(f"cannot open the database (MLC_DATABASE_URL): {exc.__class__.__name__}: {exc}")
    try:
        yield pool
    finally:
        await pool.close()


@click.group()
@click.version_option(package_name="ml-connector")
def main() -> None:
    """ERP <-> CRM sync: SYSPRO, Acumatica, Infor CloudSuite, Sage 300 <-> Zoho CRM, Salesforce."""


# -- run ----------------------------------------------------------------------------------------


@main.command()
@click.argument("service", type=click.Choice(["all", *SERVICES]))
@click.option("--health-port", type=int, default=None, help="port of /healthz, /readyz, /metrics")
def run(service: str, health_port: int | None) -> None:
    """Run one service (or all of them in one process, for development and the demo)."""
    settings = load_settings()
    from services.runtime import tune_garbage_collector
    from shared.bus import TopologyError
    from shared.logs import setup_logging

    setup_logging(service, settings.log_level)
    tune_garbage_collector()
    try:
        _run(run_services(settings, service, health_port))
    except TopologyError as exc:  # a queue declared otherwise before: one line, what to do
        _fail(str(exc))
    except StartupError as exc:
        _fail(str(exc))


class StartupError(Exception):
    """A service could not start (a port it must listen on is taken); one line for the
    operator. Nothing reported ready."""


async def _listen(ctx: Any, names: list[str], health: Any) -> dict[str, Any]:
    """Bind every port of the process before any of it reports ready: the webhook receiver's
    (when it runs here), then the health server's, which serves /readyz. A port that cannot be
    bound is a StartupError, and /readyz never answers."""
    from services.webhooks.service import WebhookServer, WebhookStartError

    bound: dict[str, Any] = {}
    if "webhooks" in names:
        webhooks = WebhookServer(ctx)
        try:
            await webhooks.start()
        except WebhookStartError as exc:
            raise StartupError(str(exc)) from None
        bound["webhooks"] = webhooks
    try:
        await health.start()
    except OSError as exc:
        await health.stop()
        for server in bound.values():
            await server.stop()
        reason = os.strerror(exc.errno) if exc.errno else str(exc) or exc.__class__.__name__
        raise StartupError(
            f"health checks: cannot listen on 127.0.0.1:{health.port}: {reason}"
            " (set MLC_HEALTH_PORT or --health-port; 0 picks a free port)"
        ) from None
    return bound


async def run_services(
    settings: Settings,
    service: str,
    health_port: int | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    import functools
    import logging

    from services.runtime import (
        HealthServer,
        install_stop_signals,
        open_context,
        wait_for_infrastructure,
    )

    log = logging.getLogger("ml-connector")
    await wait_for_infrastructure(settings)  # started during an outage: wait, no traceback
    await db.ensure_database(settings.database_url.get_secret_value())
    await db.migrate(settings.database_url.get_secret_value())
    names = list(SERVICES) if service == "all" else [service]
    ctx = await open_context(settings, service)
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    health = HealthServer(ctx, settings.health_port if health_port is None else health_port)
    try:
        bound = await _listen(ctx, names, health)
    except StartupError:
        await ctx.close()
        raise
    log.info("%s started; health on 127.0.0.1:%d", service, health.port)
    runners = [
        functools.partial(_service_runner(name), server=bound[name])
        if name in bound
        else _service_runner(name)
        for name in names
    ]
    tasks = [asyncio.create_task(r(ctx, stop), name=n) for r, n in zip(runners, names, strict=True)]
    try:
        done, _ = await asyncio.wait(
            [*tasks, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task in tasks and task.exception() is not None:
                log.error("service %s stopped: %r", task.get_name(), task.exception())
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
    finally:
        log.info("%s stopping", service)
        await health.stop()
        await ctx.close()


def _service_runner(name: str) -> Callable[..., Awaitable[None]]:
    if name == "poller":
        from services.poller.service import run as runner
    elif name == "mapper":
        from services.mapper.service import run as runner
    elif name == "writer":
        from services.writer.service import run as runner
    else:
        from services.webhooks.service import run as runner
    return runner


# -- db -----------------------------------------------------------------------------------------


@main.group(name="db")
def db_group() -> None:
    """Database schema."""


@db_group.command()
def migrate() -> None:
    """Apply the numbered migrations (idempotent, safe to run from several replicas)."""
    dsn = load_settings().database_url.get_secret_value()

    async def go() -> list[str]:
        await db.ensure_database(dsn)
        return await db.migrate(dsn)

    try:
        applied = _run(go())
    except OSError as exc:
        _fail(f"cannot reach the database (MLC_DATABASE_URL): {exc}")
    click.echo(f"applied {', '.join(applied)}" if applied else "schema is up to date")


@main.group(name="vault")
def vault_group() -> None:
    """Master key operations."""


@vault_group.command()
def rotate() -> None:
    """Re-encrypt every secret under MLC_MASTER_KEY (keep the old key in MLC_OLD_MASTER_KEYS)."""
    from shared.vault import Vault, VaultError

    async def go() -> dict[str, int]:
        async with _pool() as pool:
            return await Vault.from_settings(load_settings()).rotate(pool)

    try:
        counts = _run(go())
    except VaultError as exc:
        _fail(str(exc))
    click.echo(_json(counts))


from services import cli_ops  # noqa: E402,F401  (registers connections, flows, status, ...)
