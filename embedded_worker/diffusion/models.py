"""Where models live and how a device worker loads one.

A model is a local diffusers-format folder of a supported family (its
`model_index.json` names the pipeline class, `families` maps it) or a
built-in model: a tiny recipe built on first use, or the trained shapes
model shipped inside the package (a folder like any other). Loading never
reaches for a hub (`local_files_only`, and the worker sets HF_HUB_OFFLINE)
and takes safetensors only: a folder that holds pickle weights is refused
before anything is unpickled.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidRequest, NotFound, WorkerError
from .offline import quiet_libraries
from .shipped_models import SHIPPED_GUIDANCE, SHIPPED_MODELS
from .tiny_model import CONSTRUCTION_LOCK, TINY_MODELS, ensure_tiny_model, tiny_family, tiny_model_folder

if TYPE_CHECKING:
    from .families.defaults import ModelDefaults

log = logging.getLogger("embedded_worker.models")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
BUILTIN_MODELS = (*TINY_MODELS, *SHIPPED_MODELS)


@dataclass(frozen=True)
class ModelEntry:
    model_id: str
    source: str  # a folder, or the built-in recipe name
    by_request: bool = False  # named by a request's model.load_model (not built in, not configured)

    @property
    def builtin(self) -> bool:
        return self.model_id in BUILTIN_MODELS


class ModelCatalog:
    """Model ids the worker knows, resolved to folders on first use."""

    def __init__(self, configured: dict[str, str], cache_dir: Path):
        self._cache_dir = Path(cache_dir)
        # guards `_entries`, `_folders`, `_defaults` and `_sizes`: `model.load` may add a model while workers read
        self._lock = threading.Lock()
        self._entries = {model_id: ModelEntry(model_id, model_id) for model_id in TINY_MODELS}
        self._entries.update({model_id: ModelEntry(model_id, str(path)) for model_id, path in SHIPPED_MODELS.items()})
        self._entries.update({model_id: ModelEntry(model_id, str(path)) for model_id, path in configured.items()})
        self._folders: dict[str, Path] = {}
        self._defaults: dict[str, ModelDefaults] = {}  # read once per model: every batch item plans with them
        self._sizes: dict[str, tuple[int, int]] = {}  # read once per model: every image's spec starts from it
        self._problems = {model_id: problem for model_id, path in configured.items()
                          if (problem := folder_problem(Path(path))) is not None}
        for model_id, problem in self._problems.items():
            log.warning("configured model '%s' cannot run: %s", model_id, problem)

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entry(self, model_id: str) -> ModelEntry:
        with self._lock:
            if model_id not in self._entries:
                raise NotFound(f"Model '{model_id}' not found")
            return self._entries[model_id]

    def redefinition(self, model_id: str, folder: Path) -> str | None:
        """Why a request may not name `folder` as `model_id` (None when it may): built-in and configured ids
        are the worker's, and an id a request named keeps its folder, so no caller's model changes under
        another's sessions (or under a pipeline a device worker already holds)."""
        with self._lock:
            return self._redefinition(model_id, folder)

    def _redefinition(self, model_id: str, folder: Path) -> str | None:
        entry = self._entries.get(model_id)
        if entry is None or (entry.by_request and entry.source == str(folder)):
            return None
        if not entry.by_request:
            kind = "a built-in" if entry.builtin else "a configured"
            return f"'{model_id}' is {kind} model and cannot be redefined by a request (load it without a path)"
        return f"'{model_id}' already names {entry.source} and cannot be redefined (name the folder another id)"

    def register(self, folders: dict[str, Path]) -> list[str]:
        """Name each folder as its model id, all or none (invalid_request naming the id that cannot be);
        the ids that are new, for `forget`."""
        with self._lock:
            for model_id, folder in folders.items():
                refusal = self._redefinition(model_id, folder)
                if refusal is not None:
                    raise InvalidRequest(f"model_id: {refusal}")
            added = [model_id for model_id in folders if model_id not in self._entries]
            for model_id in added:
                self._entries[model_id] = ModelEntry(model_id, str(folders[model_id]), by_request=True)
            return added

    def forget(self, model_ids: list[str]) -> None:
        """Undo a `register` whose model then failed to load: those ids are unknown again."""
        with self._lock:
            for model_id in model_ids:
                self._entries.pop(model_id, None)
                self._folders.pop(model_id, None)
                self._defaults.pop(model_id, None)
                self._sizes.pop(model_id, None)

    def folder(self, model_id: str) -> Path:
        """The checked folder of `model_id`, building a built-in model on first use."""
        entry = self.entry(model_id)
        with self._lock:
            cached = self._folders.get(model_id)
        if cached is not None:
            return cached
        if model_id in TINY_MODELS:
            folder = ensure_tiny_model(model_id, self._cache_dir)
        else:
            folder = Path(entry.source)
            check_model_folder(folder)
        with self._lock:
            self._folders[model_id] = folder
        return folder

    def family(self, model_id: str) -> str:
        return read_family(self.folder(model_id))

    def problem(self, model_id: str) -> str | None:
        """Why a configured model cannot run, as found at start (its folder missing, or of an unsupported
        family): said in status from the start, not first when a request names it."""
        return self._problems.get(model_id)

    def families(self) -> list[dict]:
        """Every model with its family (None where its folder cannot say) and its problem, for status."""
        return [{"model_id": model_id, "family": self.family_if_known(model_id), "problem": self.problem(model_id)}
                for model_id in self.ids()]

    def family_if_known(self, model_id: str) -> str | None:
        """The family without building or loading anything, for status; None where the folder cannot say."""
        if model_id in TINY_MODELS:
            return tiny_family(model_id)
        try:
            return read_family(Path(self.entry(model_id).source))
        except (OSError, ValueError, WorkerError):
            return None

    def defaults_if_known(self, model_id: str) -> ModelDefaults | None:
        """The model's defaults without building anything, for status; None for a tiny model not built yet
        or a folder that cannot say."""
        folder = tiny_model_folder(model_id, self._cache_dir) if model_id in TINY_MODELS else None
        if folder is not None and not (folder / "model_index.json").is_file():
            return None
        try:
            return self.defaults(model_id)
        except (OSError, ValueError, WorkerError):
            return None

    def native_size(self, model_id: str) -> tuple[int, int]:
        """Read from the folder's configs once: the lifecycle loop asks for every image it launches, and the
        reads (two to three JSON files) held the GIL the device thread steps with."""
        with self._lock:
            cached = self._sizes.get(model_id)
        if cached is not None:
            return cached
        size = native_size(self.folder(model_id))
        with self._lock:
            self._sizes[model_id] = size
        return size

    def defaults(self, model_id: str) -> ModelDefaults:
        """What a request that leaves steps, guidance or size empty gets on `model_id` (may build it)."""
        with self._lock:
            cached = self._defaults.get(model_id)
        if cached is not None:
            return cached
        defaults = model_defaults(self.folder(model_id))
        if model_id in SHIPPED_GUIDANCE:
            defaults = replace(defaults, guidance_scale=SHIPPED_GUIDANCE[model_id])
        with self._lock:
            self._defaults[model_id] = defaults
        return defaults

    def weight_bytes(self, model_id: str) -> int:
        """Bytes of safetensors weights: what one loaded copy costs, near enough, at float32."""
        return sum(p.stat().st_size for p in self.folder(model_id).rglob("*.safetensors"))


