"""Entity lock leases (docs/protocol.md §8): the rules, with time passed in."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chefia_rt.domain import EntityKey
from chefia_rt.errors import Code, Locked
from chefia_rt.sync.locks import Lease, LockTable, TooManyLocks, check_write, live, may_take

ORDER = EntityKey("s1", "orders", "o1")
OTHER_ORDER = EntityKey("s1", "orders", "o2")
ORDER_IN_S2 = EntityKey("s2", "orders", "o1")


def lease(owner: str = "pos-1", expires_at: float = 100.0, key: EntityKey = ORDER) -> Lease:
    return Lease(key, owner, f"lock-{owner}", expires_at)


# ---- the rules -----------------------------------------------------------------------------


def test_may_take() -> None:
    assert may_take(None, "pos-1", 50.0)
    assert may_take(lease("pos-1"), "pos-1", 50.0)  # renewing one's own
    assert not may_take(lease("pos-2"), "pos-1", 50.0)
    assert not may_take(lease("pos-2"), "pos-1", 99.999)
    assert may_take(lease("pos-2"), "pos-1", 100.0)  # expired at expires_at
    assert may_take(lease("pos-2"), "pos-1", 150.0)


def test_live() -> None:
    held = lease()
    assert live(held, 99.0) is held
    assert live(held, 100.0) is None
    assert live(None, 0.0) is None


@pytest.mark.parametrize("needs_lock", [False, True])
def test_own_live_lease_may_write(needs_lock: bool) -> None:
    check_write(ORDER, lease("pos-1"), "pos-1", needs_lock, 50.0)


@pytest.mark.parametrize("needs_lock", [False, True])
def test_entity_locked_by_another_is_4009(needs_lock: bool) -> None:
    with pytest.raises(Locked) as info:
        check_write(ORDER, lease("pos-2"), "pos-1", needs_lock, 50.0)
    assert info.value.code == Code.LOCKED and int(info.value.code) == 4009
    assert "pos-2" in info.value.reason and "orders/o1" in info.value.reason


def test_write_without_lease_is_fine_when_no_lock_is_needed() -> None:
    check_write(ORDER, None, "pos-1", False, 50.0)


@pytest.mark.parametrize("holder", [None, lease("pos-1", 40.0), lease("pos-2", 40.0)])
def test_write_that_needs_a_lock_without_a_live_lease_is_4009(holder: Lease | None) -> None:
    with pytest.raises(Locked) as info:
        check_write(ORDER, holder, "pos-1", True, 50.0)
    assert info.value.code == 4009
    assert "acquire_lock" in info.value.reason


def test_expired_lease_of_another_does_not_block() -> None:
    check_write(ORDER, lease("pos-2", 40.0), "pos-1", False, 50.0)
    check_write(ORDER, lease("pos-2", 50.0), "pos-1", False, 50.0)


# ---- the in-process table ------------------------------------------------------------------


def test_acquire_a_free_entity() -> None:
    table = LockTable()
    ok, got = table.acquire(ORDER, "pos-1", "L1", 30.0, 10.0)
    assert ok and got == Lease(ORDER, "pos-1", "L1", 40.0)
    assert table.get(ORDER, 39.9) == got


def test_acquire_held_by_another_fails_with_the_holder() -> None:
    table = LockTable()
    _, first = table.acquire(ORDER, "pos-1", "L1", 30.0, 10.0)
    assert table.acquire(ORDER, "pos-2", "L2", 30.0, 20.0) == (False, first)
    assert table.get(ORDER, 20.0) == first
    # Other entities, and the same entity id in another store, are independent.
    assert table.acquire(OTHER_ORDER, "pos-2", "L3", 30.0, 20.0)[0]
    assert table.acquire(ORDER_IN_S2, "pos-2", "L4", 30.0, 20.0)[0]


def test_owner_renews() -> None:
    table = LockTable()
    table.acquire(ORDER, "pos-1", "L1", 30.0, 10.0)
    ok, renewed = table.acquire(ORDER, "pos-1", "L1b", 30.0, 35.0)
    assert ok and renewed == Lease(ORDER, "pos-1", "L1b", 65.0)
    assert table.get(ORDER, 50.0) == renewed
    assert not table.acquire(ORDER, "pos-2", "L2", 30.0, 50.0)[0]


def test_lease_expires_on_its_own() -> None:
    table = LockTable()
    table.acquire(ORDER, "pos-1", "L1", 30.0, 10.0)
    assert table.get(ORDER, 40.0) is None
    ok, taken = table.acquire(ORDER, "pos-2", "L2", 30.0, 40.0)
    assert ok and taken is not None and taken.owner == "pos-2"


def test_release() -> None:
    table = LockTable()
    table.acquire(ORDER, "pos-1", "L1", 30.0, 10.0)
    assert not table.release(ORDER, "pos-2", 20.0)  # not its lease
    assert table.get(ORDER, 20.0) is not None
    assert table.release(ORDER, "pos-1", 20.0)
    assert table.get(ORDER, 20.0) is None
    assert not table.release(ORDER, "pos-1", 20.0)  # already gone
    assert table.acquire(ORDER, "pos-2", "L2", 30.0, 20.0)[0]


def test_release_after_expiry_is_false() -> None:
    table = LockTable()
    table.acquire(ORDER, "pos-1", "L1", 30.0, 10.0)
    assert not table.release(ORDER, "pos-1", 45.0)


def test_release_owner_drops_every_lease_of_a_terminal_in_its_store() -> None:
    table = LockTable()
    table.acquire(ORDER, "pos-1", "L1", 30.0, 10.0)
    table.acquire(OTHER_ORDER, "pos-1", "L2", 30.0, 10.0)
    table.acquire(ORDER_IN_S2, "pos-1", "L3", 30.0, 10.0)  # same terminal id, other store
    kept = EntityKey("s1", "tables", "t1")
    table.acquire(kept, "pos-2", "L4", 30.0, 10.0)
    assert sorted(table.release_owner("s1", "pos-1")) == [ORDER, OTHER_ORDER]
    assert table.get(ORDER, 20.0) is None and table.get(OTHER_ORDER, 20.0) is None
    assert table.get(ORDER_IN_S2, 20.0) is not None
    assert table.get(kept, 20.0) is not None
    assert table.release_owner("s1", "pos-1") == []


def test_release_owner_given_now_reports_only_live_leases() -> None:
    table = LockTable()
    table.acquire(ORDER, "pos-1", "L1", 5.0, 10.0)  # expired by 20
    table.acquire(OTHER_ORDER, "pos-1", "L2", 30.0, 10.0)
    assert table.release_owner("s1", "pos-1", 20.0) == [OTHER_ORDER]
    assert table.release_owner("s1", "pos-1", 20.0) == []


def test_a_terminal_holds_at_most_its_maximum_of_leases_per_store() -> None:
    table = LockTable(max_per_owner=2)
    table.acquire(ORDER, "pos-1", "L1", 30.0, 10.0)
    table.acquire(OTHER_ORDER, "pos-1", "L2", 5.0, 10.0)
    third = EntityKey("s1", "tables", "t1")
    with pytest.raises(TooManyLocks) as info:
        table.acquire(third, "pos-1", "L3", 30.0, 10.0)
    assert info.value.limit == 2 and "2 locks" in str(info.value)
    assert table.get(third, 10.0) is None
    assert table.acquire(ORDER, "pos-1", "L4", 30.0, 11.0)[0]  # renewing is no new lease
    assert table.acquire(ORDER_IN_S2, "pos-1", "L5", 30.0, 11.0)[0]  # the other store's count
    assert table.acquire(third, "pos-1", "L6", 30.0, 15.0)[0]  # OTHER_ORDER expired at 15
    assert table.release(third, "pos-1", 16.0)
    assert table.acquire(OTHER_ORDER, "pos-1", "L7", 30.0, 16.0)[0]  # released: room again
    with pytest.raises(TooManyLocks):
        table.acquire(EntityKey("s1", "tables", "t2"), "pos-1", "L8", 30.0, 16.0)
    assert sorted(table.release_owner("s1", "pos-1", 16.0)) == [ORDER, OTHER_ORDER]


STORE_KEYS = [ORDER, OTHER_ORDER, EntityKey("s1", "tables", "t1"), ORDER_IN_S2]
actions = st.lists(
    st.tuples(
        st.sampled_from(["acquire", "release", "release_owner", "wait"]),
        st.sampled_from(["pos-1", "pos-2", "pos-3"]),
        st.sampled_from(STORE_KEYS),
        st.floats(0.0, 20.0),
    ),
    max_size=60,
)


@given(actions)
def test_a_live_lease_has_exactly_one_owner(
    steps: list[tuple[str, str, EntityKey, float]],
) -> None:
    """Against a model of the rules: one owner per live lease, at most 2 live ones per owner
    and store (a small maximum, so that runs reach it)."""
    table = LockTable(max_per_owner=2)
    now = 0.0
    model: dict[EntityKey, Lease] = {}  # the live leases as the rules say they are
    for n, (action, owner, key, amount) in enumerate(steps):
        model = {k: v for k, v in model.items() if live(v, now)}
        holder = model.get(key)
        if action == "acquire":
            held = sum(
                1 for k, v in model.items() if v.owner == owner and k.store_id == key.store_id
            )
            if holder is None and held >= 2:
                with pytest.raises(TooManyLocks):
                    table.acquire(key, owner, f"L{n}", amount, now)
            else:
                ok, got = table.acquire(key, owner, f"L{n}", amount, now)
                assert ok == may_take(holder, owner, now)
                if ok:
                    assert got == Lease(key, owner, f"L{n}", now + amount)
                    model[key] = got
                else:
                    assert got == holder
        elif action == "release":
            released = table.release(key, owner, now)
            assert released == (holder is not None and holder.owner == owner)
            if released:
                del model[key]
        elif action == "release_owner":
            dropped = table.release_owner(key.store_id, owner, now)
            mine = [k for k, v in model.items() if v.owner == owner and k.store_id == key.store_id]
            assert sorted(dropped) == sorted(mine)
            model = {k: v for k, v in model.items() if k not in mine}
        else:
            now += amount
        for k in STORE_KEYS:
            assert table.get(k, now) == live(model.get(k), now)
