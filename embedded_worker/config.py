"""WorkerConfig: everything a host can set, in one pydantic model.

A host builds it from a dict, a JSON file or the `EMBEDDED_WORKER_CONFIG`
environment variable (a JSON object or a path to a JSON file). Defaults run
on a CPU with the built-in model; GPUs, fp16 and bigger batches switch on from
detection and configuration, never by editing code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from .api.field_names import UnknownFields
from .api.messages import Number
from .diffusion.models import BUILTIN_MODELS
from .diffusion.shipped_models import SHAPES_MODEL_ID
from .errors import InvalidRequest

DEFAULT_MODEL_ID = SHAPES_MODEL_ID  # trained here, so it draws what it is asked; tiny-sd's weights are random
CONFIG_ENV_VAR = "EMBEDDED_WORKER_CONFIG"


def default_data_dir() -> Path:
    """The per-user data folder (XDG on Linux, LOCALAPPDATA on Windows)."""
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "embedded_worker"


class Limits(BaseModel):
    """Bounds on what one request may ask for; requests beyond them are refused."""

    model_config = ConfigDict(extra="forbid")

    max_queued_work: StrictInt = Field(1000, ge=1, description="sessions and batch items not yet final")
    max_image_side: StrictInt = Field(2048, ge=8)
    max_steps: StrictInt = Field(150, ge=1)
    max_items: StrictInt = Field(1000, ge=1, description="items of one batch or images of one session")
    max_operations: StrictInt = Field(100, ge=1, description="operations of one coordination (its domains)")
    max_denoising_steps: StrictInt = Field(
        3000, ge=1, description="denoising steps of one session, summed over its operations (20 at max_steps)")
    max_prompt_chars: StrictInt = Field(4000, ge=1)


class Retention(BaseModel):
    """How much finished history the durable store keeps; older sessions and batches are pruned with their files."""

    model_config = ConfigDict(extra="forbid")

    max_finished: StrictInt = Field(1000, ge=1, description="finished sessions plus finished batches")
    max_age_hours: Number = Field(168.0, gt=0)


class SchedulingConfig(BaseModel):
    """Queue policy: one place, like Triton's dynamic batcher."""

    model_config = ConfigDict(extra="forbid")

    aging_per_second: Number = Field(
        0.1, ge=0, description="priority points a waiting task gains per second, so low priority never starves"
    )
    coalesce_wait_ms: Number = Field(
        15.0, ge=0, description="how long an idle device waits for compatible work to start it together"
    )
    max_batch_size: StrictInt = Field(
        8, ge=1, description="images in one denoising forward, before memory says otherwise")
    policy: Literal["fair", "fifo"] = Field(
        "fair", description="order within one priority: fair shares the device between owners (sessions, batches) "
        "by images in flight; fifo takes images in the order their requests came")
    preempt: StrictBool = Field(
        True, description="park less urgent images at a step boundary when more urgent ones wait and the device is "
        "full (and, under fair, an owner far over its share), and size an urgent image's forward by learned cost")
    max_preemptions_per_image: StrictInt = Field(
        2, ge=0, description="how often one image may be preempted; past it, it runs to its end and more urgent "
        "work waits for it (one image of a 12-step run was preempted 7 times)")
    workers_per_device: StrictInt = Field(1, ge=1, le=8)
    torch_threads: StrictInt | None = Field(
        None, ge=1, le=256, description="intra-op threads for each operation of the CPU device workers; none: "
        "torch's default (one per core). 1 with workers_per_device at the core count: each device worker one "
        "core, no thread waiting for another inside each small operation (on 2 loaded cores a 16-item batch ran "
        "7-20x faster so than on one worker with 2 threads; on a quiet machine two single-threaded Ray actors "
        "ran it 51% faster than that one worker)")
    cpu_threads: StrictInt = Field(2, ge=1, le=32, description="postprocessing and encoding pool")


