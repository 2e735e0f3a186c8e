"""device.*: the devices the worker drives and their memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import device_answers, domain_status
from ..messages import DomainStatusRequest, Request, parse

if TYPE_CHECKING:
    from ...engine import Engine


class DeviceInstructor:
    commands = ("get_status", "list_devices", "get_memory")

    def __init__(self, engine: Engine):
        self.engine = engine

    def get_status(self, data: dict) -> dict:
        """The devices; with a session_id or batch_id, where that work's images run and what they need."""
        work = domain_status.find_work(self.engine, parse(DomainStatusRequest, data))
        if work is not None:
            return domain_status.domain_part(self.engine, "device", work)
        return device_answers.device_status(self.engine.pool)

    def list_devices(self, data: dict) -> dict:
        parse(Request, data)
        return device_answers.list_devices(self.engine.pool)

    def get_memory(self, data: dict) -> dict:
        parse(Request, data)
        return device_answers.device_memory(self.engine.pool)