def read_family(folder: Path) -> str:
    """The family of a model folder, from the pipeline class its model_index.json names."""
    from .families import PIPELINE_FAMILIES  # torch: imported when a folder is first read, not at the start

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidRequest(f"model folder {folder}: model_index.json cannot be read ({error})") from None
    class_name = index.get("_class_name", "") if isinstance(index, dict) else ""
    if class_name not in PIPELINE_FAMILIES:
        raise InvalidRequest(f"model folder {folder}: pipeline class '{class_name}' is not supported "
                             f"(supported: {', '.join(sorted(PIPELINE_FAMILIES))})")
    return PIPELINE_FAMILIES[class_name]


def folder_problem(folder: Path) -> str | None:
    """Why `folder` cannot be loaded (`check_model_folder`), or None."""
    try:
        check_model_folder(folder)
    except WorkerError as error:
        return error.message
    return None


def check_model_folder(folder: Path) -> None:
    """Refuse what we cannot load safely: no folder, no index, or pickle weights."""
    if not folder.is_dir():
        raise NotFound(f"model folder not found: {folder}")
    if not (folder / "model_index.json").is_file():
        raise InvalidRequest(f"model folder {folder} has no model_index.json (diffusers format expected)")
    family = read_family(folder)
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    for name, spec in sorted(index.items()):  # "name": [library, class], or [null, null] for none
        if not name.startswith("_") and isinstance(spec, list) and spec[-1] is not None \
                and not (folder / name).is_dir():
            raise InvalidRequest(f"model folder {folder}: component '{name}' ({spec[-1]}) that model_index.json "
                                 f"names is missing (a {family} model needs it)")
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        names = [p.name for p in component.iterdir() if p.is_file()]
        pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        has_safetensors = any(n.endswith(".safetensors") for n in names)
        if pickled and not has_safetensors:
            raise InvalidRequest(
                f"model folder {folder}: '{component.name}' holds only pickle weights ({pickled[0]}); "
                "only safetensors are loaded"
            )