class CheckpointConfig(BaseModel):
    """Durable denoise state (issue 19): each image's state is taken every few steps and at a suspending close,
    so a crash costs at most the steps since its last checkpoint and a suspend none. Durable state only."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = True
    budget: Number = Field(
        0.02, gt=0, le=0.5, description="share of the step time checkpoints may take, measured: the interval "
        "in steps follows from what taking and writing one cost")
    every_steps: StrictInt | None = Field(
        None, ge=1, description="a fixed interval in steps instead of the budget's")


class ClusterConfig(BaseModel):
    """Remote device workers on a Ray cluster (issue 10). No address: no cluster, and Ray is never imported."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        None, description="none: this machine's devices only; 'auto' (RAY_ADDRESS or the head on this machine), "
        "'ray://host:port' (Ray client), 'host:port' (a head's GCS), or 'local': start a private head here as a "
        "subprocess (127.0.0.1), stopped at close")
    actors: StrictInt = Field(1, ge=1, le=256, description="remote device workers, one Ray actor each")
    cpus_per_actor: Number = Field(1.0, ge=0)
    gpus_per_actor: Number = Field(0.0, ge=0, description="0: the actors run on CPU")
    local_devices: StrictBool = Field(True, description="whether this machine's devices also take work")
    in_flight_per_actor: StrictInt = Field(8, ge=1, le=256, description="images handed to one actor at once")
    connect_timeout_s: Number = Field(30.0, gt=0, description="connecting (or starting 'local') fails after this")
    head_check_s: Number = Field(
        2.0, gt=0, le=60, description="how often the head is probed; 3 probes in a row unanswered and it is lost: "
        "the images out on actors go to this machine's devices (or fail as unavailable without them) until it is "
        "back")

    @field_validator("address")
    @classmethod
    def _known_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if value in ("auto", "local"):
            return value
        host, _, port = value.removeprefix("ray://").rpartition(":")
        if host and "/" not in host and port.isdigit() and 0 < int(port) < 65536:
            return value
        raise ValueError(f"unknown cluster address '{value}' (auto, local, ray://host:port, host:port)")


class CompileConfig(BaseModel):
    """The compiled denoiser (`diffusion.compiled_denoiser`). Off by default: on a CPU it needs a C++ compiler
    (g++ or clang; MSVC on Windows) and on CUDA Triton, which a host machine may lack, and its first use of a
    model and size spends about a minute of background CPU per cohort-size bucket (kept in the cache after)."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = Field(
        False, description="denoise through an ahead-of-time compiled denoiser once it is built (in a background "
        "process; the eager denoiser runs until then); on CUDA each cohort-size bucket replays as a CUDA graph")
    cache_dir: Path | None = Field(
        None, description="where compiled denoisers are kept across starts; none: compiled/ beside the state file "
        "(in the user's data folder when state is in memory)")
    lanes: StrictInt | None = Field(
        None, ge=1, le=64, description="on a CPU, over how many lanes at most a compiled forward's rows are "
        "split, run at once, the device worker's intra-op threads shared out between them; none: one per "
        "thread (a lane per row at most); 1: each forward whole on all threads (two one-thread lanes ran the "
        "shapes model's batch of 8 1.16x and its batch of 1 1.61x faster than whole forwards on 2 cores)")


@dataclass(frozen=True)
class DeviceSettings:
    """The part of the configuration the device side is given (`WorkerConfig.device_settings`): which devices,
    at what precision, how many pipelines to keep and how to schedule; nothing about state, outputs, requests
    or the cluster's address, so the device side is built (in a Ray actor too) from these alone."""

    device: str
    dtype: str
    max_loaded_models: int
    gc_freeze: bool
    scheduling: SchedulingConfig
    local_devices: bool = True  # False: only a cluster's actors take work
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    compile_cache_dir: Path | None = None  # where compiled denoisers are kept; None: eager only
    compile_lanes: int | None = None  # CompileConfig.lanes


