"""The protocol's requests as pydantic models, and the envelopes replies travel in.

Field names are the ones the C# ServiceProcessing client sends
(`../shared/protocol.md`); unknown fields are tolerated, because the client
adds its own (`action`, timestamps) and a newer client may add more.
Validation failures become `invalid_request` envelopes naming the field.
"""

from __future__ import annotations

import datetime as dt
import functools
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InvalidRequest, WorkerError

Id = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Priority = Annotated[int, Field(ge=1, le=10)]

SESSION_VERBS = ("pause", "resume", "cancel", "restart")
BATCH_VERBS = ("pause", "resume", "cancel", "retry")


class Request(BaseModel):
    model_config = ConfigDict(extra="allow", str_strip_whitespace=False)

    action: str | None = None


def _none_as_empty(value: Any) -> Any:
    return {} if value is None else value


class WorkflowRequest(Request):
    workflow_id: Id


class DomainOperation(BaseModel):
    """One operation of an inline coordination request."""

    model_config = ConfigDict(extra="allow")

    domain: Literal["inference", "postprocessing"]
    operation: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1)]
    parameters: dict[str, Any] = Field(default_factory=dict)

    _empty = field_validator("parameters", mode="before")(_none_as_empty)


class ExecuteWorkflowRequest(Request):
    session_id: Id | None = None
    workflow_id: Id | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = 5
    background: bool = True
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
    parameters: dict[str, Any] = Field(default_factory=dict)

    _empty = field_validator("parameters", mode="before")(_none_as_empty)

    @field_validator("action")
    @classmethod
    def _verb(cls, value: str) -> str:
        if value not in SESSION_VERBS:
            raise ValueError(f"must be one of {', '.join(SESSION_VERBS)}, got '{value}'")
        return value


class DeleteSessionRequest(SessionRequest):
    force_cleanup: bool = True


class BatchConfiguration(BaseModel):
    model_config = ConfigDict(extra="allow")

    total_images: int = Field(1, ge=1)
    preferred_batch_size: int = Field(4, ge=1)
    min_batch_size: int = Field(1, ge=1)
    max_batch_size: int = Field(8, ge=1)
    enable_dynamic_sizing: bool = True
    memory_threshold: float = Field(0.8, gt=0, le=1)
    parallel_processing: bool = False
    max_parallel_batches: int = Field(1, ge=1, le=8)

    @model_validator(mode="after")
    def _ordered(self) -> "BatchConfiguration":
        if self.min_batch_size > self.max_batch_size:
            raise ValueError("min_batch_size: must not exceed max_batch_size")
        self.preferred_batch_size = min(max(self.preferred_batch_size, self.min_batch_size), self.max_batch_size)
        return self


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    item_id: Id | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)

    _empty = field_validator("parameters", mode="before")(_none_as_empty)


class ExecuteBatchRequest(Request):
    batch_id: Id | None = None
    workflow_id: Id = "img-generation-basic"
    parameters: dict[str, Any] = Field(default_factory=dict)
    items: list[BatchItem] | None = None
    name: str | None = None
    configuration: BatchConfiguration | None = None
    priority: Priority = 5
    background: bool = True

    _empty = field_validator("parameters", mode="before")(_none_as_empty)

    @field_validator("items")
    @classmethod
    def _some_items(cls, value: list[BatchItem] | None) -> list[BatchItem] | None:
        if value is not None and not value:
            raise ValueError("must list at least one item (or leave items out and set total_images)")
        return value


class BatchRequest(Request):
    batch_id: Id
    include_items: bool = False


class ControlBatchRequest(BatchRequest):
    action: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True)]

    @field_validator("action")
    @classmethod
    def _verb(cls, value: str) -> str:
        if value not in BATCH_VERBS:
            raise ValueError(f"must be one of {', '.join(BATCH_VERBS)}, got '{value}'")
        return value


class DeleteBatchRequest(BatchRequest):
    force_cleanup: bool = True


class OutputRequest(Request):
    output_id: Id


class ListSessionsRequest(Request):
    status: str | None = None
    limit: int = Field(100, ge=1, le=10000)


M = TypeVar("M", bound=BaseModel)


def describe_errors(error: ValidationError, prefix: str = "") -> tuple[str, list[dict]]:
    """'field: problem' for each error, the way the envelope reports them."""
    problems = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        field = prefix + location if location else prefix.rstrip(".")
        problems.append({"field": field, "message": message})
    text = "; ".join(f"{p['field']}: {p['message']}" if p["field"] else p["message"] for p in problems)
    return text, problems


def parse(model: type[M], data: Any, prefix: str = "", context: dict | None = None) -> M:
    """Validate `data` as `model`, or raise InvalidRequest that names every bad field."""
    if isinstance(data, model):
        return data
    if isinstance(data, BaseModel):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise InvalidRequest(f"request must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        text, problems = describe_errors(error, prefix)
        raise InvalidRequest(text, details=problems) from None


_ID = TypeAdapter(Id)


def parse_id(value: Any, field: str) -> str:
    """A bare id, validated as the request models validate their ids."""
    try:
        return _ID.validate_python(value)
    except ValidationError as error:
        text, problems = describe_errors(error, prefix=field)
        raise InvalidRequest(text, details=problems) from None


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
