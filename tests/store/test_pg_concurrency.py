"""Several OS processes, each with its own PostgresStore, hammering the same entities at once.

What the in-process contract tests cannot show: separate processes (as separate workers and nodes
are) share nothing but the database, so the only thing keeping per-store seqs gapless and versions
from forking is the store's locking. Four processes commit a few hundred operations each, in
random batches, over the same entities of three stores with three conflict policies (tables
last_write_wins, products merge_changes, customers merge_non_conflicting), including BULK_UPDATEs,
DELETEs, retries of their own operations and operations every process sends (the same ids).

Afterwards everything is checked from the database alone:
- per store, the logged seqs are exactly 1..N and store_seqs says N;
- every operation id has one row, and exactly one process got its non-duplicate answer;
- per entity, the versions in the log are 1..V in seq order, V is the entity's version, and its
  audit rows are V, in seq order, each `before` the previous `after`;
- replaying the logged operations through the engine one by one, in seq order, reproduces every
  logged record and the final state of every entity (the batches were serialisable).

Run as `python -m tests.store.test_pg_concurrency ARGS_JSON`, this module is one hammering process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import asyncpg

from chefia_rt.domain import BatchState, Entity, EntityKey, Operation, OpRecord
from chefia_rt.errors import StorageUnavailable
from chefia_rt.store.postgres import PostgresStore
from chefia_rt.store.rows import ENTITY_COLUMNS, OP_COLUMNS, entity_from_row, op_record_from_row
from tests.services import drop_pg_schema, new_pg_schema
from tests.store.test_contract import ENGINE, NOW, sync

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 4
OPS_PER_PROCESS = 300
STORES = ["s1", "s2", "s3"]
TYPES = ["tables", "products", "customers"]
ENTITY_IDS = ["e1", "e2", "e3", "e4"]
FIELDS = ["status", "total", "note", "seats"]
SHARED_OPS = 60  # sent by several processes with the same ids
# A hang guard for the hammer processes (start, run, report), not a time limit under test: on
# a loaded machine four processes contending for the same rows take what they take.
HANG_GUARD = 300.0


def _timestamp(rng: random.Random) -> str:
    # Coarse and random: last_write_wins sees later, earlier and tied client times.
    return f"2024-01-15T10:{rng.randint(0, 9):02d}:{rng.randint(0, 59):02d}.000Z"


def _patch(rng: random.Random, tag: str) -> dict[str, Any]:
    return {f: f"{tag}/{f}" for f in rng.sample(FIELDS, rng.randint(1, 3))}


def shared_operations() -> list[Operation]:
    """The operations every process may send, identical in every process (one seed)."""
    rng = random.Random(2024)
    ops = []
    for n in range(SHARED_OPS):
        entity_type = rng.choice(TYPES)
        ops.append(
            Operation(
                id=f"shared-{n}",
                store_id=rng.choice(STORES),
                entity_type=entity_type,
                entity_id=rng.choice(ENTITY_IDS),
                operation=rng.choice(["UPDATE", "UPDATE", "CREATE"]),
                data=_patch(rng, f"shared-{n}"),
                version=rng.randint(1, 6),
                timestamp=_timestamp(rng),
                terminal_id="shared",
                user_id="u-shared",
            )
        )
    return ops


class Hammer:
    """One process's terminal-like workload, adapting versions to what it has seen."""

    def __init__(self, index: int, seed: int) -> None:
        self.index = index
        self.rng = random.Random(seed)
        self.seen: dict[EntityKey, int] = {}
        self.sent: dict[str, Operation] = {}
        self.retryable: list[Operation] = []
        self.count = 0
        shared = shared_operations()
        self.rng.shuffle(shared)
        self.shared = [op for op in shared if self.rng.random() < 0.6]

    def _version(self, key: EntityKey) -> int:
        known = self.seen.get(key, 0)
        roll = self.rng.random()
        if roll < 0.7:
            return known + 1  # what a terminal sends; stale when another process got there first
        return max(1, known + 1 - self.rng.randint(1, 3))  # an offline terminal's old base

    def next_op(self) -> Operation:
        rng = self.rng
        if self.retryable and rng.random() < 0.05:
            return rng.choice(self.retryable)  # a retry: same id, same content
        if self.shared and rng.random() < 0.15:
            return self.shared.pop()
        self.count += 1
        op_id = f"p{self.index}-{self.count}"
        store_id, entity_type = rng.choice(STORES), rng.choice(TYPES)
        entity_id = rng.choice(ENTITY_IDS)
        key = EntityKey(store_id, entity_type, entity_id)
        roll = rng.random()
        operation, data, version = "UPDATE", _patch(rng, op_id), self._version(key)
        if roll < 0.08:
            operation, version = "CREATE", 1
        elif roll < 0.12 and entity_type == "tables":
            operation, data = "DELETE", {}
        elif roll < 0.2 and entity_type == "products":
            operation = "BULK_UPDATE"
            updates: list[dict[str, Any]] = []
            for other in rng.sample(ENTITY_IDS, rng.randint(2, 3)):
                other_key = EntityKey(store_id, entity_type, other)
                updates.append(
                    {
                        "entity_id": other,
                        "data": _patch(rng, op_id),
                        "version": self._version(other_key),
                    }
                )
            data, entity_id = {"updates": updates}, updates[0]["entity_id"]
        return Operation(
            id=op_id,
            store_id=store_id,
            entity_type=entity_type,
            entity_id=entity_id,
            operation=operation,
            data=data,
            version=version,
            timestamp=_timestamp(rng),
            terminal_id=f"proc-{self.index}",
            user_id=rng.choice([None, f"u{self.index}"]),
        )

    async def run(self, store: PostgresStore, total: int) -> dict[str, Any]:
        answers: list[dict[str, Any]] = []
        unavailable = 0
        done = 0
        while done < total:
            batch = [self.next_op() for _ in range(self.rng.choice([1, 1, 2, 3, 5, 8, 13, 30]))]
            done += len(batch)
            for op in batch:
                self.sent[op.id] = op
            try:
                outcomes = await sync(store, batch)
            except StorageUnavailable as exc:
                unavailable += 1
                answers.append({"id": None, "status": "unavailable", "error": str(exc)})
                continue
            for op, outcome in zip(batch, outcomes, strict=True):
                record = outcome.record
                answers.append(
                    {
                        "id": op.id,
                        "status": outcome.status,
                        "seq": record.seq if record else None,
                        "version": record.version if record else None,
                    }
                )
                if outcome.status != "error" and op not in self.retryable:
                    self.retryable.append(op)
                for entity in outcome.changed:
                    self.seen[entity.key] = entity.version
                if record is not None and record.version is not None:
                    key = op.key
                    self.seen[key] = max(self.seen.get(key, 0), record.version)
            if self.rng.random() < 0.3:
                await asyncio.sleep(0)  # let the other processes' transactions interleave
        return {
            "answers": answers,
            "sent": {op_id: asdict(op) for op_id, op in self.sent.items()},
            "unavailable": unavailable,
        }


