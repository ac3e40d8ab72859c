"""Kept for imports written before the kit: everything here lives in :mod:`emulators.kit`."""

from emulators.kit.control import CONTROL_PREFIX, add_common_control_routes
from emulators.kit.faults import CallStats, FaultResponder, Faults, Handler, fault_middleware
from emulators.kit.runner import RunningEmulator, serve_main

__all__ = [
    "CONTROL_PREFIX",
    "CallStats",
    "FaultResponder",
    "Faults",
    "Handler",
    "RunningEmulator",
    "add_common_control_routes",
    "fault_middleware",
    "serve_main",
]
