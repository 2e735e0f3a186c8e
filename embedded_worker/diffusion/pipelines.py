"""PipelineCache: the pipelines and encoded prompts one device worker holds, touched from its thread only.

Pipelines are not thread-safe, so each worker loads its own and keeps at
most `max_loaded_models`, least recently used evicted. Encoded prompts are
cached per model and size: a batch of one prompt encodes it once.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from ..errors import ResourceExhausted, Unavailable, WorkerError, is_out_of_memory
from .denoise import encode_prompt
from .models import load_pipeline

if TYPE_CHECKING:
    from .conditioning import Conditioning
    from .memory import BatchSizer
    from .models import ModelCatalog

log = logging.getLogger("embedded_worker.device")
PROMPT_CACHE_SIZE = 64


class PipelineCache:
    def __init__(self, catalog: ModelCatalog, device: torch.device, dtype: torch.dtype, max_loaded: int,
                 gc_freeze: bool, sizer: BatchSizer, worker_name: str):
        self.catalog = catalog
        self.device = device
        self.dtype = dtype
        self.max_loaded = max_loaded
        self.gc_freeze = gc_freeze
        self.sizer = sizer  # what it learned about forward sizes is forgotten when a model leaves
        self.worker_name = worker_name  # for the log
        self._pipes: OrderedDict[str, tuple] = OrderedDict()  # model id -> (pipe, family)
        self._prompts: OrderedDict[tuple, Conditioning] = OrderedDict()
        self.loading: str | None = None  # the model being loaded now; read by status calls
        self.load_errors: dict[str, str] = {}  # model id -> why its last load failed
        self.unloaded: list = []  # called with each model id that leaves (what was made for it goes too)

    def loaded(self) -> list[str]:
        return list(self._pipes)

    def get(self, model_id: str) -> tuple:
        """(pipe, family) for `model_id`, loading it here, least recently used evicted."""
        if model_id in self._pipes:
            self._pipes.move_to_end(model_id)
            return self._pipes[model_id]
        while len(self._pipes) >= self.max_loaded:
            self.unload(next(iter(self._pipes)))
        folder = self.catalog.folder(model_id)
        started = time.perf_counter()
        self.loading = model_id
        try:
            pipe = load_pipeline(folder, self.device, self.dtype)
        except Exception as error:
            failure: WorkerError = (
                error if isinstance(error, WorkerError) else  # the folder refused for what it holds
                ResourceExhausted(f"model '{model_id}' does not fit in {self.device} memory")
                if is_out_of_memory(error) else
                Unavailable(f"model '{model_id}' could not be loaded from {folder}: {type(error).__name__}: {error}"))
            self.load_errors[model_id] = failure.message
            raise failure from error
        finally:
            self.loading = None
        self._pipes[model_id] = (pipe, self.catalog.family(model_id))
        self.load_errors.pop(model_id, None)
        log.info("%s loaded %s in %.2f s", self.worker_name, model_id, time.perf_counter() - started)
        if self.gc_freeze:
            gc.collect()
            gc.freeze()  # a full collection over the model's objects held the GIL ~200 ms
        return self._pipes[model_id]

    def unload(self, model_id: str) -> bool:
        if self._pipes.pop(model_id, None) is None:
            return False
        self._prompts = OrderedDict((k, v) for k, v in self._prompts.items() if k[0] != model_id)
        gc.unfreeze()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.sizer.forget()
        for forget in self.unloaded:
            forget(model_id)
        return True

    def conditioning(self, pipe, spec) -> Conditioning:
        key = (spec.model_id, spec.prompt, spec.negative_prompt, spec.uses_guidance, spec.height, spec.width)
        if key in self._prompts:
            self._prompts.move_to_end(key)
            return self._prompts[key]
        encoded = encode_prompt(pipe, spec)
        self._prompts[key] = encoded
        if len(self._prompts) > PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return encoded

    def clear(self) -> None:
        self._pipes.clear()
        self._prompts.clear()
