"""What a workflow file may say, as pydantic models.

A workflow is data: steps naming operations, and a parameter schema with
defaults and limits. Nothing in a file is ever executed; an unknown operation
or a malformed schema makes the file invalid, reported with its path.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from ..operations import OPERATIONS

ParameterType = Literal["string", "integer", "number", "boolean", "image"]
_PYTHON_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool, "image": str}


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
        if f"{self.domain}.{self.operation}" not in OPERATIONS:
            known = ", ".join(sorted(OPERATIONS))
            raise ValueError(f"unknown operation '{self.domain}.{self.operation}' (known: {known})")
        return self


class WorkflowParameter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[a-z_][a-z0-9_]*$")
    type: ParameterType
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    choices: list[Any] | None = None
    required: bool = False
    description: str = ""


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
    estimated_duration: float = Field(5.0, ge=0, description="seconds, before anything was measured")

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

    def parameter_model(self) -> type[BaseModel]:
        """A pydantic model of this workflow's parameters: defaults, types, limits, choices."""
        fields: dict[str, Any] = {}
        for parameter in self.parameters:
            python_type = _PYTHON_TYPES[parameter.type]
            if parameter.choices:
                python_type = Literal[tuple(parameter.choices)]  # type: ignore[valid-type]
            constraints = {}
            if parameter.minimum is not None:
                constraints["ge"] = parameter.minimum
            if parameter.maximum is not None:
                constraints["le"] = parameter.maximum
            if parameter.required:
                fields[parameter.name] = (python_type, Field(..., description=parameter.description, **constraints))
            else:
                fields[parameter.name] = (
                    python_type | None,
                    Field(parameter.default, description=parameter.description, **constraints),
                )
        return create_model(f"Parameters_{self.id.replace('-', '_')}", __config__=ConfigDict(extra="allow"), **fields)
