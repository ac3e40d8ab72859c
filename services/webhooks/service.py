"""The webhook receiver: verifies each notification, answers fast, publishes a ChangeNotice.

Zoho CRM echoes the channel's verification token in every callback (there is no signature), so
a callback is accepted only when its ``channel_id`` is one we registered, its ``token`` matches
the one stored (encrypted) for that channel, and the channel has not expired. Payloads carry ids
only; the poller fetches the records. Polling keeps running as the safety net.

What a caller can send is bounded before anything is decoded: ``application/json`` only (415),
at most ``MAX_BODY`` bytes (413), headers and body within ``MLC_WEBHOOK_READ_TIMEOUT_S`` (408,
and the connection is closed), JSON nested at most ``MAX_DEPTH`` deep (400), and at most
``MLC_WEBHOOK_MAX_REQUESTS`` requests at once (503): slow senders cannot hold the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.runtime import ServiceContext
from shared.bus import UnroutableError
from shared.messages import ChangeNotice, NoticeBatch
from shared.vault import VaultError

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
MAX_DEPTH = 64  # a Zoho callback is 2 deep
LINGER_S = 1.0  # after refusing a body it did not read, the server reads on this long at most

_OPENERS = frozenset(b"[{")
_CLOSERS = frozenset(b"]}")


def json_depth_exceeds(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text nests arrays and objects more than ``limit`` deep (brackets in
    strings do not count). Checked before decoding: the decoder recurses once per level."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False  # the usual case, decided without a scan
    depth = 0
    in_string = escaped = False
    quote, backslash = ord('"'), ord("\\")
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == backslash:
                escaped = True
            elif byte == quote:
                in_string = False
        elif byte == quote:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        elif byte in _CLOSERS:
            depth -= 1
    return False


class WebhookStartError(RuntimeError):
    """The receiver could not listen; the message is one line naming address and port."""


class ZohoCallback(BaseModel):
    model_config = ConfigDict(extra="allow")
    channel_id: str | int
    token: str = Field(max_length=256)
    module: str = Field(pattern=r"^[A-Za-z0-9_]+$", max_length=100)
    ids: list[str] = Field(min_length=1, max_length=1000)
    operation: str = "update"
    server_time: int | None = None


def _refuse(status: int, error: str, *, close: bool = False) -> web.Response:
    response = web.json_response({"error": error}, status=status)
    if close:
        response.force_close()
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class WebhookServer:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.read_timeout = ctx.settings.webhook_read_timeout_s
        self.max_requests = ctx.settings.webhook_max_requests
        self.received = 0
        self.rejected = 0
        self.in_flight = 0
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._limit])
        app.router.add_post("/webhooks/zoho/{connection}", self.zoho)
        app.router.add_get("/healthz", self.healthz)
        return app

    def runner(self) -> web.AppRunner:
        """The app with the server's own limits: a connection that has not sent a whole
        request within the read timeout (slow headers, or idle between requests) is closed."""
        return web.AppRunner(
            self.app(),
            access_log=None,
            keepalive_timeout=self.read_timeout,
            lingering_time=min(LINGER_S, self.read_timeout),
        )

    async def start(self, bind: str | None = None, port: int | None = None) -> int:
        """Listen on ``MLC_WEBHOOK_BIND:MLC_WEBHOOK_PORT``; WebhookStartError when it cannot."""
        bind = self.ctx.settings.webhook_bind if bind is None else bind
        port = self.ctx.settings.webhook_port if port is None else port
        runner = self.runner()
        await runner.setup()
        site = web.TCPSite(runner, bind, port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc) or exc.__class__.__name__
            raise WebhookStartError(
                f"webhooks: cannot listen on {bind}:{port}: {reason}"
                " (set MLC_WEBHOOK_PORT or MLC_WEBHOOK_BIND)"
            ) from None
        self._runner = runner
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("webhooks listening on %s:%d", bind, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _limit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.in_flight >= self.max_requests:
            self.rejected += 1
            response = _refuse(503, "too many requests at once; try again", close=True)
            response.headers["Retry-After"] = "1"
            return response
        self.in_flight += 1
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "received": self.received})

    async def _json_body(self, request: web.Request) -> Any | web.Response:
        """The decoded body, or the response refusing it."""
        if request.content_type != "application/json":
            return _refuse(415, "Content-Type must be application/json", close=True)
        try:
            async with asyncio.timeout(self.read_timeout):
                body = await request.read()
        except TimeoutError:
            return _refuse(408, f"body not received within {self.read_timeout:g} s", close=True)
        if json_depth_exceeds(body):
            return _refuse(400, f"invalid notification: nested more than {MAX_DEPTH} deep")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            return _refuse(400, "invalid notification: not JSON")

    async def zoho(self, request: web.Request) -> web.Response:
        connection = request.match_info["connection"]
        payload = await self._json_body(request)
        if isinstance(payload, web.Response):
            self.rejected += 1
            return payload
        try:
            callback = ZohoCallback.model_validate(payload)
        except ValidationError as exc:
            self.rejected += 1
            return _refuse(400, f"invalid notification: {exc.errors()[0]['msg']}")
        row = await self.ctx.pool.fetchrow(
            "SELECT connection, token, expires_at > now() AS live FROM webhook_channels"
            " WHERE channel_id = $1",
            str(callback.channel_id),
        )
        if row is None or row["connection"] != connection:
            self.rejected += 1
            return _refuse(401, "unknown channel")
        try:
            expected = self.ctx.vault.decrypt(row["token"], connection).decode()
        except VaultError:
            log.error("stored token of channel %s cannot be decrypted", callback.channel_id)
            return _refuse(500, "channel token unreadable")
        if not hmac.compare_digest(expected.encode(), callback.token.encode()):
            self.rejected += 1
            return _refuse(401, "token mismatch")
        if not row["live"]:
            self.rejected += 1
            log.warning("notification on expired channel %s refused", callback.channel_id)
            return _refuse(410, "channel expired")
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
            return _refuse(503, "no consumer for notices")
        self.received += 1
        return web.json_response({"accepted": len(callback.ids)})


async def run(
    ctx: ServiceContext, stop: asyncio.Event, server: WebhookServer | None = None
) -> None:
    """Serve until ``stop``. ``ml-connector run`` passes a server already listening (it binds
    before it reports ready, and exits with one line when it cannot); otherwise the server is
    started here and a bind failure raises WebhookStartError."""
    if server is None:
        server = WebhookServer(ctx)
        await server.start()
    try:
        await stop.wait()
    finally:
        await server.stop()
