"""Schema registry: compatibility modes, versions, compiled validation."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from strata.schemas import (
    IncompatibleSchema,
    SchemaError,
    SchemaRegistry,
    UnknownSchema,
    check,
)

BASE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "plan": {"type": "string", "enum": ["free", "pro", "team"]},
        "seats": {"type": "integer", "minimum": 1},
        "coupon": {"type": "string"},
    },
    "required": ["plan", "seats"],
}


def changed(edit: Any) -> dict[str, Any]:
    schema = copy.deepcopy(BASE)
    edit(schema)
    return schema


REMOVED_REQUIRED = changed(lambda s: (s["properties"].pop("seats"), s["required"].remove("seats")))
CHANGED_TYPE = changed(lambda s: s["properties"]["seats"].update(type="string"))
NARROWED_ENUM = changed(lambda s: s["properties"]["plan"].update(enum=["free", "pro"]))
WIDENED_ENUM = changed(lambda s: s["properties"]["plan"].update(enum=["free", "pro", "team", "ent"]))
ADDED_OPTIONAL = changed(lambda s: s["properties"].update(source={"type": "string"}))
ADDED_REQUIRED = changed(
    lambda s: (s["properties"].update(source={"type": "string"}), s["required"].append("source"))
)
REMOVED_OPTIONAL = changed(lambda s: s["properties"].pop("coupon"))
RAISED_MINIMUM = changed(lambda s: s["properties"]["seats"].update(minimum=5))
CLOSED = changed(lambda s: s.update(additionalProperties=False))

# change -> modes under which it is accepted (docs/ingest.md, the table).
EXPECTED = {
    "removed_required": {"NONE"},
    "changed_type": {"NONE"},
    "narrowed_enum": {"FORWARD", "NONE"},
    "widened_enum": {"BACKWARD", "NONE"},
    "added_optional": {"BACKWARD", "FORWARD", "FULL", "NONE"},
    "added_required": {"FORWARD", "NONE"},
    "removed_optional": {"BACKWARD", "FORWARD", "FULL", "NONE"},
    "raised_minimum": {"FORWARD", "NONE"},
    "closed_schema": {"FORWARD", "NONE"},
}
CHANGES = {
    "removed_required": REMOVED_REQUIRED,
    "changed_type": CHANGED_TYPE,
    "narrowed_enum": NARROWED_ENUM,
    "widened_enum": WIDENED_ENUM,
    "added_optional": ADDED_OPTIONAL,
    "added_required": ADDED_REQUIRED,
    "removed_optional": REMOVED_OPTIONAL,
    "raised_minimum": RAISED_MINIMUM,
    "closed_schema": CLOSED,
}


@pytest.mark.parametrize("mode", ["BACKWARD", "FORWARD", "FULL", "NONE"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_mode_accepts_exactly_the_documented_changes(change: str, mode: Any) -> None:
    problems = check(BASE, CHANGES[change], mode)
    assert (not problems) == (mode in EXPECTED[change]), problems


def test_backward_refusals_name_the_path_and_reason(tmp_path: Path) -> None:
    registry = SchemaRegistry(tmp_path)
    assert registry.register("signup", BASE)["version"] == 1
    for schema, expected in (
        (REMOVED_REQUIRED, "$.seats: required field removed"),
        (CHANGED_TYPE, "$.seats: type changed from integer to string"),
        (NARROWED_ENUM, "$.plan: enum narrowed, ['team'] no longer allowed"),
    ):
        with pytest.raises(IncompatibleSchema) as info:
            registry.register("signup", schema)
        assert info.value.mode == "BACKWARD"
        assert any(p.startswith(expected) for p in info.value.problems), info.value.problems
    assert registry.register("signup", ADDED_OPTIONAL) == {
        "event_type": "signup", "version": 2, "created": True, "mode": "BACKWARD"
    }
    # Registering the latest again is idempotent: no new version.
    assert registry.register("signup", ADDED_OPTIONAL)["created"] is False
    assert registry.subject("signup")["versions"][-1]["version"] == 2


def test_mode_change_and_none(tmp_path: Path) -> None:
    registry = SchemaRegistry(tmp_path)
    registry.register("e", BASE)
    with pytest.raises(IncompatibleSchema):
        registry.register("e", CHANGED_TYPE)
    registry.set_mode("e", "NONE")
    assert registry.register("e", CHANGED_TYPE)["version"] == 2
    registry.set_mode("e", "FULL")
    with pytest.raises(IncompatibleSchema):
        registry.register("e", changed(lambda s: s["properties"]["seats"].update(type="integer")))
    with pytest.raises(SchemaError, match="mode"):
        registry.set_mode("e", "SIDEWAYS")


def test_invalid_schemas_are_refused(tmp_path: Path) -> None:
    registry = SchemaRegistry(tmp_path)
    with pytest.raises(SchemaError, match="expected a JSON object"):
        registry.register("e", ["not", "a", "schema"])
    with pytest.raises(SchemaError, match="type"):
        registry.register("e", {"type": "string"})
    with pytest.raises(SchemaError, match="invalid JSON Schema"):
        registry.register("e", {"type": "object", "properties": {"a": {"type": "bogus"}}})
    with pytest.raises(SchemaError, match="event_type"):
        registry.register("", BASE)
    assert registry.subjects() == []


def test_validation_messages_carry_json_paths(tmp_path: Path) -> None:
    registry = SchemaRegistry(tmp_path)
    registry.register(
        "order",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                        "required": ["sku"],
                    },
                },
                "plan": {"enum": ["a", "b"]},
            },
            "required": ["items"],
        },
    )
    validate = registry.validator("order")
    assert validate is not None
    assert validate({"items": [{"sku": "x", "qty": 2}]}) is None
    assert validate({"items": [{"sku": "x"}, {"sku": "y", "qty": "2"}]}) == (
        "properties.items[1].qty: must be integer"
    )
    assert validate({"items": [], "plan": "c"}) == "properties.plan: must be one of ['a', 'b']"
    assert validate({}).startswith("properties: must contain ['items']")  # type: ignore[union-attr]
    assert registry.validator("unknown") is None


def test_pinned_versions_and_lookup_errors(tmp_path: Path) -> None:
    registry = SchemaRegistry(tmp_path)
    registry.register("e", BASE)
    registry.register("e", WIDENED_ENUM)
    v1, v2 = registry.validator("e", 1), registry.validator("e", 2)
    assert v1 is not None and v2 is not None
    assert v1({"plan": "ent", "seats": 1}) is not None
    assert v2({"plan": "ent", "seats": 1}) is None
    with pytest.raises(UnknownSchema):
        registry.validator("e", 3)
    with pytest.raises(UnknownSchema):
        registry.get("nope")
    assert registry.get("e", 1)["schema"] == BASE


def test_a_second_registry_sees_changes_after_reload(tmp_path: Path) -> None:
    """Ingest workers hold their own registry: they notice another process's
    registration through the VERSION file, without a restart."""
    worker = SchemaRegistry(tmp_path, check_interval=0.0)
    admin = SchemaRegistry(tmp_path)
    assert worker.validator("e") is None and not worker.in_use
    admin.register("e", BASE)
    worker.maybe_reload()
    assert worker.in_use and worker.validator("e") is not None
    admin.register("e", WIDENED_ENUM)
    worker.maybe_reload()
    assert worker.validator("e").version == 2  # type: ignore[union-attr]
    # Survives a reopen (durable in the directory), odd names included.
    admin.register("Order Completed/v2 ✓", {"type": "object"})
    reopened = SchemaRegistry(tmp_path)
    assert {s["event_type"] for s in reopened.subjects()} == {"e", "Order Completed/v2 ✓"}


def test_cli_add_list_show_locally(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(BASE))
    bad.write_text(json.dumps(NARROWED_ENUM))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "strata.cli", "schema", *args, "--data-dir", str(data)],
            capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "STRATA_URL": ""},
        )

    assert cli("add", "signup", str(good)).returncode == 0
    refused = cli("add", "signup", str(bad))
    assert refused.returncode == 1
    assert "$.plan: enum narrowed" in refused.stderr
    listed = json.loads(cli("list").stdout)
    assert listed == {"subjects": [{"event_type": "signup", "mode": "BACKWARD", "latest_version": 1}]}
    shown = json.loads(cli("show", "signup", "--version", "1").stdout)
    assert shown["schema"] == BASE
    assert cli("show", "nope").returncode == 1
