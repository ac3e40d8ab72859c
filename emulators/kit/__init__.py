"""The emulator kit: the pieces every emulator shares.

- :mod:`emulators.kit.faults`: fault injection and call counting (a middleware)
- :mod:`emulators.kit.control`: the common control API (stats, faults, reset), a clock tests
  move forward, a strict JSON body reader
- :mod:`emulators.kit.runner`: serving an app in the current loop or as its own process
- :mod:`emulators.kit.tokens`: an OAuth token server (refresh_token, client_credentials,
  password, authorization_code grants) and an access-token store with expiry
- :mod:`emulators.kit.ratelimit`: a concurrency cap and a rolling budget
- :mod:`emulators.kit.odata`: ``$filter`` parser/evaluator and ``$select``/``$orderby``/
  ``$top``/``$skip`` helpers, with the SYSPRO, Acumatica and Sage 300 dialects
"""

from emulators.kit.control import (
    CONTROL_PREFIX,
    Clock,
    add_clock_route,
    add_common_control_routes,
    bad_request,
    json_body,
)
from emulators.kit.faults import CallStats, FaultResponder, Faults, Handler, fault_middleware
from emulators.kit.ratelimit import ConcurrencyCap, RollingBudget
from emulators.kit.runner import RunningEmulator, serve_main
from emulators.kit.tokens import (
    AccessToken,
    GrantError,
    TokenServer,
    TokenStore,
    add_token_control_routes,
)

__all__ = [
    "CONTROL_PREFIX",
    "AccessToken",
    "CallStats",
    "Clock",
    "ConcurrencyCap",
    "FaultResponder",
    "Faults",
    "GrantError",
    "Handler",
    "RollingBudget",
    "RunningEmulator",
    "TokenServer",
    "TokenStore",
    "add_clock_route",
    "add_common_control_routes",
    "add_token_control_routes",
    "bad_request",
    "fault_middleware",
    "json_body",
    "serve_main",
]
