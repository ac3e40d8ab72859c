"""Answers over the size cap fail clearly, before they are read whole (issue 17, item 8).

A server on 127.0.0.1 that would stream 100 MB (as a chunked body, or with its Content-Length
declared) counts the bytes it managed to send; the connectors must give up near the cap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from aiohttp import web

from emulators.common import RunningEmulator
from shared.connectors.base import StreamSpec
from shared.connectors.syspro import SysproConnector
from shared.connectors.zoho_crm import ZohoCrmConnector
from shared.failures import FailureClass, classify
from shared.http import DEFAULT_MAX_RESPONSE_MB, ResponseTooLargeError
from shared.retry import RetryPolicy

MB = 1024 * 1024
HUGE = 100 * MB
CHUNK = 64 * 1024
FAST = RetryPolicy(attempts=2, base_delay_s=0.001, max_delay_s=0.005, throttle_delay_s=0.001)


@dataclass
class Streamer:
    """Counts what each streamed answer managed to send before the client hung up."""

    declare_length: bool = False
    sent: list[int] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def huge(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.declare_length:
            response.content_length = HUGE
        await response.prepare(request)
        head = b'{"value": ['
        sent = 0
        try:
            await response.write(head)
            sent += len(head)
            filler = b" " * CHUNK
            while sent + CHUNK <= HUGE:
                await response.write(filler)
                sent += CHUNK
        except (ConnectionError, RuntimeError):
            pass  # the client hung up
        finally:
            self.sent.append(sent)
            self.done.set()
        return response

    async def token(self, request: web.Request) -> web.Response:
        host = f"http://{request.host}"
        return web.json_response({"access_token": "1000.big.token", "api_domain": host})


@pytest_asyncio.fixture
async def streamer() -> AsyncIterator[tuple[Streamer, RunningEmulator]]:
    state = Streamer()
    app = web.Application()
    app.router.add_post("/oauth/v2/token", state.token)
    app.router.add_get("/crm/v8/Accounts", state.huge)
    app.router.add_get("/odata/ArCustomer", state.huge)
    server = await RunningEmulator(app).start()
    yield state, server
    await server.stop()


async def test_a_chunked_answer_over_the_default_cap_fails_before_it_is_read_whole(
    streamer: tuple[Streamer, RunningEmulator],
) -> None:
    state, server = streamer
    zoho = ZohoCrmConnector(
        "zoho-big",
        {"client_id": "1000.C", "accounts_url": server.url},
        {"client_secret": "zoho-secret", "refresh_token": "1000.refresh.x"},
        retry_policy=FAST,
    )
    stream = StreamSpec("Accounts", ("Account_Name",), "Modified_Time")
    try:
        with pytest.raises(ResponseTooLargeError) as info:
            async for _ in zoho.changed_since(stream, None):
                pass
    finally:
        await zoho.close()
    await asyncio.wait_for(state.done.wait(), 10)
    exc = info.value
    assert exc.code == "RESPONSE_TOO_LARGE"
    assert classify(exc) is FailureClass.PERMANENT  # the same answer again would not fit
    assert f"over the cap of {DEFAULT_MAX_RESPONSE_MB:g} MB" in str(exc)
    assert "max_response_mb of connection 'zoho-big'" in str(exc)
    assert state.sent == [state.sent[0]]  # asked once: retrying cannot help
    cap = int(DEFAULT_MAX_RESPONSE_MB * MB)
    assert state.sent[0] < cap + 16 * MB < HUGE  # the rest of the 100 MB was never sent


async def test_a_declared_content_length_over_the_cap_is_refused_unread(
    streamer: tuple[Streamer, RunningEmulator],
) -> None:
    state, server = streamer
    state.declare_length = True
    syspro = SysproConnector(
        "syspro-big",
        {
            "rest_url": f"{server.url}/rest",
            "odata_url": f"{server.url}/odata",
            "operator": "ADMIN",
            "company_id": "EDU1",
            "max_response_mb": 1,
        },
        {"operator_password": "op-secret", "odata_password": "od-secret"},
        retry_policy=FAST,
    )
    try:
        with pytest.raises(ResponseTooLargeError) as info:
            async for _ in syspro.changed_since(StreamSpec("ArCustomer", ("Customer",)), None):
                pass
    finally:
        await syspro.close()
    await asyncio.wait_for(state.done.wait(), 10)
    message = str(info.value)
    assert "SYSPRO OData ArCustomer: the answer is 100 MB (Content-Length)" in message
    assert "over the cap of 1 MB; raise max_response_mb of connection 'syspro-big'" in message
    assert state.sent[0] < 16 * MB


def test_the_cap_is_a_connection_setting_with_a_sane_range() -> None:
    from pydantic import ValidationError

    from shared.connectors.zoho_crm import ZohoCrmSettings

    assert ZohoCrmSettings(client_id="x").max_response_mb == DEFAULT_MAX_RESPONSE_MB
    assert 8 <= DEFAULT_MAX_RESPONSE_MB <= 64
    with pytest.raises(ValidationError):
        ZohoCrmSettings(client_id="x", max_response_mb=0)
    json.dumps(ZohoCrmSettings(client_id="x", max_response_mb=0.5).model_dump())
