"""In-process retries for one external call, driven by the failure class.

A few quick retries absorb a blip (a 5xx, a reset, a throttle with Retry-After, an expired token);
what still fails goes back to the caller, which hands it to the bus's delayed retries.

This is the one retry layer of an API call: whatever the call needs first (an access token, a
session logon) is obtained inside ``call``, in one attempt, so a failing token endpoint costs at
most ``policy.attempts`` token calls per API call, never attempts squared. An auth failure of
the token endpoint itself (``TokenRefusedError``: our credentials are refused) is not retried
with a refresh. What is raised has every registered secret masked in its text.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_random_exponential,
)

from shared.failures import ConnectorError, FailureClass, classify, describe
from shared.logs import redact_error
from shared.ratelimit import RateLimiter
from shared.tokens import TokenRefusedError

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    throttle_delay_s: float = 2.0


DEFAULT_POLICY = RetryPolicy()


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    limiter: RateLimiter | None = None,
    refresh_auth: Callable[[], Awaitable[None]] | None = None,
) -> T:
    """Run ``call``; retry transient and throttled failures, and an auth failure once after
    ``refresh_auth``. Permanent failures and the last failure are raised unchanged."""
    auth_refreshed = False
    backoff = wait_random_exponential(multiplier=policy.base_delay_s, max=policy.max_delay_s)

    def retryable(exc: BaseException) -> bool:
        failure = classify(exc)
        if failure is FailureClass.AUTH:
            return (
                refresh_auth is not None
                and not auth_refreshed
                and not isinstance(exc, TokenRefusedError)
            )
        return failure in (FailureClass.TRANSIENT, FailureClass.THROTTLED)

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if exc is None:
            return 0.0
        failure = classify(exc)
        if failure is FailureClass.AUTH:
            return 0.0
        if failure is FailureClass.THROTTLED:
            after = getattr(exc, "retry_after", None)
            delay = after if after is not None else policy.throttle_delay_s * state.attempt_number
            delay = min(delay, policy.max_delay_s * 4)
            if limiter is not None:
                limiter.pause(delay)
                return 0.0  # the limiter makes every caller of the connection wait
            return delay
        return backoff(state)

    async def before_sleep(state: RetryCallState) -> None:
        nonlocal auth_refreshed
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None:
            log.warning(
                "attempt %d failed (%s): %s; trying again",
                state.attempt_number,
                classify(exc),
                describe(exc),
                extra={"connection": limiter.connection if limiter else None},
            )
        if exc is not None and classify(exc) is FailureClass.AUTH and refresh_auth is not None:
            auth_refreshed = True
            await refresh_auth()

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait,
        retry=retry_if_exception(retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                if limiter is not None:
                    async with limiter.slot():
                        return await call()
                return await call()
    except ConnectorError as exc:
        redact_error(exc)
        raise
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["DEFAULT_POLICY", "ConnectorError", "RetryPolicy", "call_with_retries"]