class WorkerConfig(BaseModel):
    """The worker's whole configuration."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    models: dict[str, str] = Field(
        default_factory=dict, description="model id -> local diffusers folder; the built-in models are always present"
    )
    default_model: str = DEFAULT_MODEL_ID
    max_loaded_models: StrictInt = Field(2, ge=1, description="pipelines one device worker keeps loaded")
    model_cache_dir: Path | None = Field(None, description="where the built-in model is written once")
    workflows_dir: Path | None = None
    state_path: str | None = Field(
        None, description="the SQLite state file; none: state.sqlite3 in the user's data folder; ':memory:' keeps "
        "state in memory (tests)")
    recovery: Literal["requeue", "fail"] = Field(
        "requeue", description="what a restart does with work that was unfinished when the process died")
    retention: Retention = Field(default_factory=Retention)
    output_dir: Path | None = Field(
        None, description="image files with metadata; with a durable state file it defaults to outputs/ beside it")
    allowed_roots: list[Path] = Field(default_factory=list, description="folders a request may name paths inside")
    unknown_request_fields: UnknownFields = Field(
        "refuse", description="a request field or parameter no model takes: refuse it (invalid_request naming it "
        "and what is accepted), or ignore it, listed in the reply's ignored_parameters and warned in the log")
    limits: Limits = Field(default_factory=Limits)
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    checkpoints: CheckpointConfig = Field(default_factory=CheckpointConfig)
    compile: CompileConfig = Field(default_factory=CompileConfig)
    gc_freeze: StrictBool = Field(True, description="freeze collector generations after model load (GIL pauses)")
    board_slots: StrictInt = Field(1024, ge=1, le=1_000_000, description="rows of the progress board")
    log_capacity: StrictInt = Field(10_000, ge=1, description="log records kept for the host to drain")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"unknown device '{value}' (auto, cpu, cuda, cuda:N, mps)")

    @model_validator(mode="after")
    def _default_model_known(self) -> "WorkerConfig":
        if self.default_model not in BUILTIN_MODELS and self.default_model not in self.models:
            raise ValueError(f"default_model '{self.default_model}' is not in models")
        return self

    @property
    def resolved_model_cache_dir(self) -> Path:
        return self.model_cache_dir or default_data_dir() / "models"

    @property
    def resolved_state_path(self) -> str:
        return self.state_path or str(default_data_dir() / "state.sqlite3")

    @property
    def durable(self) -> bool:
        return self.resolved_state_path != ":memory:"

    @property
    def resolved_output_dir(self) -> Path | None:
        if self.output_dir is not None or not self.durable:
            return self.output_dir
        return Path(self.resolved_state_path).parent / "outputs"

    def device_settings(self) -> DeviceSettings:
        """What the device side is given (`diffusion.device_pool.DevicePool`), not the whole configuration."""
        return DeviceSettings(self.device, self.dtype, self.max_loaded_models, self.gc_freeze, self.scheduling,
                              local_devices=self.cluster.address is None or self.cluster.local_devices,
                              checkpoints=self.checkpoints,
                              compile_cache_dir=self.resolved_compile_cache_dir if self.compile.enabled else None,
                              compile_lanes=self.compile.lanes)

    @property
    def resolved_compile_cache_dir(self) -> Path:
        if self.compile.cache_dir is not None:
            return self.compile.cache_dir
        state = default_data_dir() / "state.sqlite3" if not self.durable else Path(self.resolved_state_path)
        return state.parent / "compiled"

    @property
    def raw_pixels_dir(self) -> Path | None:
        """Where outputs' raw pixels are kept for mapping back after a restart (durable state only)."""
        return Path(self.resolved_state_path).parent / "pixels" if self.durable else None

    @classmethod
    def load(cls, source: "WorkerConfig | dict | str | os.PathLike | None" = None) -> "WorkerConfig":
        """From a config, a dict, a JSON file path or JSON text; None reads the environment."""
        if isinstance(source, WorkerConfig):
            return source
        if source is None:
            source = os.environ.get(CONFIG_ENV_VAR)
            if not source:
                return cls()
        if isinstance(source, (str, os.PathLike)):
            source = _read_json_source(str(source))
        try:
            return cls.model_validate(source)
        except ValueError as error:
            raise InvalidRequest(f"invalid worker configuration: {error}") from error


def _read_json_source(text: str) -> Any:
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidRequest(f"invalid worker configuration JSON: {error}") from error
    path = Path(text)
    if not path.is_file():
        raise InvalidRequest(f"worker configuration file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"invalid worker configuration file {path}: {error}") from error
