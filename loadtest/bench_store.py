"""Storage benchmark: our batched COPY commit against one transaction per operation.

    python -m loadtest.bench_store [--dsn DSN] [--ops N] [--batch B] [--baseline-ops M]

Prints ONE JSON line. Both phases run in the same invocation, each in its own fresh schema of the
DSN's database (dropped afterwards unless --keep), on the same workload: UPDATEs of the orders of
many stores (the first write of an order creates it), each applied, as a rush hour produces them.

- ours: PostgresStore.commit with the real Engine deciding inside the transaction, `--batch`
  operations per transaction (the node's group commit), log and audit rows bulk-loaded with COPY.
- baseline: the naive design, one transaction per operation, one statement per row: bump the
  store's seq, read the entity FOR UPDATE (its version and state are needed to check the version
  and write the full state), upsert it, INSERT the log row, INSERT the audit row.

Measured per phase: wall time → committed ops/s; PostgreSQL CPU → µs per op, as the sum of
utime + stime (/proc/<pid>/stat) over every process whose name starts with "postgres" (backends,
WAL writer, checkpointer, ...) before and after the phase, so WAL and background work count too;
the CPU of the phase's own backend alone (less noisy on a shared server); and this client's CPU.
The connections are opened before the first reading and closed after the last, so no backend
starts or exits inside a phase. On a server whose processes this machine cannot see, the CPU
figures are null. Ratios are ours / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from chefia_rt.domain import BatchState, BatchWrite, EntityKey, Operation
from chefia_rt.protocol.messages import format_timestamp
from chefia_rt.store.base import BatchRequest
from chefia_rt.store.postgres import PostgresStore
from chefia_rt.sync.engine import Engine, Outcome, conflict_id_for

DEFAULT_DSN = os.environ.get(
    "CHEFIA_BENCH_PG_DSN",
    os.environ.get("CHEFIA_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
)
CLOCK_TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")
STATUSES = ["open", "preparing", "ready", "served", "paid"]


# ---- PostgreSQL CPU from /proc --------------------------------------------------------------


def _ticks(pid: str) -> int | None:
    """utime + stime of a process named postgres*, None for any other (or a vanished) one."""
    try:
        stat = Path("/proc", pid, "stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may hold spaces or parentheses itself: split at the last ')'.
    head, _, rest = stat.rpartition(")")
    if not head[head.index("(") + 1 :].startswith("postgres"):
        return None
    fields = rest.split()
    return int(fields[11]) + int(fields[12])  # stat fields 14 and 15


def postgres_cpu() -> dict[str, int]:
    """pid → CPU ticks of every process named postgres* on this machine."""
    found = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit() and (ticks := _ticks(pid)) is not None:
            found[pid] = ticks
    return found


def cpu_used_us(
    before: dict[str, int], after: dict[str, int], pids: set[str] | None = None
) -> float:
    """CPU µs between two readings (a process that started in between counts from zero)."""
    return CLOCK_TICK_US * sum(
        ticks - before.get(pid, 0) for pid, ticks in after.items() if pids is None or pid in pids
    )


class Meter:
    """Wall time, PostgreSQL CPU (all processes, and the given backends) and client CPU."""

    def __init__(self, backend_pids: set[str]) -> None:
        self.backend_pids = backend_pids

    def __enter__(self) -> Meter:
        self.pg = postgres_cpu()
        self.client = time.process_time()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.client_us = (time.process_time() - self.client) * 1e6
        after = postgres_cpu()
        self.visible = bool(after)
        self.pg_us = cpu_used_us(self.pg, after)
        self.backend_us = cpu_used_us(self.pg, after, self.backend_pids)
        self.backend_seen = bool(self.backend_pids & after.keys())

    def figures(self, ops: int, transactions: int) -> dict[str, Any]:
        return {
            "ops": ops,
            "transactions": transactions,
            "seconds": round(self.seconds, 3),
            "ops_per_s": round(ops / self.seconds, 1),
            "pg_cpu_us_per_op": round(self.pg_us / ops, 2) if self.visible else None,
            "backend_cpu_us_per_op": (
                round(self.backend_us / ops, 2) if self.backend_seen else None
            ),
            "client_cpu_us_per_op": round(self.client_us / ops, 2),
        }


# ---- the workload ---------------------------------------------------------------------------


class Workload:
    """UPDATEs of random orders of `stores` stores, each at its next version (all applied)."""

    def __init__(self, seed: int, stores: int, entities: int, tag: str) -> None:
        self.rng = random.Random(seed)
        self.stores = [f"{tag}-store-{n:03d}" for n in range(stores)]
        self.entities = entities
        self.tag = tag
        self.versions: dict[EntityKey, int] = {}
        self.count = 0

    def next(self) -> Operation:
        rng = self.rng
        self.count += 1
        store_id = rng.choice(self.stores)
        key = EntityKey(store_id, "orders", f"order-{rng.randrange(self.entities):05d}")
        version = self.versions.get(key, 0) + 1
        self.versions[key] = version
        items = [
            {"sku": f"p{rng.randrange(500)}", "qty": rng.randint(1, 4), "price": 12.5}
            for _ in range(rng.randint(1, 4))
        ]
        return Operation(
            id=f"{self.tag}-{self.count}",
            store_id=store_id,
            entity_type="orders",
            entity_id=key.entity_id,
            operation="UPDATE",
            data={"status": rng.choice(STATUSES), "items": items, "total": 12.5 * len(items)},
            version=version,
            timestamp=format_timestamp(datetime.now(UTC)),
            terminal_id=f"pos-{rng.randrange(10)}",
            user_id="bench",
            priority="medium",
        )

    def take(self, n: int) -> list[Operation]:
        return [self.next() for _ in range(n)]


def request_for(ops: Sequence[Operation]) -> BatchRequest:
    """The BatchRequest the node builds for a batch (node.Worker._commit)."""
    request = BatchRequest()
    for op in ops:
        request.operation_keys.append(op.op_key)
        request.conflict_keys.append((op.store_id, conflict_id_for(op.id)))
        request.entity_keys.extend(op.touched_keys())
    request.store_ids = sorted({op.store_id for op in ops})
    return request


# ---- the two phases -------------------------------------------------------------------------


async def run_ours(dsn: str, ops: int, batch: int, workload: Workload) -> dict[str, Any]:
    engine = Engine()
    store = PostgresStore(dsn, min_size=1, max_size=1)
    await store.open()
    try:

        async def commit(items: list[Operation]) -> list[Outcome]:
            now = format_timestamp(datetime.now(UTC))

            def decide(state: BatchState) -> tuple[list[Outcome], BatchWrite]:
                return engine.decide(items, state, now)

            return await store.commit(request_for(items), decide)

        await commit(Workload(1, 4, 50, "warm-ours").take(batch))  # plans and caches warm
        pid = await store._with(lambda c: c.fetchval("SELECT pg_backend_pid()"))
        batches = [workload.take(min(batch, ops - n)) for n in range(0, ops, batch)]
        applied = 0
        with Meter({str(pid)}) as meter:
            for items in batches:
                outcomes = await commit(items)
                applied += sum(o.status == "applied" for o in outcomes)
        if applied != ops:
            raise RuntimeError(f"ours: {applied} of {ops} operations applied")
        again = await store._with(lambda c: c.fetchval("SELECT pg_backend_pid()"))
        if again != pid:
            raise RuntimeError("ours: the connection was replaced during the phase")
    finally:
        await store.close()
    return meter.figures(ops, len(batches))


BASELINE_SQL = {
    "seq": (
        "INSERT INTO store_seqs (store_id, last_seq) VALUES ($1, 1) ON CONFLICT (store_id) "
        "DO UPDATE SET last_seq = store_seqs.last_seq + 1 RETURNING last_seq"
    ),
    "read": (
        "SELECT version, data FROM entities "
        "WHERE store_id = $1 AND entity_type = $2 AND entity_id = $3 FOR UPDATE"
    ),
    "entity": (
        "INSERT INTO entities (store_id, entity_type, entity_id, version, data, deleted, "
        "timestamp, updated_by, field_versions) VALUES ($1, $2, $3, $4, $5, false, $6, $7, $8) "
        "ON CONFLICT (store_id, entity_type, entity_id) DO UPDATE SET version = excluded.version, "
        "data = excluded.data, timestamp = excluded.timestamp, updated_by = excluded.updated_by, "
        "field_versions = excluded.field_versions, updated_at = now()"
    ),
    "log": (
        "INSERT INTO sync_operations (id, store_id, entity_type, entity_id, operation, data, "
        "version, seq, status, conflict_resolved, terminal_id, user_id, priority, timestamp, "
        "server_time, deleted) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'applied', false, $9, $10, $11, $12, $13, false)"
    ),
    "audit": (
        "INSERT INTO audit_logs_master (operation_id, store_id, entity_type, entity_id, "
        "operation, terminal_id, user_id, changes, sync_status, conflict_resolved, timestamp) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'applied', false, now())"
    ),
}


async def naive_commit(conn: asyncpg.Connection, op: Operation) -> None:
    """One operation, one transaction, one statement per row."""
    now = format_timestamp(datetime.now(UTC))
    async with conn.transaction():
        seq = await conn.fetchval(BASELINE_SQL["seq"], op.store_id)
        row = await conn.fetchrow(BASELINE_SQL["read"], op.store_id, "orders", op.entity_id)
        before = row["data"] if row is not None else None
        version = (row["version"] if row is not None else 0) + 1
        if version != op.version:
            raise RuntimeError(f"baseline: {op.id} expected version {op.version}, got {version}")
        after = {**(before or {}), **op.data}
        field_versions = {f: [version, op.timestamp] for f in op.data}
        await conn.execute(
            BASELINE_SQL["entity"],
            op.store_id,
            op.entity_type,
            op.entity_id,
            version,
            after,
            op.timestamp,
            op.terminal_id,
            field_versions,
        )
        await conn.execute(
            BASELINE_SQL["log"],
            op.id,
            op.store_id,
            op.entity_type,
            op.entity_id,
            op.operation,
            after,
            version,
            seq,
            op.terminal_id,
            op.user_id,
            op.priority,
            op.timestamp,
            now,
        )
        await conn.execute(
            BASELINE_SQL["audit"],
            op.id,
            op.store_id,
            op.entity_type,
            op.entity_id,
            op.operation,
            op.terminal_id,
            op.user_id,
            {"before": before, "after": after},
        )


async def run_baseline(dsn: str, ops: int, workload: Workload) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        for op in Workload(1, 4, 50, "warm-naive").take(50):
            await naive_commit(conn, op)
        pid = conn.get_server_pid()
        work = workload.take(ops)
        with Meter({str(pid)}) as meter:
            for op in work:
                await naive_commit(conn, op)
    finally:
        await conn.close()
    return meter.figures(ops, ops)


# ---- plumbing -------------------------------------------------------------------------------


def with_search_path(dsn: str, schema: str) -> str:
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urlunsplit(parts._replace(query=urlencode(query)))


def _ratio(ours: float | None, baseline: float | None) -> float | None:
    if ours is None or not baseline:
        return None
    return round(ours / baseline, 4)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    schemas = {"ours": f"bench_{tag}_copy", "baseline": f"bench_{tag}_naive"}
    admin = await asyncpg.connect(with_search_path(args.dsn, "public"), timeout=10)
    try:
        version = await admin.fetchval("SHOW server_version")
        for schema in schemas.values():
            await admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            # The baseline's tables: the same migrations, so both write the same schema.
            migrated = PostgresStore(with_search_path(args.dsn, schemas["baseline"]))
            await migrated.open()
            await migrated.close()
            # The same workload (same seed) for both, in separate schemas.
            ours = await run_ours(
                with_search_path(args.dsn, schemas["ours"]),
                args.ops,
                args.batch,
                Workload(args.seed, args.stores, args.entities, "op"),
            )
            baseline = await run_baseline(
                with_search_path(args.dsn, schemas["baseline"]),
                args.baseline_ops,
                Workload(args.seed, args.stores, args.entities, "op"),
            )
        finally:
            if not args.keep:
                for schema in schemas.values():
                    await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await admin.close()
    return {
        "bench": "store_commit",
        "postgres": version,
        "batch": args.batch,
        "stores": args.stores,
        "entities_per_store": args.entities,
        "cpu_source": "/proc/<pid>/stat utime+stime of processes named postgres*",
        "ours": ours,
        "baseline": baseline,
        "ratio": {
            key: _ratio(ours[key], baseline[key])
            for key in (
                "ops_per_s",
                "pg_cpu_us_per_op",
                "backend_cpu_us_per_op",
                "client_cpu_us_per_op",
            )
        },
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_store",
        description="Batched COPY commit vs one transaction per operation; prints one JSON line.",
    )
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="PostgreSQL DSN (default %(default)s)")
    parser.add_argument("--ops", type=_positive, default=20_000, help="operations, ours")
    parser.add_argument("--batch", type=_positive, default=200, help="operations per batch")
    parser.add_argument(
        "--baseline-ops",
        type=_positive,
        default=None,
        help="operations of the (slow) baseline; default min(ops, 3000)",
    )
    parser.add_argument("--stores", type=_positive, default=50)
    parser.add_argument("--entities", type=_positive, default=200, help="orders per store")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the two schemas")
    args = parser.parse_args(argv)
    if args.baseline_ops is None:
        args.baseline_ops = min(args.ops, 3000)
    return args


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return number


def print_result(prog: str, run: Callable[[], dict[str, Any]]) -> int:
    """Run a benchmark and print its one JSON line; a failure is one line on stderr, exit 1."""
    try:
        result = run()
    except (OSError, asyncpg.PostgresError, RuntimeError) as exc:
        print(f"{prog}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, separators=(",", ":")))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return print_result("bench_store", lambda: asyncio.run(bench(args)))


if __name__ == "__main__":
    sys.exit(main())
