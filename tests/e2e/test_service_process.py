"""A service as an operator runs it: health, readiness, metrics, JSON logs, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import aiohttp

from tests.e2e.conftest import ROOT, Pipeline, wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_health_metrics_logs_and_graceful_stop(pipeline_factory, tmp_path) -> None:
    p: Pipeline = await pipeline_factory(customers=50, invoices=100)
    port = _free_port()
    log_path = tmp_path / "all.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "services", "run", "all", "--health-port", str(port)],
            env=p.env,
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> tuple[int, str]:
                try:
                    async with http.get(f"http://127.0.0.1:{port}{path}") as r:
                        return r.status, await r.text()
                except aiohttp.ClientError:
                    return 0, ""

            await wait_until(lambda: _ok(get("/healthz")), 30, "/healthz")
            status, body = await get("/readyz")
            assert status == 200 and json.loads(body)["ready"] is True
            await wait_until(lambda: _landed(p), 60, "the records")
            status, metrics = await get("/metrics")
            assert status == 200
            assert 'mlc_records_total{flow="syspro-zoho",stage="written"} 150.0' in metrics
            assert "mlc_api_calls_total" in metrics and "mlc_queue_ready" in metrics
            assert 'mlc_token_refreshes_total{connection="zoho"}' in metrics
        os.kill(proc.pid, signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 40)
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert lines, "the service logs JSON lines"
    assert all({"time", "level", "service", "message"} <= set(line) for line in lines)
    assert any("stopping" in line["message"] for line in lines)


async def _ok(call) -> bool:  # type: ignore[no-untyped-def]
    status, _ = await call
    return status == 200


async def _landed(p: Pipeline) -> bool:
    return await p.zoho_count("Accounts") == 50 and await p.zoho_count("Deals") == 100
