"""What each terminal type may write, lock and resolve (docs/protocol.md §7.5, 4008): the
table, pure."""

from __future__ import annotations

import pytest

from chefia_rt.errors import Code, PermissionDenied
from chefia_rt.sync.permissions import Permissions


def denied(check: object, *args: object) -> str:
    with pytest.raises(PermissionDenied) as info:
        check(*args)  # type: ignore[operator]
    assert info.value.code == Code.PERMISSION_DENIED
    return info.value.reason


def test_the_default_table() -> None:
    table = Permissions()
    for entity_type in ("orders", "products", "config", "anything"):
        table.check_write("pos", entity_type, "CREATE", ["x"])
        table.check_lock("pos", entity_type)
        assert not table.existing_only("pos", entity_type)
    table.check_resolve("pos")
    for entity_type in ("orders", "tables", "customers"):
        table.check_write("waiter", entity_type, "CREATE", ["x"])
        table.check_lock("waiter", entity_type)
    reason = denied(table.check_write, "waiter", "products", "UPDATE", ["price"])
    assert reason == "a waiter terminal may not write products"
    assert (
        denied(table.check_lock, "waiter", "products") == "a waiter terminal may not lock products"
    )
    assert denied(table.check_resolve, "waiter") == "a waiter terminal may not resolve conflicts"
    assert denied(table.check_write, "monitor", "orders", "UPDATE", []).startswith("a monitor")
    assert not table.can_write_type("monitor", "orders")
    assert not table.existing_only("monitor", "orders")  # it may write nothing at all


def test_a_kitchen_display_only_moves_an_existing_orders_status() -> None:
    table = Permissions()
    table.check_write("kds", "orders", "UPDATE", ["status"])
    table.check_write("kds", "orders", "UPDATE", [])
    assert table.existing_only("kds", "orders")
    assert table.can_write_type("kds", "orders") and not table.can_write_type("kds", "tables")
    table.check_lock("kds", "orders")
    only = "a kds terminal may only UPDATE orders fields: status"
    assert denied(table.check_write, "kds", "orders", "UPDATE", ["status", "total"]) == only
    assert denied(table.check_write, "kds", "orders", "CREATE", ["status"]) == only
    assert denied(table.check_write, "kds", "orders", "DELETE", []) == only
    assert denied(table.check_resolve, "kds") == "a kds terminal may not resolve conflicts"


def test_overrides_replace_a_type_and_add_new_ones() -> None:
    table = Permissions(
        {
            "waiter": [{"entity_type": "orders", "fields": ["status", "notes"]}],
            "bar": [{"entity_type": "products"}, {"entity_type": "orders", "fields": None}],
            "manager": [{"entity_type": "*"}],
        }
    )
    table.check_write("waiter", "orders", "UPDATE", ["notes", "status"])
    reason = denied(table.check_write, "waiter", "orders", "UPDATE", ["total"])
    assert reason == "a waiter terminal may only UPDATE orders fields: notes, status"
    assert not table.can_write_type("waiter", "tables")  # the override replaced the default
    table.check_write("bar", "products", "CREATE", ["price"])
    table.check_write("bar", "orders", "DELETE", [])
    assert not table.existing_only("bar", "orders")
    denied(table.check_resolve, "bar")
    table.check_resolve("manager")
    table.check_write("kds", "orders", "UPDATE", ["status"])  # untouched defaults stay
    assert denied(table.check_write, "kds", "tables", "UPDATE", []).startswith("a kds")


def test_an_unknown_terminal_type_may_do_nothing() -> None:
    table = Permissions()
    assert not table.can_write_type("robot", "orders")
    assert denied(table.check_write, "robot", "orders", "UPDATE", []).startswith("a robot")
    denied(table.check_resolve, "robot")


def test_a_restricted_wildcard_may_not_resolve() -> None:
    table = Permissions({"auditor": [{"entity_type": "*", "fields": ["note"]}]})
    table.check_write("auditor", "orders", "UPDATE", ["note"])
    denied(table.check_resolve, "auditor")
