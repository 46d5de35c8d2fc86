"""What each terminal type may do (docs/protocol.md §7.5, 4008), as a table.

A rule names the entity types a terminal type may write (`*` for any), and optionally the only
fields it may touch there. The default: monitors only read; kitchen displays only move an order's
status; waiters handle orders, tables and customers; a POS does everything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from chefia_rt.errors import PermissionDenied

ANY = "*"


@dataclass(frozen=True, slots=True)
class WriteRule:
    """May write `entity_type`; with `fields`, only UPDATEs of existing entities that touch
    nothing else (no CREATE, no upsert of a missing entity, no undelete: the engine, which knows
    whether the entity exists, refuses those with 4008)."""

    entity_type: str
    fields: frozenset[str] | None = None


DEFAULT_PERMISSIONS: dict[str, tuple[WriteRule, ...]] = {
    "pos": (WriteRule(ANY),),
    "waiter": (WriteRule("orders"), WriteRule("tables"), WriteRule("customers")),
    "kds": (WriteRule("orders", frozenset({"status"})),),
    "monitor": (),
}


class Permissions:
    """Checks a terminal type's writes, locks and conflict resolutions against the table."""

    __slots__ = ("_table",)

    def __init__(self, overrides: Mapping[str, Iterable[Mapping[str, object]]] | None = None):
        table = dict(DEFAULT_PERMISSIONS)
        for terminal_type, rules in (overrides or {}).items():
            table[terminal_type] = tuple(
                WriteRule(
                    str(rule["entity_type"]),
                    frozenset(rule["fields"]) if rule.get("fields") is not None else None,  # type: ignore[call-overload]
                )
                for rule in rules
            )
        self._table = table

    def _rule(self, terminal_type: str, entity_type: str) -> WriteRule | None:
        for rule in self._table.get(terminal_type, ()):
            if rule.entity_type in (ANY, entity_type):
                return rule
        return None

    def can_write_type(self, terminal_type: str, entity_type: str) -> bool:
        return self._rule(terminal_type, entity_type) is not None

    def check_write(
        self, terminal_type: str, entity_type: str, operation: str, fields: Iterable[str]
    ) -> None:
        """Raise PermissionDenied (4008) unless the terminal type may make this change."""
        rule = self._rule(terminal_type, entity_type)
        if rule is None:
            raise PermissionDenied(f"a {terminal_type} terminal may not write {entity_type}")
        if rule.fields is not None:
            extra = set(fields) - rule.fields
            if operation != "UPDATE" or extra:
                allowed = ", ".join(sorted(rule.fields))
                raise PermissionDenied(
                    f"a {terminal_type} terminal may only UPDATE {entity_type} fields: {allowed}"
                )

    def existing_only(self, terminal_type: str, entity_type: str) -> bool:
        """True when this terminal type may only change entities that exist (not deleted)."""
        rule = self._rule(terminal_type, entity_type)
        return rule is not None and rule.fields is not None

    def check_lock(self, terminal_type: str, entity_type: str) -> None:
        """Only a terminal that may write an entity type may lock its entities."""
        if not self.can_write_type(terminal_type, entity_type):
            raise PermissionDenied(f"a {terminal_type} terminal may not lock {entity_type}")

    def check_resolve(self, terminal_type: str) -> None:
        """Settling a manual conflict may write any entity type: only unrestricted terminals."""
        if not any(
            r.entity_type == ANY and r.fields is None for r in self._table.get(terminal_type, ())
        ):
            raise PermissionDenied(f"a {terminal_type} terminal may not resolve conflicts")
