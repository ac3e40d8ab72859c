"""The webhook receiver: verifies each notification, answers fast, publishes a ChangeNotice.

Zoho CRM echoes the channel's verification token in every callback (there is no signature), so
a callback is accepted only when its ``channel_id`` is one we registered and its ``token``
matches the one stored (encrypted) for that channel. Payloads carry ids only; the poller fetches
the records. Polling keeps running as the safety net.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.runtime import ServiceContext
from shared.bus import UnroutableError
from shared.messages import ChangeNotice, NoticeBatch
from shared.vault import VaultError

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024


class ZohoCallback(BaseModel):
    model_config = ConfigDict(extra="allow")
    channel_id: str | int
    token: str = Field(max_length=256)
    module: str = Field(pattern=r"^[A-Za-z0-9_]+$", max_length=100)
    ids: list[str] = Field(min_length=1, max_length=1000)
    operation: str = "update"
    server_time: int | None = None


class WebhookServer:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.received = 0
        self.rejected = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/webhooks/zoho/{connection}", self.zoho)
        app.router.add_get("/healthz", self.healthz)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "received": self.received})

    async def zoho(self, request: web.Request) -> web.Response:
        connection = request.match_info["connection"]
        try:
            payload: Any = await request.json()
            callback = ZohoCallback.model_validate(payload)
        except (ValueError, ValidationError) as exc:
            self.rejected += 1
            reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else "not JSON"
            return web.json_response({"error": f"invalid notification: {reason}"}, status=400)
        row = await self.ctx.pool.fetchrow(
            "SELECT connection, token FROM webhook_channels WHERE channel_id = $1",
            str(callback.channel_id),
        )
        if row is None or row["connection"] != connection:
            self.rejected += 1
            return web.json_response({"error": "unknown channel"}, status=401)
        try:
            expected = self.ctx.vault.decrypt(row["token"], connection).decode()
        except VaultError:
            log.error("stored token of channel %s cannot be decrypted", callback.channel_id)
            return web.json_response({"error": "channel token unreadable"}, status=500)
        if not hmac.compare_digest(expected.encode(), callback.token.encode()):
            self.rejected += 1
            return web.json_response({"error": "token mismatch"}, status=401)
        system = await self.ctx.system_of(connection)
        notice = ChangeNotice(
            connection=connection,
            system=system,
            entity=callback.module,
            ids=callback.ids,
            operation=callback.operation,
        )
        try:
            await self.ctx.bus.publish(
                "notices", f"{system}.{callback.module}", NoticeBatch(notices=[notice])
            )
        except UnroutableError:
            return web.json_response({"error": "no consumer for notices"}, status=503)
        self.received += 1
        return web.json_response({"accepted": len(callback.ids)})


async def run(ctx: ServiceContext, stop: asyncio.Event) -> None:
    server = WebhookServer(ctx)
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, ctx.settings.webhook_bind, ctx.settings.webhook_port)
    try:
        await site.start()
    except OSError as exc:
        log.error("webhook server cannot listen on port %s: %s", ctx.settings.webhook_port, exc)
        await runner.cleanup()
        await stop.wait()
        return
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
