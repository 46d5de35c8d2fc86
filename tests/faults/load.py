"""Steady load from many `chefia_rt.client` terminals, and the independent checker.

A Fleet is dozens of terminals across several stores, each a real Client over a real WebSocket,
spread over the nodes of a cluster (each terminal's home node first, the others as fallbacks).
Writers send at a steady rate; every terminal records what its Client hands it. After a fault,
`check` compares storage (read directly with asyncpg) with every terminal's view:

- every confirmed operation is stored exactly once, with the seq it was confirmed with, and
  everything stored was confirmed: nothing lost; one audit row each: nothing applied twice;
- each store's seqs are gapless;
- every terminal of a store got every operation of the store exactly once, in seq order (its
  own through their confirmations, the others' as pushes), and nothing of other stores;
- no terminal is left with unanswered operations, and none stopped.

Used by the fault suite (tests/faults/test_reliability.py) and the soak (tests/faults/soak.py).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from chefia_rt.client import Answer, Backoff, Client, ClientStopped, Event, Snapshot, StoreOp

RATE = 4.0  # operations per second per writer
SEND_TIMEOUT = 30.0  # a writer waits this long for room in its outbox

# What a writer sends as its n-th operation: entity_type, entity_id, data, extra fields.
OpFactory = Callable[["LoadTerminal", int], tuple[str, str, dict[str, Any], dict[str, Any]]]


def new_table(terminal: LoadTerminal, n: int) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """Each operation a table of its own (version 1, never a conflict)."""
    return "tables", f"{terminal.terminal_id}-t{n}", {"n": n, "by": terminal.terminal_id}, {}


@dataclass(eq=False)
class LoadTerminal:
    """One terminal of the fleet and everything it saw."""

    terminal_id: str
    store: str
    client: Client
    writes: bool
    rate: float = RATE
    make_op: OpFactory = new_table
    events: list[Event] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)
    submitted: dict[str, float] = field(default_factory=dict)  # op id -> when (monotonic)
    answered_at: dict[str, float] = field(default_factory=dict)
    sent_ops: dict[str, dict[str, Any]] = field(default_factory=dict)
    count: int = 0

    async def write(self) -> None:
        entity_type, entity_id, data, extra = self.make_op(self, self.count)
        op_id = f"{self.store}.{self.terminal_id}-{self.count:06d}"  # ids are global
        self.count += 1
        answer = await self.client.send(
            entity_type, entity_id, data, op_id=op_id, timeout=SEND_TIMEOUT, **extra
        )
        self.submitted[op_id] = time.monotonic()
        self.sent_ops[op_id] = {"entity_type": entity_type, "entity_id": entity_id, **extra}
        answer.add_done_callback(lambda f: self._answered(op_id, f))

    def _answered(self, op_id: str, future: asyncio.Future[Answer]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.answers[op_id] = future.result()
            self.answered_at[op_id] = time.monotonic()

    def confirmed_seqs(self) -> list[int]:
        return [s for a in self.answers.values() if (s := a.seq) is not None]

    def latencies(self) -> list[float]:
        return [self.answered_at[i] - self.submitted[i] for i in self.answered_at]


@dataclass
class Report:
    """One scenario's figures (a row of docs/benchmarks.md §5's table)."""

    scenario: str
    terminals: int
    operations: int
    confirmations: int
    duplicates: int
    retries: int
    reconnects: int
    recover_p50: float | None
    recover_p99: float | None
    lost: int
    note: str = ""

    HEADER = (
        "| scenario | terminals | operations | confirmations | duplicates | 1013/4005 retries "
        "| reconnects | recover p50 | recover p99 | lost |"
    )

    def row(self) -> str:
        def secs(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        return (
            f"| {self.scenario} | {self.terminals} | {self.operations} | {self.confirmations} "
            f"| {self.duplicates} | {self.retries} | {self.reconnects} | {secs(self.recover_p50)} "
            f"| {secs(self.recover_p99)} | {self.lost} |"
        )


def table(reports: list[Report]) -> str:
    """The reports as a markdown table."""
    lines = [Report.HEADER, "|" + "---|" * 10]
    lines += [r.row() for r in reports]
    notes = [f"- {r.scenario}: {r.note}" for r in reports if r.note]
    return "\n".join(lines + (["", *notes] if notes else [])) + "\n"


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Fleet:
    """Terminals across stores and nodes, writing steadily until told to stop."""

    def __init__(self, node_urls: list[str]) -> None:
        self.node_urls = node_urls
        self.terminals: list[LoadTerminal] = []
        self.producing = True
        self._tasks: list[asyncio.Task[None]] = []

    def add(
        self,
        terminal_id: str,
        store: str,
        *,
        terminal_type: str = "pos",
        encoding: Literal["json", "msgpack"] = "msgpack",
        writes: bool = True,
        rate: float = RATE,
        make_op: OpFactory = new_table,
        home: int | None = None,
        **options: Any,
    ) -> LoadTerminal:
        """A terminal (started by `start`), homed on a node and falling back to the others."""
        home = len(self.terminals) % len(self.node_urls) if home is None else home
        urls = self.node_urls[home:] + self.node_urls[:home]
        options.setdefault("backoff", Backoff(initial=0.1, maximum=2.0))
        options.setdefault("retry_after", 0.5)
        events: list[Event] = []
        # With `events_size` the test takes events from the iterator itself (a slow reader).
        client = Client(
            urls,
            terminal_id,
            store_id=store,
            terminal_type=terminal_type,
            encoding=encoding,
            since=0,
            on_event=None if "events_size" in options else events.append,
            **options,
        )
        terminal = LoadTerminal(terminal_id, store, client, writes, rate, make_op, events)
        self.terminals.append(terminal)
        return terminal

    def add_stores(
        self, prefix: str, stores: int, writers: int, readers: int = 1, **options: Any
    ) -> list[str]:
        """`stores` stores of `writers` pos/waiter terminals and `readers` kitchen displays."""
        names = [f"{prefix}-s{i}" for i in range(stores)]
        for store in names:
            for w in range(writers):
                kind = "waiter" if w % 3 == 2 else "pos"
                encoding: Literal["json", "msgpack"] = "json" if w % 2 else "msgpack"
                self.add(f"{kind}-{w}", store, terminal_type=kind, encoding=encoding, **options)
            for r in range(readers):
                self.add(f"kds-{r}", store, terminal_type="kds", writes=False, **options)
        return names

    async def start(self, timeout: float = 30.0) -> None:
        for t in self.terminals:
            t.client.start()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(t.client.wait_connected(timeout) for t in self.terminals))
        except TimeoutError:
            waiting = [
                f"{t.store}/{t.terminal_id}" for t in self.terminals if not t.client.connected
            ]
            raise AssertionError(f"never connected in {timeout:g}s: {waiting}") from None
        for t in self.terminals:
            if t.writes:
                self._tasks.append(asyncio.create_task(self._produce(t)))

    async def _produce(self, t: LoadTerminal) -> None:
        # Start out of phase, so that the terminals' writes spread over the period.
        await asyncio.sleep(random.random() / t.rate)
        while self.producing:
            try:
                await t.write()
            except ClientStopped:
                return
            await asyncio.sleep((0.5 + random.random()) / t.rate)

    def stop_producing(self) -> None:
        self.producing = False

    async def close(self) -> None:
        self.producing = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(t.client.close() for t in self.terminals), return_exceptions=True)

    # ---- progress ---------------------------------------------------------------------------

    def stores(self) -> list[str]:
        return sorted({t.store for t in self.terminals})

    def of_store(self, store: str) -> list[LoadTerminal]:
        return [t for t in self.terminals if t.store == store]

    def known_head(self, store: str) -> int:
        """The highest seq of the store any of its terminals knows of (confirmed or received)."""
        terminals = self.of_store(store)
        return max(
            [max(t.confirmed_seqs(), default=0) for t in terminals]
            + [t.client.watermark or 0 for t in terminals]
        )

    def unanswered(self) -> int:
        return sum(len(t.client.unanswered()) for t in self.terminals)

    async def recovery(self, since: float, timeout: float = 60.0) -> list[float]:
        """Seconds from `since` until each terminal caught up: connected, every operation it
        sent before `since` answered, everything its store had committed by then received,
        and (a writer) one operation sent after `since` confirmed. Terminals that never did
        within `timeout` are left out (the check then fails on what they miss)."""
        heads = {store: self.known_head(store) for store in self.stores()}
        recovered: dict[int, float] = {}
        deadline = since + timeout
        while len(recovered) < len(self.terminals) and time.monotonic() < deadline:
            now = time.monotonic()
            for index, t in enumerate(self.terminals):
                if index in recovered or not t.client.connected:
                    continue
                oldest = t.client.oldest_unanswered()
                if oldest is not None and oldest <= since:
                    continue
                if (t.client.watermark or 0) < heads[t.store]:
                    continue
                if (
                    t.writes
                    and not any(
                        self_at >= since and op_id in t.answers
                        for op_id, self_at in t.submitted.items()
                    )
                    and self.producing
                ):
                    continue
                recovered[index] = now - since
            await asyncio.sleep(0.02)
        return list(recovered.values())

    async def settle(self, dsn: str, timeout: float = 60.0) -> None:
        """Stop writing; wait until every operation is answered and every terminal has all of
        its store's log (as storage says)."""
        self.stop_producing()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.unanswered():
                break
            await asyncio.sleep(0.05)
        heads = await store_heads(dsn, self.stores())
        while time.monotonic() < deadline:
            if all((t.client.watermark or 0) >= heads.get(t.store, 0) for t in self.terminals):
                return
            await asyncio.sleep(0.05)


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Read storage directly, on a connection of its own (what is really committed)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def store_heads(dsn: str, stores: list[str]) -> dict[str, int]:
    rows = await fetch(
        dsn,
        "SELECT store_id, max(seq) FROM sync_operations WHERE store_id = ANY($1) GROUP BY store_id",
        stores,
    )
    return {r[0]: int(r[1] or 0) for r in rows}


