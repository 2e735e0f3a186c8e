"""The protocol's requests as pydantic models, and the envelopes replies travel in.

Field names are the ones the C# ServiceProcessing client sends
(`../shared/protocol.md`), also camelCase; a name nothing takes is refused
or, by configuration, ignored and reported (`field_names`). Validation
failures become `invalid_request` envelopes naming the field.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import InvalidRequest, WorkerError
from .field_names import M, ProtocolModel, accepted_names, validate

# What one request may be, checked before any model sees it: deeper nesting overflows the
# interpreter's stack, and a huge request would be kept alive by whatever logs it.
MAX_REQUEST_DEPTH = 32
MAX_REQUEST_VALUES = 100_000
MAX_REQUEST_CHARS = 4_000_000

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _printable(value: str) -> str:
    """Ids are stored and logged: control characters and lone surrogates (not UTF-8) are refused."""
    bad = _UNPRINTABLE.search(value)
    if bad is not None:
        raise ValueError(f"must not contain control characters (U+{ord(bad.group()):04X})")
    return value


def _default_when_none(default: Any):
    return BeforeValidator(lambda value: default if value is None else value)


Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), AfterValidator(_printable)]
Priority = Annotated[StrictInt, Field(ge=1, le=10), _default_when_none(5)]  # null: the protocol's default


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]  # finite: replies are JSON
MAX_SEED = 2**63 - 1  # seeds are stored as SQLite's signed 64-bit integers

SESSION_VERBS = ("pause", "resume", "cancel", "restart")
DOMAINS = ("device", "model", "inference", "postprocessing")  # every routed domain; each can be a coordination step
Domain = Literal[DOMAINS]  # type: ignore[valid-type]
BATCH_VERBS = ("pause", "resume", "cancel", "retry")


class Request(ProtocolModel):
    action: str | None = None


def _none_as_empty(value: Any) -> Any:
    return {} if value is None else value


class WorkflowRequest(Request):
    workflow_id: Id


class DomainOperation(ProtocolModel):
    """One operation of an inline coordination request."""

    domain: Annotated[Domain, BeforeValidator(lambda value: value.strip().lower() if isinstance(value, str) else value)]
    operation: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1)]
    parameters: dict[str, Any] = Field(default_factory=dict)

    _empty = field_validator("parameters", mode="before")(_none_as_empty)


class ExecuteWorkflowRequest(Request):
    session_id: Id | None = None
    workflow_id: Id | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = 5
    background: StrictBool = True
    coordination_id: Id | None = None
    domains: list[DomainOperation] | None = None
    coordination_mode: Literal["sequential", "parallel"] = "sequential"

    _empty = field_validator("parameters", mode="before")(_none_as_empty)

    @model_validator(mode="after")
    def _names_work(self) -> "ExecuteWorkflowRequest":
        if self.domains is not None and not self.domains:
            raise ValueError("domains: must list at least one operation")
        if self.workflow_id is None and self.domains is None:
            raise ValueError("workflow_id: required (or an inline coordination with domains)")
        return self


class SessionRequest(Request):
    session_id: Id


class ControlSessionRequest(SessionRequest):
    action: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True)]
    parameters: dict[str, Any] = Field(default_factory=dict, description="null or empty: no verb takes any")

    _empty = field_validator("parameters", mode="before")(_none_as_empty)

    @field_validator("parameters")
    @classmethod
    def _none_taken(cls, value: dict[str, Any]) -> dict[str, Any]:
        """A restart runs again the request the session was accepted with, as stored (recovery runs it too):
        parameters given here would be dropped, so they are refused."""
        if value:
            raise ValueError(f"no control takes parameters, got {', '.join(map(str, value))}: a restart runs the "
                             "session's own request again; submit a new session to change them")
        return value

    @field_validator("action")
    @classmethod
    def _verb(cls, value: str) -> str:
        if value not in SESSION_VERBS:
            raise ValueError(f"must be one of {', '.join(SESSION_VERBS)}, got '{value}'")
        return value


class FilesChoice(ProtocolModel):
    """A delete frees the work's pixels; its image files stay when the caller says so, either way."""

    force_cleanup: StrictBool = Field(True, description="false: the image files stay")
    keep_files: StrictBool = Field(False, description="true: the image files stay")

    @property
    def delete_files(self) -> bool:
        return self.force_cleanup and not self.keep_files


class DeleteSessionRequest(SessionRequest, FilesChoice):
    pass


