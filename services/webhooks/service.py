"""The webhook receiver: verifies each notification, answers fast, publishes ChangeNotices.

``POST /hooks/{connection}`` goes to that connection's push source (``shared.channels``): the
connector says how a call is verified and which records it names (Zoho: the channel's token,
compared with the one stored encrypted, and the channel's expiry; see
``shared.connectors.zoho_watch``). Payloads carry ids only; the poller fetches the records.
The service also runs the subscription loop that registers, renews and removes the channels.
Polling keeps running as the safety net.

What a caller can send is bounded before anything is decoded: ``application/json`` only (415),
at most ``MAX_BODY`` bytes (413), headers and body within ``MLC_WEBHOOK_READ_TIMEOUT_S`` (408,
and the connection is closed), JSON nested at most ``MAX_DEPTH`` deep (400), and at most
``MLC_WEBHOOK_MAX_REQUESTS`` requests at once (503): slow senders cannot hold the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from services.runtime import ServiceContext
from shared.bus import UnroutableError
from shared.channels import (
    ChannelStore,
    NotificationRefused,
    PushRequest,
    PushSource,
    SubscriptionLoop,
    can_push,
    push_source,
)
from shared.connections import ConnectionConfigError
from shared.failures import PermanentError, describe
from shared.messages import NoticeBatch

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
MAX_DEPTH = 64  # a Zoho callback is 2 deep
LOOP_STOP_S = 5.0  # how long a stopping service waits for the subscription loop
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
        self.channels = ChannelStore(ctx.pool, ctx.vault)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._limit])
        app.router.add_post("/hooks/{connection}", self.hook)
        # the address of releases before /hooks: channels registered then still call it
        app.router.add_post("/webhooks/zoho/{connection}", self.hook)
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

    async def _push_source(self, connection: str) -> tuple[str, PushSource] | web.Response:
        """The connection's system and push side, or the response refusing the call."""
        try:
            system = await self.ctx.system_of(connection)
        except ConnectionConfigError:
            return _refuse(404, f"no connection named {connection!r}")
        try:
            source = push_source(system, await self.ctx.connector(connection))
        except Exception as exc:
            log.error("webhooks: connection %s cannot be opened: %s", connection, describe(exc))
            return _refuse(500, f"connection {connection!r} cannot be opened")
        if source is None:
            return _refuse(404, f"connection {connection!r} ({system}) takes no notifications")
        return system, source

    async def hook(self, request: web.Request) -> web.Response:
        """``/hooks/{connection}``: the connection's connector verifies the call and says
        which records changed; the notices go to the bus."""
        connection = request.match_info["connection"]
        payload = await self._json_body(request)
        if isinstance(payload, web.Response):
            self.rejected += 1
            return payload
        found = await self._push_source(connection)
        if isinstance(found, web.Response):
            self.rejected += 1
            return found
        system, source = found
        push = PushRequest(connection, system, request.headers, payload)
        try:
            notices = await source.verify(push, self.channels)
        except NotificationRefused as exc:
            self.rejected += 1
            if exc.status == 410:
                log.warning("notification on an expired channel of %s refused", connection)
            return _refuse(exc.status or 400, exc.message)
        except PermanentError as exc:
            self.rejected += 1
            return _refuse(400, f"invalid notification: {exc.message}")
        try:
            for notice in notices:
                await self.ctx.bus.publish(
                    "notices", f"{system}.{notice.entity}", NoticeBatch(notices=[notice])
                )
        except UnroutableError:
            return _refuse(503, "no consumer for notices")
        self.received += 1
        return web.json_response({"accepted": sum(len(n.ids) for n in notices)})


def subscription_loop(ctx: ServiceContext) -> SubscriptionLoop:
    """The loop that keeps every push connection's channel registered (see shared.channels)."""

    async def opener(connection: str) -> PushSource | None:
        try:
            system = await ctx.system_of(connection)
        except ConnectionConfigError:
            return None  # the connection was removed: forget its channels (they lapse unused)
        if not can_push(system):
            return None
        return push_source(system, await ctx.connector(connection))

    settings = ctx.settings
    return SubscriptionLoop(
        ctx.pool,
        ChannelStore(ctx.pool, ctx.vault),
        ctx.audit,
        opener,
        public_url=settings.webhook_public_url,
        lifetime_s=settings.channel_lifetime_s,
        check_s=settings.channel_check_s,
        actor=ctx.actor,
    )


async def run(
    ctx: ServiceContext, stop: asyncio.Event, server: WebhookServer | None = None
) -> None:
    """Serve until ``stop``. ``ml-connector run`` passes a server already listening (it binds
    before it reports ready, and exits with one line when it cannot); otherwise the server is
    started here and a bind failure raises WebhookStartError."""
    if server is None:
        server = WebhookServer(ctx)
        await server.start()
    loop = asyncio.create_task(subscription_loop(ctx).run(stop), name="channels")
    try:
        await stop.wait()
    finally:
        # the loop stops between rounds; one stuck in a slow call is cut off (a channel it was
        # registering then expires unused: callbacks on it are refused as unknown)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(loop, timeout=LOOP_STOP_S)
        await server.stop()