@dataclass
class Verdict:
    """What the checker found; `problems` empty means everything docs/protocol.md §9 promises
    held."""

    operations: int
    confirmations: int
    lost: int
    problems: list[str]


async def check(dsn: str, fleet: Fleet) -> Verdict:
    """Storage against every terminal's view (see the module doc)."""
    stores = fleet.stores()
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT id, store_id, seq, terminal_id FROM sync_operations WHERE store_id = ANY($1)",
            stores,
        )
        audits = dict(
            await conn.fetch(
                "SELECT operation_id, count(*) FROM audit_logs_master WHERE store_id = ANY($1) "
                "GROUP BY operation_id",
                stores,
            )
        )
    finally:
        await conn.close()
    problems: list[str] = []
    stored = {r["id"]: r for r in rows}
    # Applied once: one audit row per operation that changed anything (a seq), none twice.
    twice = [i for i, n in audits.items() if n > 1]
    twice += [r["id"] for r in rows if r["seq"] is not None and audits.get(r["id"]) != 1]
    if twice:
        problems.append(f"ops without exactly one audit row: {twice[:5]}")
    confirmed = {
        op_id: (t, answer)
        for t in fleet.terminals
        for op_id, answer in t.answers.items()
        if answer.kind == "confirmed"
    }
    # Exactly once: every confirmed op stored once with its seq; nothing stored unconfirmed.
    lost = sorted(set(confirmed) - set(stored))
    if lost:
        problems.append(f"{len(lost)} confirmed ops not stored: {lost[:5]}")
    unconfirmed = sorted(set(stored) - set(confirmed))
    if unconfirmed:
        problems.append(f"{len(unconfirmed)} stored ops never confirmed: {unconfirmed[:5]}")
    wrong_seq = [
        op_id
        for op_id, (_, answer) in confirmed.items()
        if op_id in stored and stored[op_id]["seq"] != answer.seq
    ]
    if wrong_seq:
        problems.append(f"confirmed with another seq than stored: {wrong_seq[:5]}")
    log: dict[str, dict[int, str]] = {store: {} for store in stores}
    for r in rows:
        if r["seq"] is not None:
            log[r["store_id"]][int(r["seq"])] = r["id"]
    for store, by_seq in log.items():
        if sorted(by_seq) != list(range(1, len(by_seq) + 1)):
            problems.append(f"{store}: seqs not gapless ({len(by_seq)} ops, max {max(by_seq)})")
    # Every terminal: its store's whole log, once each, in seq order, and nothing else.
    missed = 0
    for t in fleet.terminals:
        by_seq = log[t.store]
        ops = [e for e in t.events if isinstance(e, StoreOp)]
        seqs = [e.seq for e in ops]
        if any(isinstance(e, Snapshot) for e in t.events):
            problems.append(f"{t.store}/{t.terminal_id}: needed a snapshot")
        if seqs != list(range(1, len(by_seq) + 1)):
            gone = sorted(set(by_seq) - set(seqs))
            missed += len(gone)
            problems.append(
                f"{t.store}/{t.terminal_id}: got {len(seqs)} of {len(by_seq)} seqs; "
                f"missing {gone[:5]}, in order: {seqs == sorted(set(seqs))}"
            )
        wrong = [e.seq for e in ops if by_seq.get(e.seq) != e.operation.get("id")]
        if wrong:
            problems.append(f"{t.store}/{t.terminal_id}: other ops at seqs {wrong[:5]}")
        if t.client.unanswered():
            problems.append(f"{t.store}/{t.terminal_id}: {len(t.client.unanswered())} unanswered")
        if t.client.stopped is not None:
            problems.append(f"{t.store}/{t.terminal_id}: stopped ({t.client.stopped})")
        rejected = [a.message for a in t.answers.values() if a.kind != "confirmed"]
        if rejected:
            problems.append(f"{t.store}/{t.terminal_id}: refused {rejected[:3]}")
    return Verdict(
        operations=sum(len(s) for s in log.values()),
        confirmations=len(confirmed),
        lost=len(lost) + missed,
        problems=problems,
    )


def report(
    scenario: str,
    fleet: Fleet,
    verdict: Verdict,
    recovery: list[float],
    note: str = "",
) -> Report:
    clients = [t.client for t in fleet.terminals]
    return Report(
        scenario=scenario,
        terminals=len(clients),
        operations=verdict.operations,
        confirmations=verdict.confirmations,
        duplicates=sum(c.stats.duplicates for c in clients),
        retries=sum(c.stats.retries for c in clients),
        reconnects=sum(c.stats.reconnects for c in clients),
        recover_p50=statistics.median(recovery) if recovery else None,
        recover_p99=percentile(recovery, 0.99),
        lost=verdict.lost,
        note=note,
    )