def load_pipeline(folder: Path, device, dtype):
    """A pipeline on `device` in `dtype`, loaded offline from safetensors."""
    from diffusers import DiffusionPipeline

    quiet_libraries()
    # SD folders may carry a safety checker; the service filters content itself, so it is not loaded
    skip = {"safety_checker": None, "requires_safety_checker": False} if read_family(folder) == "sd" else {}
    with CONSTRUCTION_LOCK:  # loading turns weight initialisation off process-wide (see CONSTRUCTION_LOCK)
        pipe = DiffusionPipeline.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, dtype=dtype, **skip
        )
    check_weights_cover_configs(pipe, folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    modules = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    for module in (getattr(pipe, name, None) for name in modules):
        if module is not None:
            module.eval().requires_grad_(False)
    return pipe


def model_defaults(folder: Path) -> ModelDefaults:
    """The model's own steps, guidance, size and T5 length, read from its configs without loading weights."""
    from .families import ADAPTERS

    return ADAPTERS[read_family(folder)].defaults(folder)


def check_weights_cover_configs(pipe, folder: Path) -> None:
    """Refuse a denoiser or VAE whose config asks for parameters its weights do not hold: diffusers loads
    it anyway, the missing ones freshly initialised, and the model draws noise without a word. (Weights
    of another shape fail the load by themselves, naming the parameter.)"""
    from diffusers import ModelMixin
    from safetensors import safe_open

    for name, module in pipe.components.items():
        if not isinstance(module, ModelMixin):
            continue
        saved: set[str] = set()
        for weights in (folder / name).glob("*.safetensors"):
            with safe_open(weights, "pt") as handle:
                saved.update(handle.keys())
        missing = sorted(set(module.state_dict()) - saved)
        if missing:
            raise InvalidRequest(f"model folder {folder}: '{name}' has no weights for {len(missing)} of the "
                                 f"parameters its config.json asks for (first: {missing[0]}); the config does "
                                 f"not match the weights")


def native_size(folder: Path) -> tuple[int, int]:
    """(width, height) the model was trained at, read from its configs without loading weights."""
    from .families import ADAPTERS

    return ADAPTERS[read_family(folder)].native_size(folder)
