"""device.*: the devices the worker drives and their memory."""

from __future__ import annotations

from .. import domain_answers, work_status
from ..engine import Engine
from ..protocol import DomainStatusRequest, Request, parse


class DeviceInstructor:
    commands = ("get_status", "list_devices", "get_memory")

    def __init__(self, engine: Engine):
        self.engine = engine

    def get_status(self, data: dict) -> dict:
        """The devices; with a session_id or batch_id, where that work's images run and what they need."""
        work = work_status.find_work(self.engine, parse(DomainStatusRequest, data))
        if work is not None:
            return work_status.domain_part(self.engine, "device", work)
        return domain_answers.device_status(self.engine.pool)

    def list_devices(self, data: dict) -> dict:
        parse(Request, data)
        return domain_answers.list_devices(self.engine.pool)

    def get_memory(self, data: dict) -> dict:
        parse(Request, data)
        return domain_answers.device_memory(self.engine.pool)
