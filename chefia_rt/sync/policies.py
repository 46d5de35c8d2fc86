"""Conflict policies and the entity-type policy table (docs/protocol.md §7.3).

A policy decides what happens when an operation's `version` is not the entity's current + 1.
The table that maps entity types to policies is data (overridable from configuration); the
policies themselves are small pure functions registered by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from chefia_rt.domain import JSON, Entity

LAST_WRITE_WINS = "last_write_wins"
MERGE_CHANGES = "merge_changes"
MERGE_NON_CONFLICTING = "merge_non_conflicting"
MANUAL_RESOLUTION = "manual_resolution"


@dataclass(frozen=True, slots=True)
class EntityPolicy:
    """How one entity type resolves conflicts, and whether writes need the entity's lock."""

    policy: str = LAST_WRITE_WINS
    requires_lock: bool = False


DEFAULT_POLICY_TABLE: dict[str, EntityPolicy] = {
    "orders": EntityPolicy(LAST_WRITE_WINS, requires_lock=True),
    "tables": EntityPolicy(LAST_WRITE_WINS),
    "products": EntityPolicy(MERGE_CHANGES),
    "customers": EntityPolicy(MERGE_NON_CONFLICTING),
    "cashier_operations": EntityPolicy(MANUAL_RESOLUTION, requires_lock=True),
}
FALLBACK_POLICY = EntityPolicy(LAST_WRITE_WINS)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A policy's answer for a conflicting UPDATE: the fields to write and the status to report
    (`applied`, `merged`, `resolved`), or `conflict` for manual.

    `wins_whole`: the operation won outright (last_write_wins) and is applied as sent, a new
    version even when its patch is empty. Otherwise an empty `accepted` means nothing changes.
    """

    accepted: JSON
    status: str
    wins_whole: bool = False


def _changed_since(current: Entity, base: int) -> dict[str, str]:
    """Fields the server changed after the client's base version, with their change timestamps."""
    return {f: str(meta[1]) for f, meta in current.field_versions.items() if meta[0] > base}


def latest_change_since(current: Entity, base: int) -> str:
    """The latest client timestamp among the server's writes after `base`: what a whole-entity
    conflict is decided against. The last write always counts; writes at or before the base do
    not (the client saw them), however late their timestamps."""
    return max([current.timestamp, *_changed_since(current, base).values()])


def last_write_wins(current: Entity, patch: JSON, base: int, timestamp: str) -> Verdict:
    """The later client timestamp wins whole; a tie goes to the later arrival (this one)."""
    if timestamp >= latest_change_since(current, base):
        return Verdict(dict(patch), "applied", wins_whole=True)
    return Verdict({}, "resolved")


def merge_changes(current: Entity, patch: JSON, base: int, timestamp: str) -> Verdict:
    """Merge fields changed since the base; on the same field the later timestamp wins."""
    server_changes = _changed_since(current, base)
    accepted = {
        f: v for f, v in patch.items() if f not in server_changes or timestamp >= server_changes[f]
    }
    return Verdict(accepted, "merged" if accepted else "resolved")


def merge_non_conflicting(current: Entity, patch: JSON, base: int, timestamp: str) -> Verdict:
    """Merge fields the server did not touch since the base; an overlapping field keeps the
    server value and the operation is reported `resolved`."""
    server_changes = _changed_since(current, base)
    accepted = {f: v for f, v in patch.items() if f not in server_changes}
    return Verdict(accepted, "merged" if accepted and len(accepted) == len(patch) else "resolved")


def manual_resolution(current: Entity, patch: JSON, base: int, timestamp: str) -> Verdict:
    """Nothing is applied; a person decides through `conflict_resolution`."""
    return Verdict({}, "conflict")


Resolver = Callable[[Entity, JSON, int, str], Verdict]

RESOLVERS: dict[str, Resolver] = {
    LAST_WRITE_WINS: last_write_wins,
    MERGE_CHANGES: merge_changes,
    MERGE_NON_CONFLICTING: merge_non_conflicting,
    MANUAL_RESOLUTION: manual_resolution,
}


class PolicyTable:
    """Entity type → policy, with the defaults of docs/protocol.md §7.3 and overrides from
    configuration."""

    __slots__ = ("_table",)

    def __init__(self, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Start from DEFAULT_POLICY_TABLE; each override `{entity_type: {"policy": name,
        "requires_lock": bool}}` replaces the keys it names. A bad override is a ValueError."""
        table = dict(DEFAULT_POLICY_TABLE)
        for entity_type, spec in (overrides or {}).items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"policy of {entity_type!r} must be a mapping, got {spec!r}")
            unknown = set(spec) - {"policy", "requires_lock"}
            if unknown:
                raise ValueError(
                    f"unknown policy setting(s) {', '.join(sorted(map(str, unknown)))} "
                    f"for {entity_type!r}; known: policy, requires_lock"
                )
            base = table.get(entity_type, FALLBACK_POLICY)
            policy = EntityPolicy(
                policy=spec.get("policy", base.policy),
                requires_lock=_flag(
                    spec.get("requires_lock", base.requires_lock), f"{entity_type}.requires_lock"
                ),
            )
            if not isinstance(policy.policy, str) or policy.policy not in RESOLVERS:
                raise ValueError(
                    f"unknown conflict policy {policy.policy!r} for {entity_type!r}; "
                    f"known: {', '.join(sorted(RESOLVERS))}"
                )
            table[entity_type] = policy
        self._table = table

    def __getitem__(self, entity_type: str) -> EntityPolicy:
        """The policy of an entity type (last_write_wins, no lock, when not in the table)."""
        return self._table.get(entity_type, FALLBACK_POLICY)

    def resolver(self, entity_type: str) -> Resolver:
        """The conflict function of an entity type's policy."""
        return RESOLVERS[self[entity_type].policy]


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _flag(value: Any, name: str) -> bool:
    """A boolean setting; configuration often hands over strings, and bool("false") is True."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be a boolean, got {value!r}")
