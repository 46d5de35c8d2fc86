"""docs/configuration.md against Settings (chefia_rt/config.py): every setting documented once,
nothing documented that the server does not read, every default and alias as the code has them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from chefia_rt.config import ALIASES, Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _rows(header: str) -> list[list[str]]:
    """The rows of every table of the page whose header starts with `header`."""
    rows: list[list[str]] = []
    inside = False
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith(header):
            inside = True
            continue
        if inside and line.startswith("|---"):
            continue
        if inside and line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        else:
            inside = False
    return rows


def _settings() -> dict[str, list[str]]:
    rows = _rows("| variable |")
    names = [row[0].strip("`") for row in rows]
    assert len(names) == len(set(names)), "a setting documented twice"
    return {row[0].strip("`"): row for row in rows}


def _default(info: FieldInfo) -> Any:
    return info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]


def _documented(cell: str) -> str | None:
    """The default a cell states: its first `code` span, or None for "unset"."""
    if cell.startswith("unset"):
        return None
    found = re.match(r"`([^`]*)`", cell)
    assert found is not None, f"default cell {cell!r} names no value"
    return found.group(1)


def test_every_setting_is_documented_and_nothing_else() -> None:
    documented = set(_settings())
    fields = {name.upper() for name in Settings.model_fields}
    assert sorted(fields - documented) == [], "settings missing from docs/configuration.md"
    assert sorted(documented - fields) == [], "documented settings that Settings does not have"


def test_documented_defaults_are_the_defaults() -> None:
    for name, row in _settings().items():
        info = Settings.model_fields[name.lower()]
        default = _default(info)
        said = _documented(row[1])
        if default is None:
            assert said is None, f"{name}: the default is unset, the page says {row[1]!r}"
        elif isinstance(default, bool):
            assert said == str(default).lower(), name
        elif isinstance(default, (int, float)):
            assert said is not None and float(said) == float(default), name
        elif isinstance(default, dict):
            assert said == "{}" and default == {}, name
        else:
            assert said == default, name


def test_documented_aliases_are_the_aliases() -> None:
    documented = {row[0].strip("`"): row[1].strip("`") for row in _rows("| alias |")}
    assert documented == ALIASES
    for name, row in _settings().items():
        alias = Settings.model_fields[name.lower()].validation_alias
        others = (
            {str(choice).upper() for choice in alias.choices} - {name}
            if isinstance(alias, AliasChoices)
            else set()
        )
        said = set(re.findall(r"Alias `([A-Z_]+)`", row[2]))
        assert said == others, name
