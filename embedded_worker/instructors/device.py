"""device.*: the devices the worker drives and their memory."""

from __future__ import annotations

from ..engine import Engine


class DeviceInstructor:
    commands = ("get_status", "list_devices", "get_memory")

    def __init__(self, engine: Engine):
        self.engine = engine

    def get_status(self, data: dict) -> dict:
        status = self.engine.pool.status()
        return {"workers": status["workers"], "memory": status["memory"], "queued_images": status["queued_images"]}

    def list_devices(self, data: dict) -> dict:
        devices = {}
        for worker in self.engine.pool.workers:
            entry = devices.setdefault(str(worker.device), {"device": str(worker.device), "type": worker.device.type,
                                                           "dtype": worker.status()["dtype"], "workers": []})
            entry["workers"].append(worker.name)
        return {"devices": list(devices.values())}

    def get_memory(self, data: dict) -> dict:
        return {"memory": self.engine.pool.status()["memory"]}
