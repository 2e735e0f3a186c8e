"""What a workflow file may say, as pydantic models.

A workflow is data: steps naming operations, and a parameter schema with
defaults and limits. Nothing in a file is ever executed; an unknown operation
or a malformed schema makes the file invalid, reported with its path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ..api.messages import Number, accepted_names, describe_errors
from .operations import OPERATIONS

ParameterType = Literal["string", "integer", "number", "boolean", "image"]
# what the protocol says is an integer or a boolean is exactly that: `true` is no step count, "yes" no boolean
_PYTHON_TYPES: dict[str, Any] = {"string": str, "integer": StrictInt, "number": Number, "boolean": StrictBool,
                                 "image": str}
Choice = StrictBool | StrictInt | Number | str


class WorkflowStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order: int = Field(..., ge=1)
    domain: Literal["inference", "postprocessing"]
    operation: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict, description="fixed values for this step")
    skip_when: str | None = Field(None, description="skip this step when the named parameter is given")

    @model_validator(mode="after")
    def _known_operation(self) -> "WorkflowStep":
        operation = OPERATIONS.get(f"{self.domain}.{self.operation}")
        if operation is None:
            known = ", ".join(sorted(OPERATIONS))
            raise ValueError(f"unknown operation '{self.domain}.{self.operation}' (known: {known})")
        unknown = sorted(set(self.parameters) - set(operation.params.taken(self.parameters)))
        if unknown:
            raise ValueError(f"parameters: {operation.qualified} does not take {', '.join(unknown)} (it takes: "
                             f"{', '.join(accepted_names(operation.params, ()))})")
        return self


class WorkflowParameter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]*$")
    type: ParameterType
    default: Any = None
    minimum: Number | None = None
    maximum: Number | None = None
    choices: list[Choice] | None = None
    required: bool = False
    description: str = ""

    def checked_type(self) -> Any:
        """The type a value of this parameter must have: its kind, its choices, its bounds."""
        python_type = Literal[tuple(self.choices)] if self.choices else _PYTHON_TYPES[self.type]
        constraints = {"ge": self.minimum, "le": self.maximum}
        constraints = {name: bound for name, bound in constraints.items() if bound is not None}
        return Annotated[python_type, Field(**constraints)] if constraints else python_type

    @model_validator(mode="after")
    def _bounds_fit_the_type(self) -> "WorkflowParameter":
        if (self.minimum is not None or self.maximum is not None) and self.type not in ("integer", "number"):
            raise ValueError(f"{self.name}: minimum and maximum apply to integer and number parameters only")
        return self


class Workflow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    name: str
    description: str = ""
    category: str = "general"
    version: str = "1.0.0"
    steps: list[WorkflowStep] = Field(..., min_length=1)
    parameters: list[WorkflowParameter] = Field(default_factory=list)
    required_models: list[str] = Field(default_factory=list)
    estimated_duration: Number = Field(5.0, ge=0, description="seconds, before anything was measured")
    _parameter_model: type[BaseModel] | None = PrivateAttr(None)

    @field_validator("steps")
    @classmethod
    def _ordered_steps(cls, steps: list[WorkflowStep]) -> list[WorkflowStep]:
        orders = [step.order for step in steps]
        if len(set(orders)) != len(orders):
            raise ValueError("step orders must be unique")
        return sorted(steps, key=lambda step: step.order)

    @model_validator(mode="after")
    def _skips_name_parameters(self) -> "Workflow":
        names = {p.name for p in self.parameters}
        for step in self.steps:
            if step.skip_when and step.skip_when not in names:
                raise ValueError(f"step {step.order}: skip_when names unknown parameter '{step.skip_when}'")
        return self

    @model_validator(mode="after")
    def _defaults_pass_the_schema(self) -> "Workflow":
        """A schema that cannot check a request, or whose own defaults fail it, is refused with the file,
        not at its first execute."""
        for parameter in self.parameters:
            try:
                checker = TypeAdapter(parameter.checked_type())
            except Exception as error:  # pydantic refuses some schemas only when they are built
                raise ValueError(f"parameters: {parameter.name}: {error}") from None
            if parameter.default is not None:
                try:
                    checker.validate_python(parameter.default)
                except ValidationError as error:
                    raise ValueError(f"default of {describe_errors(error, parameter.name)[0]}") from None
        return self

    def parameter_model(self) -> type[BaseModel]:
        """A pydantic model of this workflow's parameters: defaults, types, limits, choices. Built once per
        workflow: building it took 2-15 ms, and every request (every item of a batch) parses with it."""
        if self._parameter_model is None:
            self._parameter_model = self._build_parameter_model()
        return self._parameter_model

    def _build_parameter_model(self) -> type[BaseModel]:
        fields: dict[str, Any] = {}
        for parameter in self.parameters:
            if parameter.required:
                fields[parameter.name] = (parameter.checked_type(), Field(..., description=parameter.description))
            else:
                fields[parameter.name] = (parameter.checked_type() | None,
                                          Field(parameter.default, description=parameter.description))
        return create_model(f"Parameters_{self.id.replace('-', '_')}", __config__=ConfigDict(extra="forbid"), **fields)
