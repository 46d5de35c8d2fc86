"""docs/protocol.md against the code it describes, so neither can change without the other.

Every message model of chefia_rt/protocol (incoming.py, outgoing.py) has exactly one field table
in the page (marked `<!-- fields: ModelName -->`) that lists exactly its fields; every code of
errors.Code is in the codes table with its number; every default in the limits table is the
Settings default; the fixed limits the page names are the constants of the code.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from chefia_rt.config import Settings
from chefia_rt.errors import Code
from chefia_rt.protocol import codec, common, incoming, messages, outgoing
from chefia_rt.protocol.common import StrictModel

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
MARKER = re.compile(r"^<!-- fields: (\w+) -->$")


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _table_after(lines: list[str], start: int) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table that starts on line `start`, header and
    separator left out."""
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _field_tables() -> dict[str, list[list[str]]]:
    lines = _doc().splitlines()
    tables: dict[str, list[list[str]]] = {}
    for index, line in enumerate(lines):
        found = MARKER.match(line)
        if found is None:
            continue
        name = found.group(1)
        assert name not in tables, f"docs/protocol.md documents {name} twice"
        assert lines[index + 1].startswith("| field |"), f"{name}: no table under its marker"
        tables[name] = _table_after(lines, index + 1)
    return tables


_WIRE_MODULES = {common.__name__, incoming.__name__, outgoing.__name__}


def _models() -> dict[str, type[BaseModel]]:
    """Every wire model the module defines (the private bases aside)."""
    return {
        name: cls
        for name, cls in inspect.getmembers(messages, inspect.isclass)
        if issubclass(cls, BaseModel)
        and cls.__module__ in _WIRE_MODULES
        and not name.startswith("_")
        and cls not in (StrictModel, outgoing.Outgoing)
    }


def _unquote(cell: str) -> str:
    return cell.strip("`")


def test_every_model_is_documented_once_and_nothing_else() -> None:
    tables = _field_tables()
    models = _models()
    assert models, "no models found: the test reads the wrong module"
    assert sorted(set(models) - set(tables)) == [], "message models missing from the page"
    assert sorted(set(tables) - set(models)) == [], "tables of models that do not exist"


@pytest.mark.parametrize("name", sorted(_models()))
def test_a_documented_message_has_exactly_its_fields(name: str) -> None:
    model = _models()[name]
    rows = _field_tables()[name]
    documented = [_unquote(row[0]) for row in rows]
    assert len(documented) == len(set(documented)), f"{name}: a field listed twice"
    assert sorted(documented) == sorted(model.model_fields), name
    if "type" in model.model_fields:
        # The type row names the literal the model accepts, quoted as on the wire.
        (literal,) = get_args(model.model_fields["type"].annotation)
        type_row = next(row for row in rows if _unquote(row[0]) == "type")
        assert type_row[1] == f'`"{literal}"`', name


def test_client_fields_marked_required_are_the_required_ones() -> None:
    tables = _field_tables()
    models = _models()
    for name in _client_models():
        for row in tables[name]:
            field = models[name].model_fields[_unquote(row[0])]
            said = row[2].startswith("required")
            assert said == field.is_required(), f"{name}.{row[0]}: required is {not said}"


def _client_models() -> set[str]:
    """What a terminal sends: the incoming union, and the objects inside a data_sync."""
    union = get_args(messages.IncomingMessage)[0]
    return {model.__name__ for model in get_args(union)} | {"OperationModel", "BulkItem"}


def test_every_code_is_in_the_codes_table_with_its_number() -> None:
    doc = _doc()
    section = doc[doc.index("## 10. Codes") : doc.index("## 11.")]
    numbers = {int(row) for row in re.findall(r"^\| (\d{4}) \|", section, re.MULTILINE)}
    assert numbers == {int(code) for code in Code}
    for code in Code:
        assert re.search(rf"^\| {int(code)} \| `{code.name}` \|", section, re.MULTILINE), code


def _limits() -> list[tuple[str, str]]:
    doc = _doc()
    section = doc[doc.index("## 11. Limits") : doc.index("## 12.")]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| limit |"))
    return [(_unquote(row[1]), row[2]) for row in _table_after(lines, start)]


def test_documented_default_limits_are_the_settings_defaults() -> None:
    limits = _limits()
    assert len(limits) >= 20
    fields = Settings.model_fields
    for setting, default in limits:
        field = fields[setting.lower()]
        assert float(default) == float(field.default), setting


def test_fixed_limits_are_the_code_constants() -> None:
    doc = _doc()
    assert f"1 to {messages.MAX_BULK_UPDATES} updates in a BULK_UPDATE" in doc
    assert f"at most {messages.MAX_LOCK_TIMEOUT_MS} ms" in doc
    default_timeout = messages.AcquireLockIn.model_fields["timeout"].default
    assert f"default {default_timeout}, at most {messages.MAX_LOCK_TIMEOUT_MS}" in doc
    assert messages.MAX_VERSION == 2**62 and "versions below 2^62" in doc
    assert f"at most {codec.MAX_DEPTH} containers deep" in doc
    assert f"`{codec.COMPRESSED_PREFIX.decode()}` followed by `lz4.frame.compress(body)`" in doc
    assert f"`{codec.BATCH_TYPE}`" in doc


def test_the_policy_table_is_the_default_one() -> None:
    from chefia_rt.sync.policies import DEFAULT_POLICY_TABLE, FALLBACK_POLICY

    doc = _doc()
    section = doc[doc.index("### 7.3") : doc.index("### 7.4")]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| entity_type |"))
    rows = {_unquote(row[0]): row for row in _table_after(lines, start)}
    expected = {**DEFAULT_POLICY_TABLE, "any other": FALLBACK_POLICY}
    assert set(rows) == set(expected)
    for entity_type, policy in expected.items():
        row = rows[entity_type]
        assert _unquote(row[1]) == policy.policy, entity_type
        assert row[2] == ("yes" if policy.requires_lock else "no"), entity_type
