"""The shapes a call may take at the facade, and the strict JSON a reply leaves as.

A request comes as a dict, a pydantic model, JSON text or keyword
arguments; a status poll often as a bare id. Command names come in any case
(`GetSessionStatus`, `get-session-status`): the facade snake-cases them,
the one place that does. JSON text is parsed with its limits (size, depth,
no NaN), and a reply that must be text is written strictly (C# parsers
refuse NaN and Infinity).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from pydantic import BaseModel

from ..errors import InternalError, InvalidRequest
from .messages import MAX_REQUEST_CHARS, MAX_REQUEST_DEPTH, check_shape, failure

log = logging.getLogger("embedded_worker")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake_case(name: str) -> str:
    return _CAMEL.sub("_", name.strip()).lower().replace("-", "_")


def request_data(request: Any, kwargs: dict) -> dict:
    """A request in any shape a caller sends (a dict, a pydantic model, JSON text, keyword arguments) as
    one checked dict."""
    if request is None:
        data: dict = {}
    elif isinstance(request, BaseModel):
        data = request.model_dump(exclude_unset=True)
    elif isinstance(request, dict):
        data = dict(request)
    elif isinstance(request, str):
        data = json_object(request)
    else:
        raise InvalidRequest(f"request must be a dict, a JSON object or a model, got {type(request).__name__}")
    data.update(kwargs)
    check_shape(data)
    return data


def json_text(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("{")


def polled_id(request: Any, kwargs: dict, field: str) -> str | None:
    """The id of a status poll in the shapes callers send (a bare id, `field=id`, `{field, action}`),
    when it is one the Id type passes unchanged (nothing to strip, nothing to refuse); else None, and the
    request takes the validating path."""
    if kwargs:
        if request is not None:
            return None
        request = kwargs
    elif type(request) is not dict:
        request = {field: request}
    if len(request) > 2 or (len(request) == 2 and type(request.get("action", 0)) is not str):
        return None
    value = request.get(field)
    if (type(value) is str and 0 < len(value) <= 200 and value.isprintable()
            and not value[0].isspace() and not value[-1].isspace() and value[0] != "{"):
        return value
    return None


def id_request(request: Any, field: str) -> Any:
    """A bare id (a string) is shorthand for `{field: id}`; so is text that only looks like JSON
    (a GUID in braces), and a bare number, which the id check then names."""
    if isinstance(request, str) and json_text(request):
        try:
            return json_object(request)
        except InvalidRequest:
            return {field: request}
    if isinstance(request, (str, int, float)):
        return {field: request}
    return request


def _refuse_constant(name: str) -> float:
    raise InvalidRequest(f"request: {name} is not a JSON number")


def json_object(text: str) -> dict:
    if len(text) > MAX_REQUEST_CHARS:
        raise InvalidRequest(f"request: longer than {MAX_REQUEST_CHARS} characters")
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise InvalidRequest(f"request: malformed JSON: {error.msg} at {where}") from None
    except RecursionError:
        raise InvalidRequest(f"request: nested deeper than {MAX_REQUEST_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"request: must be a JSON object, got {type(value).__name__}")
    return value


def json_reply(reply: dict) -> str:
    """A reply as strict JSON text (C# parsers refuse NaN and Infinity); a reply that has one is a bug."""
    try:
        return json.dumps(reply, allow_nan=False)
    except ValueError as error:
        log.error("a reply could not be written as JSON: %s", error)
        return json.dumps(failure(InternalError(f"the reply is not valid JSON: {error}")))
