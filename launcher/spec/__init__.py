"""The job spec: pydantic models (unknown keys are errors), YAML loading with line numbers and
did-you-mean, ``key.path=value`` overrides, cross-field rules, and the one rule for relative paths.

This module is the package's face: other packages import only what it lists.
"""

from __future__ import annotations

from launcher.spec.load import (
    Location,
    RelativePaths,
    load_spec,
    load_yaml_model,
    resolve_relative_paths,
    validate_spec,
)
from launcher.spec.models import (
    DataFormat,
    DataSource,
    DataSpec,
    FieldMap,
    Fraction,
    JobSpec,
    ModelSpec,
    NonNegativeInt,
    PeftSpec,
    PositiveInt,
    RaySpec,
    ResourcesSpec,
    Section,
    SlurmSpec,
    SweepSpec,
    TrackingSpec,
    UnfreezeStage,
)
from launcher.spec.rules import guardrail_warnings, tracking_problems, zero_problems
from launcher.spec.search import Dimension, parse_dimension, parse_value

__all__ = [
    "DataFormat",
    "DataSource",
    "DataSpec",
    "Dimension",
    "FieldMap",
    "Fraction",
    "JobSpec",
    "Location",
    "ModelSpec",
    "NonNegativeInt",
    "PeftSpec",
    "PositiveInt",
    "RaySpec",
    "RelativePaths",
    "ResourcesSpec",
    "Section",
    "SlurmSpec",
    "SweepSpec",
    "TrackingSpec",
    "UnfreezeStage",
    "guardrail_warnings",
    "load_spec",
    "load_yaml_model",
    "parse_dimension",
    "parse_value",
    "resolve_relative_paths",
    "tracking_problems",
    "validate_spec",
    "zero_problems",
]
