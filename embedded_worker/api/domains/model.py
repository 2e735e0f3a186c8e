"""model.*: which models exist, which are loaded where; load and unload them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...workflows.operations import ModelParams
from .. import device_answers, domain_status
from ..messages import DomainStatusRequest, Request, parse

if TYPE_CHECKING:
    from ...engine import Engine


class ModelRequest(ModelParams):
    """model.load_model / unload_model asked directly: the operation's parameters, and the `action` every
    request may carry."""

    action: str | None = None


class ModelInstructor:
    commands = ("get_status", "list_models", "load_model", "unload_model")

    def __init__(self, engine: Engine):
        self.engine = engine

    def list_models(self, data: dict) -> dict:
        parse(Request, data)
        loaded = device_answers.loaded_models(self.engine.pool)
        models = []
        for model_id in self.engine.models.ids():
            entry = self.engine.models.entry(model_id)
            defaults = self.engine.models.defaults_if_known(model_id)
            models.append({"model_id": model_id, "family": self.engine.models.family_if_known(model_id),
                           "defaults": defaults.describe() if defaults is not None else None,
                           "builtin": entry.builtin,
                           "source": "built-in recipe" if entry.builtin else entry.source,
                           "loaded_on": loaded.get(model_id, []),
                           "default": model_id == self.engine.config.default_model,
                           "problem": self.engine.models.problem(model_id)})
        return {"models": models}

    def get_status(self, data: dict) -> dict:
        """Every model; with a session_id or batch_id, the models that work uses and where they are."""
        work = domain_status.find_work(self.engine, parse(DomainStatusRequest, data))
        if work is not None:
            return domain_status.domain_part(self.engine, "model", work)
        return self.list_models({})

    def load_model(self, data: dict) -> dict:
        params = parse(ModelRequest, data)
        named: dict[str, Path] = {}
        self.engine.planner.prepare_model(params, "", named)  # checks the id and the folder (safetensors only)
        added = self.engine.models.register(named)
        try:
            answer = device_answers.load_model(self.engine.pool, params.model_id)
        except Exception:
            self.engine.models.forget(added)  # a model that failed to load is not left registered
            raise
        return {**answer, **self.list_models({})}

    def unload_model(self, data: dict) -> dict:
        params = parse(ModelRequest, data)
        self.engine.models.entry(params.model_id)
        return device_answers.unload_model(self.engine.pool, params.model_id)
