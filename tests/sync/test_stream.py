"""The stream cursor and a store's reorder buffer as tables: (state, event) -> (state, decision).

Each row states the whole state after the event and the decision, so a wrong step in either
fails it. The scenarios chain rows the way a session meets them (a gap filled from storage, a
pause during a resume, a snapshot's watermark).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from chefia_rt.sync.stream import (
    DELIVER,
    DUPLICATE,
    NOT_LIVE,
    OWN_OP,
    SKIP,
    CatchUp,
    GoLive,
    Mode,
    Reorder,
    StopCatchUp,
    StreamCursor,
    StreamError,
    Verdict,
)

PAUSED, CATCHING_UP, LIVE = Mode.PAUSED, Mode.CATCHING_UP, Mode.LIVE

# (next_seq, mode, own op ids)
State = tuple[int, Mode, frozenset[str]]
Event = Callable[[StreamCursor], Any]


def state(next_seq: int, mode: Mode, *own: str) -> State:
    return next_seq, mode, frozenset(own)


def cursor_in(s: State) -> StreamCursor:
    return StreamCursor(next_seq=s[0], mode=s[1], own_ops=set(s[2]))


def state_of(cursor: StreamCursor) -> State:
    return cursor.next_seq, cursor.mode, frozenset(cursor.own_ops)


# Events, named as the table reads them.
def push(seq: int, op_id: str = "x", own: bool = False) -> Event:
    return lambda c: c.push(seq, op_id, own)


def row(seq: int, op_id: str = "x") -> Event:
    return lambda c: c.row(seq, op_id)


def delivered(seq: int) -> Event:
    return lambda c: c.delivered(seq)


def page_end(rows: int, limit: int, head: int) -> Event:
    return lambda c: c.page_end(rows, limit, head)


def resume(since: int) -> Event:
    return lambda c: c.resume(since)


def queued(op_id: str) -> Event:
    return lambda c: c.own_op_queued(op_id)


def answered(op_id: str, seq: int | None) -> Event:
    return lambda c: c.own_op_answered(op_id, seq)


def pause() -> Event:
    return lambda c: c.pause()


def stop() -> Event:
    return lambda c: c.stop()


STEPS: list[tuple[str, State, Event, State, object]] = [
    # name, before, event, after, decision
    ("in order", state(3, LIVE), push(3), state(4, LIVE), DELIVER),
    ("duplicate", state(3, LIVE), push(2), state(3, LIVE), DUPLICATE),
    ("gap", state(3, LIVE), push(5), state(3, CATCHING_UP), CatchUp(2)),
    ("own op passed", state(3, LIVE, "a"), push(3, "a", True), state(4, LIVE), OWN_OP),
    (
        "own terminal, id not held",  # the origin decides; the held id stays for its own seq
        state(3, LIVE, "a"),
        push(3, "b", True),
        state(4, LIVE, "a"),
        OWN_OP,
    ),
    ("other's op", state(3, LIVE, "a"), push(3, "b"), state(4, LIVE, "a"), DELIVER),
    ("own duplicate", state(3, LIVE, "a"), push(2, "a", True), state(3, LIVE, "a"), DUPLICATE),
    ("push while catching up", state(3, CATCHING_UP), push(3), state(3, CATCHING_UP), NOT_LIVE),
    ("push while paused", state(3, PAUSED), push(9), state(3, PAUSED), NOT_LIVE),
    ("row, own op", state(3, CATCHING_UP, "a"), row(3, "a"), state(4, CATCHING_UP), OWN_OP),
    ("row to deliver", state(3, CATCHING_UP), row(3), state(3, CATCHING_UP), DELIVER),
    ("row delivered", state(3, CATCHING_UP), delivered(3), state(4, CATCHING_UP), None),
    ("row ahead", state(3, CATCHING_UP), row(5), state(3, CATCHING_UP), SKIP),
    ("row behind", state(3, CATCHING_UP), row(2), state(3, CATCHING_UP), SKIP),
    (
        "short page at the head: live in the same step",
        state(5, CATCHING_UP),
        page_end(3, 16, 4),
        state(5, LIVE),
        GoLive(),
    ),
    ("empty page at the head", state(5, CATCHING_UP), page_end(0, 16, 4), state(5, LIVE), GoLive()),
    (
        "full page: more may follow",
        state(5, CATCHING_UP),
        page_end(16, 16, 4),
        state(5, CATCHING_UP),
        CatchUp(4),
    ),
    (
        "short page, head moved on",
        state(5, CATCHING_UP),
        page_end(3, 16, 7),
        state(5, CATCHING_UP),
        CatchUp(4),
    ),
    (
        "short page, head one row on",
        state(5, CATCHING_UP),
        page_end(3, 16, 5),
        state(5, CATCHING_UP),
        CatchUp(4),
    ),
    ("pause when live", state(5, LIVE), pause(), state(5, PAUSED), StopCatchUp()),
    ("pause during resume", state(5, CATCHING_UP), pause(), state(5, PAUSED), StopCatchUp()),
    ("resume to an older since", state(9, LIVE), resume(3), state(4, CATCHING_UP), CatchUp(3)),
    (
        "snapshot watermark, own ops kept",
        state(9, PAUSED, "a"),
        resume(20),
        state(21, CATCHING_UP, "a"),
        CatchUp(20),
    ),
    ("own op queued", state(3, LIVE), queued("a"), state(3, LIVE, "a"), None),
    ("answered, place passed", state(5, LIVE, "a"), answered("a", 4), state(5, LIVE), None),
    (
        "answered, place ahead",
        state(5, LIVE, "a"),
        answered("a", 5),
        state(5, LIVE, "a"),
        None,
    ),
    ("answered without a place", state(5, LIVE, "a"), answered("a", None), state(5, LIVE), None),
    ("stop", state(5, LIVE, "a", "b"), stop(), state(5, PAUSED), None),
]


@pytest.mark.parametrize(
    ("before", "event", "after", "decision"),
    [pytest.param(*r[1:], id=r[0]) for r in STEPS],
)
def test_step(before: State, event: Event, after: State, decision: object) -> None:
    cursor = cursor_in(before)
    assert (event(cursor), state_of(cursor)) == (decision, after)


def test_the_table_covers_every_decision() -> None:
    """No decision of the cursor goes untested by a row above."""
    seen = {r[4] if isinstance(r[4], Verdict) else type(r[4]) for r in STEPS}
    assert seen == {*Verdict, CatchUp, StopCatchUp, GoLive, type(None)}


ILLEGAL: list[tuple[str, State, Event]] = [
    ("row while paused", state(3, PAUSED), row(3)),
    ("row while live", state(3, LIVE), row(3)),
    ("delivered while paused (the pause wins)", state(3, PAUSED), delivered(3)),
    ("delivered out of turn", state(3, CATCHING_UP), delivered(4)),
    ("page end while live", state(3, LIVE), page_end(0, 16, 2)),
]


@pytest.mark.parametrize(("before", "event"), [pytest.param(*r[1:], id=r[0]) for r in ILLEGAL])
def test_illegal_step(before: State, event: Event) -> None:
    cursor = cursor_in(before)
    with pytest.raises(StreamError):
        event(cursor)
    assert state_of(cursor) == before


def test_an_illegal_step_says_what_the_driver_did() -> None:
    with pytest.raises(StreamError) as out_of_turn:
        cursor_in(state(3, CATCHING_UP)).delivered(4)
    assert str(out_of_turn.value) == "row 4 delivered while the stream expects 3"
    with pytest.raises(StreamError) as live:
        cursor_in(state(3, LIVE)).page_end(0, 16, 2)
    assert str(live.value) == "a catch-up event while the stream is live"


# ---- scenarios: events in the order a session meets them -------------------------------------

SCENARIOS: dict[str, tuple[State, list[tuple[Event, object, State]]]] = {
    "gap then fill": (
        state(2, LIVE),
        [
            (push(4), CatchUp(1), state(2, CATCHING_UP)),
            (push(3), NOT_LIVE, state(2, CATCHING_UP)),  # storage has it
            (row(2), DELIVER, state(2, CATCHING_UP)),
            (delivered(2), None, state(3, CATCHING_UP)),
            (row(3), DELIVER, state(3, CATCHING_UP)),
            (delivered(3), None, state(4, CATCHING_UP)),
            (row(4), DELIVER, state(4, CATCHING_UP)),
            (delivered(4), None, state(5, CATCHING_UP)),
            (page_end(3, 16, 4), GoLive(), state(5, LIVE)),
            (push(4), DUPLICATE, state(5, LIVE)),
            (push(5), DELIVER, state(6, LIVE)),
        ],
    ),
    "own op dropped in a gap fill, then live again": (
        state(1, LIVE),
        [
            (queued("m"), None, state(1, LIVE, "m")),
            (push(1, "x"), DELIVER, state(2, LIVE, "m")),
            (push(3, "m", True), CatchUp(1), state(2, CATCHING_UP, "m")),  # overtook 2
            (row(2, "y"), DELIVER, state(2, CATCHING_UP, "m")),
            (delivered(2), None, state(3, CATCHING_UP, "m")),
            (row(3, "m"), OWN_OP, state(4, CATCHING_UP)),
            (page_end(2, 16, 3), GoLive(), state(4, LIVE)),
            (answered("m", 3), None, state(4, LIVE)),
            (push(4, "z"), DELIVER, state(5, LIVE)),
        ],
    ),
    "a pause during a resume reads the undelivered row again": (
        state(1, PAUSED),
        [
            (resume(0), CatchUp(0), state(1, CATCHING_UP)),
            (row(1), DELIVER, state(1, CATCHING_UP)),
            (pause(), StopCatchUp(), state(1, PAUSED)),  # while row 1 waited for room
            (resume(0), CatchUp(0), state(1, CATCHING_UP)),
            (row(1), DELIVER, state(1, CATCHING_UP)),
            (delivered(1), None, state(2, CATCHING_UP)),
            (page_end(1, 16, 1), GoLive(), state(2, LIVE)),
        ],
    ),
    "snapshot watermark": (
        state(3, LIVE),
        [
            (pause(), StopCatchUp(), state(3, PAUSED)),
            (push(3), NOT_LIVE, state(3, PAUSED)),
            (resume(10), CatchUp(10), state(11, CATCHING_UP)),
            (push(11), NOT_LIVE, state(11, CATCHING_UP)),
            (row(11), DELIVER, state(11, CATCHING_UP)),
            (delivered(11), None, state(12, CATCHING_UP)),
            (page_end(1, 16, 11), GoLive(), state(12, LIVE)),
            (push(11), DUPLICATE, state(12, LIVE)),
            (push(12), DELIVER, state(13, LIVE)),
        ],
    ),
    "resume to an older since replays what was sent": (
        state(6, LIVE),
        [
            (resume(4), CatchUp(4), state(5, CATCHING_UP)),
            (row(5), DELIVER, state(5, CATCHING_UP)),
            (delivered(5), None, state(6, CATCHING_UP)),
            (page_end(1, 1, 5), CatchUp(5), state(6, CATCHING_UP)),  # a full page of one
            (page_end(0, 1, 5), GoLive(), state(6, LIVE)),
        ],
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str) -> None:
    start, steps = SCENARIOS[name]
    cursor = cursor_in(start)
    for index, (event, decision, after) in enumerate(steps):
        assert (index, event(cursor), state_of(cursor)) == (index, decision, after)


# ---- a store's pushes that came early ---------------------------------------------------------

REORDER: list[
    tuple[str, dict[int, str], list[tuple[int | None, str]], int, list[str], set[int]]
] = [
    # name, held before, arriving (seq, push), expected, ready, held after
    ("none live: as they come", {}, [(5, "e"), (None, "-"), (3, "c")], 0, ["e", "c"], set()),
    ("none live: held stay held", {7: "g"}, [(5, "e")], 0, ["e"], {7}),
    ("in order", {}, [(3, "c"), (4, "d")], 3, ["c", "d"], set()),
    ("older dropped", {}, [(2, "b"), (3, "c")], 3, ["c"], set()),
    ("no seq dropped", {}, [(None, "-"), (3, "c")], 3, ["c"], set()),
    ("ahead held", {}, [(5, "e")], 3, [], {5}),
    ("fill releases the held", {5: "e", 4: "d"}, [(3, "c")], 3, ["c", "d", "e"], set()),
    ("fill releases up to the next gap", {5: "e"}, [(3, "c")], 3, ["c"], {5}),
    ("arrivals out of order", {}, [(4, "d"), (3, "c")], 3, ["c", "d"], set()),
]


@pytest.mark.parametrize(
    ("held", "pushes", "expected", "ready", "after"),
    [pytest.param(*r[1:], id=r[0]) for r in REORDER],
)
def test_reorder(
    held: dict[int, str],
    pushes: list[tuple[int | None, str]],
    expected: int,
    ready: list[str],
    after: set[int],
) -> None:
    order = Reorder(dict(held))
    assert (order.arrive(pushes, expected), set(order.held)) == (ready, after)


def test_reorder_gives_up_in_seq_order() -> None:
    order = Reorder({7: "g", 5: "e"})
    assert (order.give_up(), order.held) == (["e", "g"], {})
