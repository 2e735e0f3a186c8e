"""Exceptions inside the worker; the facade turns each into an error envelope.

Every class carries the protocol's `error_code`, so the boundary never has to
guess what kind of failure it is looking at.
"""

from __future__ import annotations

from typing import Any


class WorkerError(Exception):
    """A failure with a protocol error code and an optional `details` payload."""

    code = "internal"

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(WorkerError):
    code = "invalid_request"


class NotFound(WorkerError):
    code = "not_found"


class InvalidState(WorkerError):
    code = "invalid_state"


class ResourceExhausted(WorkerError):
    code = "resource_exhausted"


class Unavailable(WorkerError):
    code = "unavailable"


class Cancelled(WorkerError):
    code = "cancelled"


class InternalError(WorkerError):
    code = "internal"


def is_out_of_memory(error: BaseException) -> bool:
    """True for the device running out of memory, whatever backend raised it."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, (RuntimeError, MemoryError)) and "out of memory" in str(error).lower()
