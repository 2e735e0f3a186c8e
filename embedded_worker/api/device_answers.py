"""What the model and device domains answer, whether asked by a command or by a coordination step.

`model.load_model` as a command and as a step of a coordination end here
alike, so a load means one thing however it is asked for: every device
worker holds the model before the answer comes back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..diffusion.device_pool import DevicePool


LOAD_TIMEOUT_SECONDS = 600.0


def loaded_models(pool: DevicePool) -> dict[str, list[str]]:
    """model id -> the device workers that hold it now."""
    loaded: dict[str, list[str]] = {}
    for worker in pool.workers:
        for model_id in worker.status()["loaded_models"]:
            loaded.setdefault(model_id, []).append(worker.name)
    return loaded


def load_model(pool: DevicePool, model_id: str) -> dict:
    """Load on every device worker (each between two of its steps) and wait until all hold it."""
    for future in pool.on_every_worker(lambda worker: worker.load(model_id)):
        future.result(timeout=LOAD_TIMEOUT_SECONDS)
    return {"model_id": model_id, "loaded": True, "loaded_on": loaded_models(pool).get(model_id, [])}


def unload_model(pool: DevicePool, model_id: str) -> dict:
    futures = pool.on_every_worker(lambda worker: worker.unload(model_id))
    unloaded = sum(1 for future in futures if future.result(timeout=LOAD_TIMEOUT_SECONDS))
    return {"model_id": model_id, "unloaded_from": unloaded}


def device_status(pool: DevicePool) -> dict:
    status = pool.status()
    answer = {"workers": status["workers"], "memory": status["memory"], "queued_images": status["queued_images"]}
    for part in ("starting", "start_error", "cluster"):  # a lost Ray head shows in cluster: state, head_losses
        if part in status:
            answer[part] = status[part]
    return answer


def device_memory(pool: DevicePool) -> dict:
    return {"memory": pool.status()["memory"]}


def list_devices(pool: DevicePool) -> dict:
    devices: dict[str, dict] = {}
    for worker in pool.workers:
        entry = devices.setdefault(str(worker.device), {"device": str(worker.device), "type": worker.device.type,
                                                       "dtype": worker.status()["dtype"], "workers": []})
        entry["workers"].append(worker.name)
    return {"devices": list(devices.values())}
