"""Conflict policies and the entity-type policy table (docs/protocol.md §7.3), as plain
functions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chefia_rt.domain import Entity, EntityKey
from chefia_rt.sync.policies import (
    DEFAULT_POLICY_TABLE,
    FALLBACK_POLICY,
    LAST_WRITE_WINS,
    MANUAL_RESOLUTION,
    MERGE_CHANGES,
    MERGE_NON_CONFLICTING,
    RESOLVERS,
    EntityPolicy,
    PolicyTable,
    Verdict,
    last_write_wins,
    latest_change_since,
    manual_resolution,
    merge_changes,
    merge_non_conflicting,
)


def ts(second: int) -> str:
    return f"2024-01-15T10:00:{second:02d}.000000Z"


def entity(
    version: int, t: int, fields: dict[str, tuple[int, int]], data: dict[str, Any] | None = None
) -> Entity:
    return Entity(
        key=EntityKey("s1", "products", "p1"),
        version=version,
        data=data if data is not None else dict.fromkeys(fields, 0),
        timestamp=ts(t),
        field_versions={f: [v, ts(s)] for f, (v, s) in fields.items()},
    )


# v4 written at t=10; "a" changed by v4 (t=10), "b" by v3 (t=30, a fast clock), "c" by v1.
SERVER = entity(4, 10, {"a": (4, 10), "b": (3, 30), "c": (1, 0)})


# ---- the table -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entity_type", "policy", "requires_lock"),
    [
        ("orders", LAST_WRITE_WINS, True),
        ("tables", LAST_WRITE_WINS, False),
        ("products", MERGE_CHANGES, False),
        ("customers", MERGE_NON_CONFLICTING, False),
        ("cashier_operations", MANUAL_RESOLUTION, True),
        ("anything_else", LAST_WRITE_WINS, False),
    ],
)
def test_default_table_is_the_spec(entity_type: str, policy: str, requires_lock: bool) -> None:
    assert PolicyTable()[entity_type] == EntityPolicy(policy, requires_lock)
    assert PolicyTable().resolver(entity_type) is RESOLVERS[policy]


def test_fallback_is_last_write_wins_without_lock() -> None:
    assert EntityPolicy() == FALLBACK_POLICY == EntityPolicy(LAST_WRITE_WINS, False)


def test_override_replaces_only_the_keys_it_names() -> None:
    table = PolicyTable(
        {
            "tables": {"policy": "merge_changes"},
            "orders": {"policy": "merge_non_conflicting"},
            "products": {"requires_lock": True},
            "menus": {"policy": "manual_resolution"},
        }
    )
    assert table["tables"] == EntityPolicy(MERGE_CHANGES, False)
    assert table["orders"] == EntityPolicy(MERGE_NON_CONFLICTING, True)  # keeps its lock
    assert table["products"] == EntityPolicy(MERGE_CHANGES, True)
    assert table["menus"] == EntityPolicy(MANUAL_RESOLUTION, False)
    assert table.resolver("tables") is merge_changes
    assert table["customers"] == DEFAULT_POLICY_TABLE["customers"]


def test_overrides_do_not_leak_into_other_tables() -> None:
    PolicyTable({"orders": {"policy": "manual_resolution", "requires_lock": False}})
    assert PolicyTable()["orders"] == EntityPolicy(LAST_WRITE_WINS, True)
    assert DEFAULT_POLICY_TABLE["orders"] == EntityPolicy(LAST_WRITE_WINS, True)


@pytest.mark.parametrize("name", ["lww", "", "LAST_WRITE_WINS", None, 3])
def test_unknown_policy_name_is_a_value_error(name: Any) -> None:
    with pytest.raises(ValueError, match="unknown conflict policy") as info:
        PolicyTable({"tables": {"policy": name}})
    assert "merge_changes" in str(info.value)  # it says what is known


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("true", True),
        ("False", False),
        ("0", False),
        (1, True),
        (0, False),
    ],
)
def test_requires_lock_accepts_booleans_and_their_spellings(value: Any, expected: bool) -> None:
    assert PolicyTable({"tables": {"requires_lock": value}})["tables"].requires_lock is expected


@pytest.mark.parametrize("value", ["maybe", 2, None, [True]])
def test_requires_lock_must_be_a_boolean(value: Any) -> None:
    with pytest.raises(ValueError, match="requires_lock"):
        PolicyTable({"tables": {"requires_lock": value}})


@pytest.mark.parametrize("spec", ["merge_changes", None, {"polcy": "merge_changes"}])
def test_malformed_override_is_a_value_error(spec: Any) -> None:
    with pytest.raises(ValueError):
        PolicyTable({"tables": spec})


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("merge_changes", "policy of 'tables' must be a mapping, got 'merge_changes'"),
        (
            {"polcy": "merge_changes", "lock": True},
            "unknown policy setting(s) lock, polcy for 'tables'; known: policy, requires_lock",
        ),
        (
            {"policy": "lww"},
            "unknown conflict policy 'lww' for 'tables'; known: "
            "last_write_wins, manual_resolution, merge_changes, merge_non_conflicting",
        ),
    ],
    ids=["not-a-mapping", "unknown-setting", "unknown-policy"],
)
def test_a_bad_override_says_what_is_wrong_exactly(spec: Any, reason: str) -> None:
    """The operator reads this at startup: it names the setting and what would be accepted."""
    with pytest.raises(ValueError) as info:
        PolicyTable({"tables": spec})
    assert str(info.value) == reason


def test_no_overrides_is_the_default_table() -> None:
    for entity_type, policy in DEFAULT_POLICY_TABLE.items():
        assert PolicyTable(None)[entity_type] == PolicyTable({})[entity_type] == policy


# ---- the policies --------------------------------------------------------------------------


def test_latest_change_since_counts_only_writes_after_the_base() -> None:
    assert latest_change_since(SERVER, 0) == ts(30)
    assert latest_change_since(SERVER, 2) == ts(30)
    assert latest_change_since(SERVER, 3) == ts(10)  # "b" (v3) was seen
    assert latest_change_since(SERVER, 9) == ts(10)  # the last write always counts


@pytest.mark.parametrize(("base", "t", "wins"), [(3, 10, True), (3, 9, False), (2, 29, False)])
def test_last_write_wins(base: int, t: int, wins: bool) -> None:
    verdict = last_write_wins(SERVER, {"x": 1}, base, ts(t))
    if wins:
        assert verdict == Verdict({"x": 1}, "applied", wins_whole=True)
    else:
        assert verdict == Verdict({}, "resolved")


def test_last_write_wins_with_an_empty_patch_still_wins_whole() -> None:
    assert last_write_wins(SERVER, {}, 3, ts(59)).wins_whole


def test_merge_changes() -> None:
    # base v2: "a" (v4, t=10) and "b" (v3, t=30) changed since; "c" did not.
    assert merge_changes(SERVER, {"c": 1}, 2, ts(0)) == Verdict({"c": 1}, "merged")
    assert merge_changes(SERVER, {"a": 1, "b": 1}, 2, ts(10)) == Verdict({"a": 1}, "merged")
    assert merge_changes(SERVER, {"a": 1, "b": 1}, 2, ts(30)) == Verdict({"a": 1, "b": 1}, "merged")
    assert merge_changes(SERVER, {"a": 1, "b": 1}, 2, ts(9)) == Verdict({}, "resolved")
    assert merge_changes(SERVER, {}, 2, ts(59)) == Verdict({}, "resolved")


def test_merge_non_conflicting() -> None:
    assert merge_non_conflicting(SERVER, {"c": 1, "d": 1}, 2, ts(0)) == Verdict(
        {"c": 1, "d": 1}, "merged"
    )
    # An overlapping field keeps the server value whatever the timestamps.
    assert merge_non_conflicting(SERVER, {"a": 1, "c": 1}, 2, ts(59)) == Verdict(
        {"c": 1}, "resolved"
    )
    assert merge_non_conflicting(SERVER, {"a": 1}, 2, ts(59)) == Verdict({}, "resolved")
    assert merge_non_conflicting(SERVER, {"b": 1}, 3, ts(0)) == Verdict({"b": 1}, "merged")
    assert merge_non_conflicting(SERVER, {}, 2, ts(0)) == Verdict({}, "resolved")


def test_manual_resolution_accepts_nothing() -> None:
    assert manual_resolution(SERVER, {"c": 1}, 3, ts(59)) == Verdict({}, "conflict")


FIELDS = ["a", "b", "c", "d"]
servers = st.builds(
    lambda version, t, raw: entity(
        version, t, {f: (min(v, version), s) for f, (v, s) in raw.items()}
    ),
    st.integers(1, 6),
    st.integers(0, 59),
    st.dictionaries(
        st.sampled_from(FIELDS), st.tuples(st.integers(1, 6), st.integers(0, 59)), max_size=4
    ),
)
patches = st.dictionaries(st.sampled_from(FIELDS), st.integers(), max_size=4)


@given(servers, patches, st.integers(0, 7), st.integers(0, 59))
def test_merge_policies_only_take_fields_of_the_patch(
    server: Entity, patch: dict[str, Any], base: int, t: int
) -> None:
    changed = {f for f, (v, _) in server.field_versions.items() if v > base}
    untouched = {f: v for f, v in patch.items() if f not in changed}

    mc = merge_changes(server, patch, base, ts(t))
    assert untouched.items() <= mc.accepted.items() <= patch.items()
    for f in set(mc.accepted) & changed:
        assert ts(t) >= server.field_versions[f][1]
    assert mc.status == ("merged" if mc.accepted else "resolved")
    assert not mc.wins_whole

    mnc = merge_non_conflicting(server, patch, base, ts(t))
    assert mnc.accepted == untouched
    assert mnc.status == ("merged" if untouched and untouched == patch else "resolved")

    lww = last_write_wins(server, patch, base, ts(t))
    assert lww.wins_whole == (ts(t) >= latest_change_since(server, base))
    assert lww.accepted == (patch if lww.wins_whole else {})
