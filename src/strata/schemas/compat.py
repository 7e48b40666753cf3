"""Compatibility rules between two versions of an event type's schema.

A schema here is a JSON Schema for the event's ``properties`` object. The
check is structural over the subset of JSON Schema that strata compiles
(``type``, ``properties``, ``required``, ``additionalProperties``, ``enum``,
``const``, ``items``, numeric and length bounds, ``pattern``, ``format``).
Keywords it cannot reason about (``anyOf``, ``oneOf``, ``allOf``, ``not``,
``$ref``, ``if``...) must be unchanged between the two versions, otherwise the
change is refused as unprovable (register it with mode ``NONE``).

Modes (docs/decisions/051-compatibility-modes.md):

* ``BACKWARD`` (default): every event valid under the previous version is
  valid under the new one (SDKs already in the field keep working), and no
  field that was required stops being required (queries, metric filters and
  dashboards written against the history keep finding it).
* ``FORWARD``: every event valid under the new version is valid under the
  previous one (readers of the previous version understand new events).
* ``FULL``: both ``BACKWARD`` and ``FORWARD``.
* ``NONE``: any valid schema is accepted.

Only the latest version is compared (not transitive). A property that one
version does not declare is assumed absent from its events: adding an
optional property to an open schema is therefore compatible both ways.
"""

from __future__ import annotations

from typing import Any, Literal

Mode = Literal["BACKWARD", "FORWARD", "FULL", "NONE"]
MODES: tuple[Mode, ...] = ("BACKWARD", "FORWARD", "FULL", "NONE")

# Keywords the structural check understands; others must be equal.
_UNDERSTOOD = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "enum", "const", "items",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
        "maxLength", "minItems", "maxItems", "pattern", "format",
        # annotations: no effect on validity
        "title", "description", "default", "examples", "$schema", "$id", "$comment",
        "deprecated", "readOnly", "writeOnly",
    }
)
_ALL_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


def check(previous: Any, new: Any, mode: Mode) -> list[str]:
    """Problems that make ``new`` incompatible with ``previous`` under
    ``mode``; an empty list means compatible. Each problem starts with the
    JSON path of the offending schema location (``$.plan``...)."""
    problems: list[str] = []
    if mode in ("BACKWARD", "FULL"):
        problems += _subset(previous, new, "$", "an event valid under the previous version")
        problems += _required_kept(previous, new, "$")
    if mode in ("FORWARD", "FULL"):
        problems += _subset(new, previous, "$", "an event valid under the new version")
    return sorted(set(problems))


def _types(schema: dict[str, Any]) -> frozenset[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None
    kinds = frozenset([kind] if isinstance(kind, str) else kind)
    return kinds | {"integer"} if "number" in kinds else kinds


def _values(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    if "enum" in schema:
        return list(schema["enum"])
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _describe(types: frozenset[str] | None) -> str:
    if types is None:
        return "any type"
    shown = sorted(types - {"integer"}) if "number" in types else sorted(types)
    return "/".join(shown)


def _subset(a: Any, b: Any, path: str, who: str) -> list[str]:
    """Problems with "every instance valid under ``a`` is valid under ``b``"."""
    if b is True or b == {}:
        return []
    if a is False:
        return []
    if b is False:
        return [f"{path}: {who} may have this field, which is now refused"]
    if a is True:
        a = {}
    if not isinstance(a, dict) or not isinstance(b, dict):
        return [f"{path}: schema must be an object or a boolean"]
    problems: list[str] = []
    for keyword in (set(a) | set(b)) - _UNDERSTOOD:
        if a.get(keyword) != b.get(keyword):
            problems.append(f"{path}: '{keyword}' changed; strata cannot check it (use mode NONE)")

    types_a, types_b = _types(a), _types(b)
    if types_a is None and _values(a) is not None:
        types_a = frozenset(_json_type(v) for v in _values(a) or [])
    if types_b is not None and (types_a is None or not types_a <= types_b):
        problems.append(
            f"{path}: type changed from {_describe(types_a)} to {_describe(types_b)}"
        )
    values_a, values_b = _values(a), _values(b)
    if values_b is not None:
        missing = [v for v in (values_a or []) if v not in values_b]
        if values_a is None:
            problems.append(f"{path}: values restricted to {values_b}")
        elif missing:
            problems.append(f"{path}: enum narrowed, {missing} no longer allowed")

    for low, high in (("minimum", "maximum"), ("exclusiveMinimum", "exclusiveMaximum"),
                      ("minLength", "maxLength"), ("minItems", "maxItems")):
        if low in b and (low not in a or a[low] < b[low]):
            problems.append(f"{path}: {low} raised to {b[low]}")
        if high in b and (high not in a or a[high] > b[high]):
            problems.append(f"{path}: {high} lowered to {b[high]}")
    for keyword in ("pattern", "format"):
        if keyword in b and a.get(keyword) != b[keyword]:
            problems.append(f"{path}: {keyword} changed to {b[keyword]!r}")

    may_be_object = types_a is None or "object" in types_a
    if may_be_object and (types_b is None or "object" in types_b):
        problems += _subset_object(a, b, path, who)
    may_be_array = types_a is None or "array" in types_a
    if may_be_array and (types_b is None or "array" in types_b) and "items" in b:
        problems += _subset(a.get("items", {}), b["items"], f"{path}[]", who)
    return problems


def _subset_object(a: dict[str, Any], b: dict[str, Any], path: str, who: str) -> list[str]:
    problems: list[str] = []
    props_a: dict[str, Any] = a.get("properties", {})
    props_b: dict[str, Any] = b.get("properties", {})
    required_a = set(a.get("required", []))
    for name in b.get("required", []):
        if name not in required_a:
            problems.append(f"{path}.{name}: now required, but {who} may lack it")
    extra_b = b.get("additionalProperties", True)
    for name, sub_a in props_a.items():
        if name in props_b:
            problems += _subset(sub_a, props_b[name], f"{path}.{name}", who)
        elif extra_b is False:
            problems.append(f"{path}.{name}: field removed from a closed schema; {who} may have it")
        elif extra_b is not True:
            problems += _subset(sub_a, extra_b, f"{path}.{name}", who)
    extra_a = a.get("additionalProperties", True)
    if extra_a is not False and extra_b is not True:
        # Undeclared fields of ``a`` (any value) must pass ``b``'s rule.
        problems += _subset({} if extra_a is True else extra_a, extra_b,
                            f"{path}.*", who)
    return problems


def _required_kept(previous: Any, new: Any, path: str) -> list[str]:
    """Fields required by ``previous`` that ``new`` no longer requires."""
    if not isinstance(previous, dict) or not isinstance(new, dict):
        return []
    problems = [
        f"{path}.{name}: required field removed; readers of the history rely on it"
        for name in previous.get("required", [])
        if name not in set(new.get("required", []))
    ]
    props_new = new.get("properties", {})
    for name, sub in previous.get("properties", {}).items():
        if name in props_new:
            problems += _required_kept(sub, props_new[name], f"{path}.{name}")
    if isinstance(previous.get("items"), dict) and isinstance(new.get("items"), dict):
        problems += _required_kept(previous["items"], new["items"], f"{path}[]")
    return problems
