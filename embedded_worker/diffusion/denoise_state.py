"""DenoiseState: one image's denoising at a step boundary, as a value that outlives its process.

Design notes
- What an image needs to continue at step k, and nothing the model folder or
  the request already says: its latents, the per-image state of its
  scheduler (multistep solvers keep a history of model outputs), its
  generator, the step index and a fingerprint of the spec it runs. The
  prompt's conditioning is encoded again on restore: an image's prompt is
  always encoded alone (`denoise.encode_prompt`), so the rows are the same.
- The scheduler's state is every attribute a fresh instance of the same
  class does not already hold equal: tensors (latent-shaped ones sliced to
  the image's row, as `Cohort.split_off` slices them), lists of tensors,
  arrays and plain values. Any other kind and the state is not taken
  (`NotCapturable`): that image then restarts as it would without
  checkpoints.
- Bytes are safetensors (data, never code: no pickle) with the rest as JSON
  in its metadata, a format version and a SHA-256 over both. Reading checks
  all of it: a torn, altered or newer-format state is refused with why
  (`StateRefused`), never half used.
- Restored, the image forms a cohort of its own at its step; it shares
  forwards with whatever runs beside it, like a resumed paused image.
"""

from __future__ import annotations

import hashlib
import json
import struct
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .denoise import Cohort
from .families import adapter_for
from .schedulers import make_scheduler

if TYPE_CHECKING:
    from .conditioning import Conditioning
    from .image_spec import ImageSpec

FORMAT_VERSION = 1
_fingerprints: "weakref.WeakKeyDictionary[ImageSpec, str]" = weakref.WeakKeyDictionary()


class StateRefused(ValueError):
    """A state that must not be used: torn, altered, of a newer format or of another spec."""


class NotCapturable(ValueError):
    """A scheduler holds state of a kind this format does not carry."""


def fingerprint(spec: ImageSpec) -> str:
    """What decides the image's pixels, hashed: a state resumes only the spec it was taken from."""
    known = _fingerprints.get(spec)
    if known is not None:
        return known
    digest = hashlib.sha256(json.dumps([spec.model_id, spec.prompt, spec.negative_prompt, spec.seed, spec.steps,
                                        spec.guidance_scale, spec.width, spec.height, spec.scheduler,
                                        spec.strength]).encode())
    if spec.init_image is not None:
        digest.update(str(spec.init_image.shape).encode())
        digest.update(np.ascontiguousarray(spec.init_image).data)
    _fingerprints[spec] = value = digest.hexdigest()
    return value


