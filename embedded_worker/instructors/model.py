"""model.*: which models exist, which are loaded where; load and unload them."""

from __future__ import annotations

from ..engine import Engine
from ..errors import InvalidRequest
from ..planning import confine_path


class ModelInstructor:
    commands = ("get_status", "list_models", "load_model", "unload_model")
    load_timeout_seconds = 600.0

    def __init__(self, engine: Engine):
        self.engine = engine

    def _model_id(self, data: dict) -> str:
        model_id = data.get("model_id") or data.get("model")
        if not isinstance(model_id, str) or not model_id.strip():
            raise InvalidRequest("model_id: required, a non-empty string")
        return model_id.strip()

    def list_models(self, data: dict) -> dict:
        loaded: dict[str, list[str]] = {}
        for worker in self.engine.pool.workers:
            for model_id in worker.status()["loaded_models"]:
                loaded.setdefault(model_id, []).append(worker.name)
        models = []
        for model_id in self.engine.models.ids():
            entry = self.engine.models.entry(model_id)
            models.append({"model_id": model_id, "builtin": entry.builtin,
                           "source": "built-in recipe" if entry.builtin else entry.source,
                           "loaded_on": loaded.get(model_id, []),
                           "default": model_id == self.engine.config.default_model})
        return {"models": models}

    get_status = list_models

    def load_model(self, data: dict) -> dict:
        model_id = self._model_id(data)
        if data.get("path"):
            folder = confine_path(str(data["path"]), self.engine.config.allowed_roots, "path")
            self.engine.models.register(model_id, folder)
        self.engine.models.folder(model_id)  # checks the folder (safetensors only) before any worker loads it
        futures = self.engine.pool.on_every_worker(lambda worker: worker.pipeline(model_id) and None)
        for future in futures:
            future.result(timeout=self.load_timeout_seconds)
        return {"model_id": model_id, "loaded": True, **self.list_models({})}

    def unload_model(self, data: dict) -> dict:
        model_id = self._model_id(data)
        self.engine.models.entry(model_id)
        futures = self.engine.pool.on_every_worker(lambda worker: worker.unload(model_id))
        unloaded = sum(1 for future in futures if future.result(timeout=self.load_timeout_seconds))
        return {"model_id": model_id, "unloaded_from": unloaded}
