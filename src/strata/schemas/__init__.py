"""The schema registry: versioned JSON Schemas per event type, compatibility
rules, compiled validators and the policy for unregistered event types."""

from strata.schemas.compat import MODES, Mode, check
from strata.schemas.registry import (
    POLICIES,
    IncompatibleSchema,
    Policy,
    SchemaError,
    SchemaRegistry,
    UnknownSchema,
    Validator,
    compile_schema,
)

__all__ = [
    "MODES",
    "POLICIES",
    "IncompatibleSchema",
    "Mode",
    "Policy",
    "SchemaError",
    "SchemaRegistry",
    "UnknownSchema",
    "Validator",
    "check",
    "compile_schema",
]