@dataclass
class DenoiseState:
    fingerprint: str
    step_index: int
    total_steps: int
    scheduler_class: str
    tensors: dict[str, torch.Tensor]  # on the CPU: latents, timesteps, generator, scheduler/<name>[/<i>]
    scheduler_values: dict  # attribute -> {"value": v} | {"tensor": key} | {"array": key} | {"list": [...]}
    on_device: list[str]  # the tensors that lived on the image's device (the rest on the CPU)
    # steps until the image's next checkpoint when this one was taken: a process that died after writing it had
    # computed at most that many more (0: taken where the image stopped, by a pause or a suspend)
    interval: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    # ---- bytes -------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        header = json.dumps({"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                             "step_index": self.step_index, "total_steps": self.total_steps,
                             "scheduler_class": self.scheduler_class, "scheduler": self.scheduler_values,
                             "on_device": self.on_device, "interval": self.interval}, sort_keys=True)
        return save_tensors(self.tensors, metadata={"state": header, "sha256": _checksum(header, self.tensors)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "DenoiseState":
        """The state `data` holds; StateRefused, with the reason, for anything that is not a whole, unaltered
        state of a format this version reads."""
        metadata = _safetensors_metadata(data)
        try:
            header = json.loads(metadata["state"])
            version = header["format_version"]
        except (KeyError, TypeError, ValueError) as error:
            raise StateRefused(f"not a denoise state ({type(error).__name__}: {error})") from None
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StateRefused(f"format version {version!r}; this worker reads versions up to {FORMAT_VERSION}")
        try:
            tensors = load_tensors(data)
        except Exception as error:  # safetensors' own error: a torn or damaged file
            raise StateRefused(f"the tensors cannot be read ({error})") from None
        if metadata.get("sha256") != _checksum(metadata["state"], tensors):
            raise StateRefused("the checksum does not match: the state was altered or torn")
        return cls(header["fingerprint"], header["step_index"], header["total_steps"], header["scheduler_class"],
                   tensors, header["scheduler"], header["on_device"], header.get("interval", 0))

    # ---- a cohort's members in, a cohort out -----------------------------------------------------

    @classmethod
    def capture(cls, cohort: Cohort, interval: int = 0) -> list["DenoiseState"]:
        """Each member's state now, copied to the CPU (the cohort goes on stepping meanwhile); `interval`: the
        steps until its next one (0: the image stops here)."""
        scheduler = cohort.scheduler
        reference = _reference(cohort)
        rank, size = cohort.latents.ndim, cohort.size
        states = []
        for row, spec in enumerate(cohort.specs):
            tensors: dict[str, torch.Tensor] = {}
            on_device: list[str] = []

            def keep(key: str, value: torch.Tensor, per_image: bool = False) -> dict:
                if per_image and value.ndim == rank and value.shape[0] == size:
                    value = value[row : row + 1]
                if value.device.type != "cpu":
                    on_device.append(key)
                tensors[key] = _dense_copy(value)
                return {"tensor": key}

            keep("latents", cohort.latents, per_image=True)
            keep("timesteps", cohort.timesteps)
            tensors["generator"] = cohort.generators[row].get_state()
            values = {}
            for name, value in vars(scheduler).items():
                if name == "_internal_dict" or _same(value, reference.get(name, _MISSING)):
                    continue
                values[name] = _describe(f"scheduler/{name}", value, keep)
            states.append(cls(fingerprint(spec), cohort.step_index, cohort.total_steps, type(scheduler).__name__,
                              tensors, values, on_device, interval))
        return states

    def restore(self, pipe, member, spec: ImageSpec, conditioning: Conditioning, device: torch.device) -> Cohort:
        """A cohort of one (`member`, running `spec`) at this state's step; StateRefused when the state is not
        `spec`'s or the model's scheduler is another class."""
        if self.fingerprint != fingerprint(spec):
            raise StateRefused("the state was taken from another request (its spec differs)")
        scheduler = make_scheduler(pipe, spec.scheduler)
        if type(scheduler).__name__ != self.scheduler_class:
            raise StateRefused(f"the state's scheduler is {self.scheduler_class}, the model's "
                               f"{type(scheduler).__name__}")

        def tensor(key: str) -> torch.Tensor:
            value = self.tensors[key]
            return value.to(device) if key in self.on_device else value.clone()

        for name, described in self.scheduler_values.items():
            setattr(scheduler, name, _rebuild(described, tensor))
        generator = torch.Generator("cpu")
        generator.set_state(self.tensors["generator"])
        cohort = Cohort(adapter_for(pipe), [member], [spec], scheduler, tensor("timesteps"), tensor("latents"),
                        conditioning, [generator])
        cohort.step_index = cohort.checkpointed_at = self.step_index
        return cohort


_MISSING = object()
_references: "weakref.WeakKeyDictionary[Cohort, dict]" = weakref.WeakKeyDictionary()


def _reference(cohort: Cohort) -> dict:
    """A fresh scheduler's attributes (same class, same config): what a state need not carry. Once per cohort."""
    known = _references.get(cohort)
    if known is None:
        scheduler = cohort.scheduler
        _references[cohort] = known = dict(vars(type(scheduler).from_config(scheduler.config)))
    return known


def _same(value, reference) -> bool:
    if reference is _MISSING or type(value) is not type(reference):
        return False
    if torch.is_tensor(value):
        return value.shape == reference.shape and value.dtype == reference.dtype and \
            value.device == reference.device and torch.equal(value, reference)
    if isinstance(value, np.ndarray):
        return value.shape == reference.shape and bool(np.array_equal(value, reference))
    if isinstance(value, (int, float, bool, str, type(None))):
        return value == reference
    return False


def _describe(key: str, value, keep) -> dict:
    if torch.is_tensor(value):
        return keep(key, value, per_image=True)
    if isinstance(value, np.ndarray):
        return {"array": keep(key, torch.from_numpy(np.ascontiguousarray(value)))["tensor"]}
    if isinstance(value, list):
        return {"list": [_describe(f"{key}/{i}", v, keep) for i, v in enumerate(value)]}
    if isinstance(value, (int, float, bool, str, type(None))):
        return {"value": value}
    raise NotCapturable(f"scheduler attribute {key.split('/', 1)[1]!r} holds a {type(value).__name__}")


def _rebuild(described: dict, tensor):
    if "tensor" in described:
        return tensor(described["tensor"])
    if "array" in described:
        return tensor(described["array"]).numpy()
    if "list" in described:
        return [_rebuild(d, tensor) for d in described["list"]]
    return described["value"]


def _dense_copy(value: torch.Tensor) -> torch.Tensor:
    """A CPU copy with plain strides (an expanded tensor's stride 0 survives `contiguous` at size 1)."""
    return torch.empty(value.shape, dtype=value.dtype).copy_(value.detach())


def _checksum(header: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(header.encode())
    for key in sorted(tensors):
        value = tensors[key]
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _safetensors_metadata(data: bytes) -> dict:
    """The `__metadata__` of safetensors bytes (an 8-byte length, then the JSON header)."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        if length > len(data) - 8:
            raise ValueError("the header is longer than the data (torn)")
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__")
    except (struct.error, ValueError, AttributeError) as error:
        raise StateRefused(f"not a denoise state ({error})") from None
    if not isinstance(metadata, dict):
        raise StateRefused("not a denoise state (no metadata)")
    return metadata