class BatchConfiguration(ProtocolModel):
    total_images: StrictInt = Field(1, ge=1)
    preferred_batch_size: StrictInt = Field(4, ge=1)
    min_batch_size: StrictInt = Field(1, ge=1)
    max_batch_size: StrictInt = Field(8, ge=1)
    enable_dynamic_sizing: StrictBool = True
    memory_threshold: Number = Field(0.8, gt=0, le=1)
    parallel_processing: StrictBool = False
    max_parallel_batches: StrictInt = Field(1, ge=1, le=8)

    @model_validator(mode="after")
    def _ordered(self) -> "BatchConfiguration":
        if self.min_batch_size > self.max_batch_size:
            raise ValueError("min_batch_size: must not exceed max_batch_size")
        self.preferred_batch_size = min(max(self.preferred_batch_size, self.min_batch_size), self.max_batch_size)
        return self


# execute_batch's name -> the inference domain's name for the same part of a batch request
BATCH_NAMES = {"configuration": "batch_config", "parameters": "generation_params"}


def one_batch_count(data: Any) -> Any:
    """A batch request's image count, wherever it is given: `configuration` (`batch_config`) or `parameters`
    (`generation_params`) `.total_images`. Two counts that disagree are refused, naming both fields; a count
    given only in the parameters is copied into the configuration, so both say the same from here on."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for name, other in BATCH_NAMES.items():
        if name in data and other in data and data[name] != data[other]:
            raise ValueError(f"{name} and {other}: two names for the same thing, give one")
    config = next((n for n in ("configuration", "batch_config") if isinstance(data.get(n), dict)), None)
    params = next((n for n in ("parameters", "generation_params") if isinstance(data.get(n), dict)), None)
    counts = {f"{part}.total_images": data[part]["total_images"]
              for part in (config, params) if part is not None and "total_images" in data[part]}
    if len(counts) == 2 and len(set(map(repr, counts.values()))) == 2:
        (first, a), (second, b) = counts.items()
        raise ValueError(f"{first} ({a!r}) and {second} ({b!r}) disagree: give one image count")
    count = data[params].get("total_images") if params is not None else None
    target = config or ("batch_config" if "batch_config" in data else "configuration")
    if count is not None and (config is not None or data.get(target) is None):  # the model then checks it
        data[target] = {**(data.get(target) or {}), "total_images": count}
    return data


class BatchItem(ProtocolModel):
    item_id: Id | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    _empty = field_validator("parameters", mode="before")(_none_as_empty)


class ExecuteBatchRequest(Request):
    batch_id: Id | None = None
    workflow_id: Id = "img-generation-basic"
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       validation_alias=AliasChoices("parameters", "generation_params"))
    items: list[BatchItem] | None = None
    name: str | None = None
    configuration: BatchConfiguration | None = Field(None, validation_alias=AliasChoices("configuration",
                                                                                         "batch_config"))
    priority: Priority = 5
    background: StrictBool = True

    _empty = field_validator("parameters", mode="before")(_none_as_empty)
    _one_count = model_validator(mode="before")(classmethod(lambda cls, data: one_batch_count(data)))

    @field_validator("items")
    @classmethod
    def _some_items(cls, value: list[BatchItem] | None) -> list[BatchItem] | None:
        if value is not None and not value:
            raise ValueError("must list at least one item (or leave items out and set total_images)")
        return value


class BatchRequest(Request):
    batch_id: Id
    include_items: StrictBool = False


class ControlBatchRequest(BatchRequest):
    action: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True)]

    @field_validator("action")
    @classmethod
    def _verb(cls, value: str) -> str:
        if value not in BATCH_VERBS:
            raise ValueError(f"must be one of {', '.join(BATCH_VERBS)}, got '{value}'")
        return value


class DeleteBatchRequest(BatchRequest, FilesChoice):
    pass


class OutputRequest(Request):
    output_id: Id


class InputRequest(Request):
    input_id: Id


class ListSessionsRequest(Request):
    status: str | None = None
    limit: StrictInt = Field(100, ge=1, le=10000)


class DomainStatusRequest(Request):
    """get_status, of one domain or of all: with a session_id or a batch_id, that work's part in each domain
    (the C# side aggregates them into its session); without, the generic status."""

    session_id: Id | None = None
    batch_id: Id | None = None
    domains: list[Annotated[Literal[(*DOMAINS, "processing")],  # type: ignore[valid-type]
                            BeforeValidator(lambda value: value.strip().lower() if isinstance(value, str) else value)]
                  ] | None = None

    @model_validator(mode="after")
    def _one_work(self) -> "DomainStatusRequest":
        if self.session_id is not None and self.batch_id is not None:
            raise ValueError("session_id and batch_id: name one piece of work")
        return self


class RecommendBatchSizeRequest(Request):
    """inference.recommend_batch_size: the batch size the memory monitor would pick now for this kind of image."""

    model: Id | None = Field(None, validation_alias=AliasChoices("model", "model_id"))
    width: StrictInt | None = Field(None, ge=8, description="none: the model's native size")
    height: StrictInt | None = Field(None, ge=8)
    guidance_scale: Number | None = Field(None, ge=0, le=50, description="none: the model's own")
    guidance: StrictBool | None = Field(None, description="the guidance mode itself; none: guidance_scale > 1")
    min_batch_size: StrictInt = Field(1, ge=1)
    memory_threshold: Number | None = Field(None, gt=0, le=1, description="none: the worker's own")


class BatchMetricsRequest(Request):
    """inference.get_metrics: the batch manager's figures across batches, or for one."""

    batch_id: Id | None = None


def describe_errors(error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None,
                    also_accepted: tuple[str, ...] = ()) -> tuple[str, list[dict]]:
    """'field: problem' for each error, the way the envelope reports them; an unknown field with the names
    accepted where it stands (at the top, with `also_accepted`: names the caller took out before)."""
    problems = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        field = prefix + location if location else prefix.rstrip(".")
        problem = {"field": field, "message": message}
        accepted = accepted_names(model, item["loc"][:-1]) if item["type"] == "extra_forbidden" and model else None
        if accepted is not None:
            accepted += list(also_accepted) if len(item["loc"]) == 1 else []
            problem["message"] = f"unknown field (accepted here: {', '.join(accepted) or 'none'})"
            problem["accepted"] = accepted
        problems.append(problem)
    text = "; ".join(f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems)
    return text, problems


def parse(model: type[M], data: Any, prefix: str = "", context: dict | None = None,
          also_accepted: tuple[str, ...] = ()) -> M:
    """Validate `data` as `model`, or raise InvalidRequest that names every bad field; a name nothing takes
    among them, unless the call's policy ignores it (`field_names`)."""
    if isinstance(data, model):
        return data
    if isinstance(data, BaseModel):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise InvalidRequest(f"request must be a JSON object, got {type(data).__name__}")
    try:
        return validate(model, data, prefix, context)
    except ValidationError as error:
        text, problems = describe_errors(error, prefix, model, also_accepted)
        raise InvalidRequest(text, details=problems) from None


_ID = TypeAdapter(Id)


def parse_id(value: Any, field: str) -> str:
    """A bare id, validated as the request models validate their ids."""
    try:
        return _ID.validate_python(value)
    except ValidationError as error:
        text, problems = describe_errors(error, prefix=field)
        raise InvalidRequest(text, details=problems) from None


def check_shape(request: Any) -> None:
    """Refuse, before any model sees it, a request nested deeper than MAX_REQUEST_DEPTH, larger than
    MAX_REQUEST_VALUES values or MAX_REQUEST_CHARS characters, or holding a number JSON cannot carry."""
    values = chars = 0
    stack: list[tuple[Any, int, str]] = [(request, 0, "")]
    while stack:
        value, depth, path = stack.pop()
        values += 1
        if isinstance(value, dict):
            children = [(f"{path}.{key}" if path else str(key), item) for key, item in value.items()]
            chars += sum(len(key) for key in value if isinstance(key, str))
        elif isinstance(value, (list, tuple)):
            children = [(f"{path}.{index}" if path else str(index), item) for index, item in enumerate(value)]
        else:
            if isinstance(value, str):
                chars += len(value)
            elif isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequest(f"{path or 'request'}: must be a finite number, got {value}")
            children = []
        if children and depth >= MAX_REQUEST_DEPTH:
            raise InvalidRequest(f"{path}: nested deeper than {MAX_REQUEST_DEPTH} levels")
        stack.extend((item, depth + 1, child_path) for child_path, item in children)
        if values > MAX_REQUEST_VALUES or chars > MAX_REQUEST_CHARS:
            raise InvalidRequest(f"request: larger than {MAX_REQUEST_VALUES} values or {MAX_REQUEST_CHARS} "
                                 "characters")


def ok(**fields: Any) -> dict:
    return {"success": True, **fields}


def failure(error: WorkerError) -> dict:
    envelope = {"success": False, "error": error.message, "error_code": error.code}
    if error.details is not None:
        envelope["details"] = error.details
    return envelope


@functools.lru_cache(maxsize=8192)  # status polls format the same few stamps over and over
def iso(timestamp: float | None) -> str | None:
    """ISO-8601 UTC, the only way a time crosses the boundary."""
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, tz=dt.timezone.utc).isoformat().replace("+00:00", "Z")