async def _child(args: dict[str, Any]) -> None:
    # A commit waiting its turn on a contended row is not a failure here, however slow the
    # machine: only a real error may count as `unavailable` (the command timeout is a hang
    # guard, as HANG_GUARD is for the whole run).
    store = PostgresStore(args["dsn"], max_size=2, command_timeout=HANG_GUARD)
    await store.open()
    try:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the start barrier: all go at once
        result = await Hammer(args["index"], args["seed"]).run(store, args["ops"])
    finally:
        await store.close()
    print(json.dumps(result), flush=True)


# ---- the test -------------------------------------------------------------------------------


async def _spawn(dsn: str, index: int) -> asyncio.subprocess.Process:
    args = {"dsn": dsn, "index": index, "seed": 1000 + index, "ops": OPS_PER_PROCESS}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.store.test_pg_concurrency",
        json.dumps(args),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _hammer(dsn: str) -> list[dict[str, Any]]:
    procs = [await _spawn(dsn, i) for i in range(PROCESSES)]
    try:
        async with asyncio.timeout(HANG_GUARD):
            for proc in procs:
                assert proc.stdout is not None
                line = await proc.stdout.readline()
                if line.strip() != b"ready":
                    err = await proc.stderr.read() if proc.stderr else b""
                    raise AssertionError(f"hammer did not start: {line!r}\n{err.decode()}")
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
            results = []
            for proc in procs:
                out, err = await proc.communicate()
                assert proc.returncode == 0, err.decode()
                results.append(json.loads(out.decode().strip().splitlines()[-1]))
            return results
    except TimeoutError:
        raise AssertionError(f"hang guard: the hammer processes ran {HANG_GUARD:g} s") from None
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                with contextlib.suppress(ProcessLookupError):
                    await proc.wait()


def _touched_versions(record: OpRecord) -> list[tuple[EntityKey, int]]:
    """(entity, version) of every change a logged (seq'd) operation made."""
    if record.operation == "BULK_UPDATE":
        return [
            (EntityKey(record.store_id, record.entity_type, u["entity_id"]), u["version"])
            for u in record.data["updates"]
        ]
    assert record.version is not None
    return [(EntityKey(record.store_id, record.entity_type, record.entity_id), record.version)]


