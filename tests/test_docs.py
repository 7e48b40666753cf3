"""docs/ stays true: every configuration field is documented."""

from __future__ import annotations

from pathlib import Path

import msgspec

from strata.config import Config, MetricConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _fields(obj: msgspec.Struct, prefix: str = "") -> list[str]:
    out = []
    for name in type(obj).__struct_fields__:
        value = getattr(obj, name)
        if isinstance(value, msgspec.Struct):
            out.extend(_fields(value, f"{prefix}{name}."))
        elif name != "metrics":
            out.append(f"{prefix}{name}")
    return out


def test_every_config_field_is_in_the_reference() -> None:
    text = (DOCS / "configuration.md").read_text()
    fields = _fields(Config()) + [f"metrics.{f}" for f in MetricConfig.__struct_fields__]
    missing = [f for f in fields if f"`{f}`" not in text]
    assert not missing, f"document these in docs/configuration.md: {missing}"


def test_readme_has_the_two_quick_start_commands() -> None:
    readme = (DOCS.parent / "README.md").read_text()
    assert "## Quick start" in readme
    assert "python3 -m pip install . && python3 -m strata serve --demo" in readme
    assert "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (DOCS.parent / ".ci" / "run").read_text()


def test_every_emitted_prometheus_metric_has_help_text() -> None:
    """A metric without HELP renders as `untyped` with its name as help."""
    import re

    from strata.telemetry import HELP

    src = Path(__file__).resolve().parents[1] / "src" / "strata"
    pattern = re.compile(r'REGISTRY\.(?:inc|set|observe)\(\s*"(strata_[a-z_]+)"')
    emitted = {m for f in src.rglob("*.py") for m in pattern.findall(f.read_text())}
    assert len(emitted) > 10
    assert sorted(emitted - set(HELP)) == []
