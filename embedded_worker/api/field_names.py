"""The names a request may give its fields, and what becomes of a name nothing takes.

A misspelt field (`priorty`) or parameter (`model_id` for `model`) silently
dropped runs work the caller did not ask for, so every request model forbids
unknown fields and such a name is refused, with the names accepted where it
stands. The protocol's own fields (`ProtocolModel`) also come camelCase
(`sessionId`), as .NET's camelCase serialiser writes them; parameter names
(a workflow's, an operation's) come exactly as they are listed.

A host whose clients send keys of their own sets `unknown_request_fields:
"ignore"`; such names are then ignored, but never without a word: the reply
lists them under `ignored_parameters` and the log warns. The policy holds
for the call being answered: the facade opens it around each call
(`answering`), `validate` asks it. A request stored by an earlier process
was accepted then: reading it again ignores, with a warning, what it named
that is unknown now (`reading_stored`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import typing
from typing import Any, Iterator, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from ..errors import InvalidRequest

UnknownFields = Literal["refuse", "ignore"]
M = TypeVar("M", bound=BaseModel)
log = logging.getLogger("embedded_worker.requests")


class ProtocolModel(BaseModel):
    """A part of a request the protocol describes: its fields also come camelCase, and no others come."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


# ---- names ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)  # workflow parameter models are made per request
def spellings(model: type[BaseModel]) -> dict[str, str]:
    """Every name a field of `model` is given by (its name, its aliases) -> the field's name."""
    names: dict[str, str] = {}
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if alias else []
        for spelling in [name, *(choice for choice in choices if isinstance(choice, str))]:
            names[spelling] = name
    return names


@functools.lru_cache(maxsize=256)
def _camel_spellings(model: type[BaseModel]) -> dict[str, str]:
    """`sessionId` -> `session_id`, for each name of a field of `model` that has a camelCase spelling."""
    return {to_camel(name): name for name in spellings(model) if to_camel(name) != name}


@functools.lru_cache(maxsize=256)
def _nested_model(model: type[BaseModel], field: str) -> type[BaseModel] | None:
    """The model a field's values are (alone, optional or listed), if they are one."""
    pending = [model.model_fields[field].annotation]
    while pending:
        annotation = pending.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        pending.extend(typing.get_args(annotation))
    return None


def accepted_names(model: type[BaseModel], location: tuple) -> list[str] | None:
    """The names a request may give at `location` inside `model` (None: not a model's fields there)."""
    for part in location:
        if isinstance(part, int):
            continue
        field = spellings(model).get(part)
        model = _nested_model(model, field) if field is not None else None
        if model is None:
            return None
    return list(spellings(model))


def _snake_case(model: type[BaseModel], data: dict, prefix: str) -> dict:
    """`data` with each camelCase spelling of a field of `model` renamed to the field's own name, in the parts
    the protocol describes; two spellings of one name are refused."""
    names, camel = spellings(model), _camel_spellings(model)
    renamed: dict = {}
    for key, value in data.items():
        name = camel.get(key, key) if key not in names else key
        if name != key and name in data:
            raise InvalidRequest(f"{prefix}{key} and {prefix}{name}: two spellings of one field, give one")
        field = names.get(name)
        inner = _nested_model(model, field) if field is not None else None
        if inner is not None and issubclass(inner, ProtocolModel):
            if isinstance(value, dict):
                value = _snake_case(inner, value, f"{prefix}{name}.")
            elif isinstance(value, list):
                value = [_snake_case(inner, v, f"{prefix}{name}.{i}.") if isinstance(v, dict) else v
                         for i, v in enumerate(value)]
        renamed[name] = value
    return renamed


# ---- the policy of the call being answered ------------------------------------------------------


class Policy:
    """Whether unknown fields are ignored, and those a call ignored (as `parameters.model_id`)."""

    def __init__(self, ignore: bool, source: str = "request"):
        self.ignore = ignore
        self.source = source
        self.ignored: list[str] = []

    def note_ignored(self, fields: list[str]) -> None:
        fields = [field for field in fields if field not in self.ignored]
        if fields:
            self.ignored.extend(fields)
            log.warning("%s: ignored unknown field(s) %s", self.source, ", ".join(fields))


_current: contextvars.ContextVar[Policy] = contextvars.ContextVar("embedded_worker_unknown_fields",
                                                                  default=Policy(ignore=False))


@contextlib.contextmanager
def _holding(policy: Policy) -> Iterator[Policy]:
    token = _current.set(policy)
    try:
        yield policy
    finally:
        _current.reset(token)


def answering(mode: UnknownFields) -> contextlib.AbstractContextManager[Policy]:
    """The policy for one call at the facade; the fields it ignored are in `.ignored` afterwards."""
    return _holding(Policy(mode == "ignore"))


def reading_stored(label: str) -> contextlib.AbstractContextManager[Policy]:
    return _holding(Policy(True, f"{label} (stored)"))


def validate(model: type[M], data: dict, prefix: str, context: Any) -> M:
    """`data` as `model`: camelCase spellings of the protocol's fields renamed, unknown fields refused (a
    ValidationError) or, where the policy says so, ignored and noted."""
    if issubclass(model, ProtocolModel):
        data = _snake_case(model, data, prefix)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as error:
        policy = _current.get()
        unknown = [item["loc"] for item in error.errors(include_url=False) if item["type"] == "extra_forbidden"]
        if not (policy.ignore and unknown):
            raise
    policy.note_ignored([prefix + ".".join(map(str, location)) for location in unknown])
    return model.model_validate(data, context=context, extra="ignore")