async def test_processes_hammering_the_same_entities_never_fork_or_skip() -> None:
    dsn = await new_pg_schema()
    try:
        migrated = PostgresStore(dsn)
        await migrated.open()  # once, before the processes race to open theirs
        await migrated.close()
        results = await _hammer(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            records = [
                op_record_from_row(r)
                for r in await conn.fetch(f"SELECT {OP_COLUMNS} FROM sync_operations")
            ]
            entities = {
                e.key: e
                for e in (
                    entity_from_row(r)
                    for r in await conn.fetch(f"SELECT {ENTITY_COLUMNS} FROM entities")
                )
            }
            last_seqs = dict(await conn.fetch("SELECT store_id, last_seq FROM store_seqs"))
            audit = await conn.fetch(
                "SELECT operation_id, store_id, entity_type, entity_id, changes::text "
                "FROM audit_logs_master ORDER BY id"
            )
            repeated = await conn.fetch(
                "SELECT id FROM sync_operations GROUP BY id HAVING count(*) > 1"
            )
        finally:
            await conn.close()
    finally:
        await drop_pg_schema(dsn)

    assert sum(r["unavailable"] for r in results) == 0, "a commit failed under contention"
    sent: dict[str, Operation] = {}
    for result in results:
        for op_id, fields in result["sent"].items():
            op = Operation(**fields)
            assert sent.setdefault(op_id, op) == op, "one id, two contents: a broken test"

    # Each operation id: one row, one first answer, the rest duplicates of it.
    assert not repeated
    by_id = {r.id: r for r in records}
    answers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        for answer in result["answers"]:
            answers[answer["id"]].append(answer)
    statuses = [a["status"] for found in answers.values() for a in found]
    assert statuses.count("duplicate") > 20 and statuses.count("error") < len(statuses) // 10
    assert {"applied", "merged", "resolved"} <= set(statuses), set(statuses)
    for op_id, found in answers.items():
        if all(a["status"] == "error" for a in found):
            assert op_id not in by_id  # a DELETE of nothing: never logged
            continue
        first = [a for a in found if a["status"] != "duplicate"]
        assert len(first) == 1, (op_id, found)
        row = by_id[op_id]
        for answer in found:
            assert (answer["seq"], answer["version"]) == (row.seq, row.version), (op_id, answer)
    assert set(by_id) == {i for i, f in answers.items() if any(a["status"] != "error" for a in f)}

    # Per store: seqs exactly 1..N, and store_seqs agrees.
    logged = sorted((r for r in records if r.seq is not None), key=lambda r: (r.store_id, r.seq))
    for store_id in STORES:
        seqs = [r.seq for r in logged if r.store_id == store_id]
        assert seqs == list(range(1, len(seqs) + 1)), f"{store_id}: seqs not gapless/unique"
        assert last_seqs.get(store_id, 0) == len(seqs)
        assert len(seqs) > 30, f"{store_id}: too little contention to test anything"

    # Per entity: log versions 1..V in seq order; V audit rows in the same order, chained.
    changes: dict[EntityKey, list[tuple[str, int]]] = defaultdict(list)
    for record in logged:
        for key, version in _touched_versions(record):
            changes[key].append((record.id, version))
    assert set(changes) == set(entities)
    trail: dict[EntityKey, list[tuple[str, Any]]] = defaultdict(list)
    for row in audit:
        trail[EntityKey(row[1], row[2], row[3])].append((row[0], json.loads(row[4])))
    for key, entity in entities.items():
        versions = [v for _, v in changes[key]]
        assert versions == list(range(1, entity.version + 1)), f"{key}: versions forked"
        assert [op_id for op_id, _ in trail[key]] == [op_id for op_id, _ in changes[key]], key
        previous_after = None
        for _, change in trail[key]:
            assert change["before"] == previous_after, f"{key}: audit chain broken"
            previous_after = change["after"]
        assert previous_after == (None if entity.deleted else entity.data)

    # Replay: the logged operations, one by one in seq order through the engine, give exactly
    # the logged records and the final entities.
    replayed: dict[EntityKey, Entity] = {}
    for store_id in STORES:
        seq = 0
        for record in (r for r in logged if r.store_id == store_id):
            op = sent[record.id]
            state = BatchState({}, dict(replayed), {}, {store_id: seq})
            (outcome,), _ = ENGINE.decide([op], state, NOW)
            assert outcome.record is not None
            got = outcome.record
            assert got == replace(record, server_time=got.server_time), record.id
            replayed.update((e.key, e) for e in outcome.changed)
            seq = outcome.record.seq or seq
    assert replayed == entities


if __name__ == "__main__":
    asyncio.run(_child(json.loads(sys.argv[1])))
