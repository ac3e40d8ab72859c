"""Serving an emulator: in the current event loop (tests, demo, bench) or as its own process."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from aiohttp import web


class RunningEmulator:
    """An emulator app served on 127.0.0.1 inside the current event loop (tests, demo, bench)."""

    def __init__(self, app: web.Application, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RunningEmulator:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> RunningEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def serve_main(make_app: Callable[[], web.Application], default_port: int) -> None:
    """`python -m emulators.<system> --port N`: serve one emulator on 127.0.0.1 until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=default_port)
    args = parser.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None)
