"""Backup and restore (docs/operations.md §2): consistent archives under write load, exact round
trips between SQLite and PostgreSQL, refusal of damaged archives before anything is touched,
retention, the command line, the systemd units, and what a terminal sees after a restore.

The expectations here read the databases and the archives on their own (sqlite3, asyncpg,
tarfile, gzip), not through chefia_rt.backup, so a bug there cannot hide itself.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chefia_rt.backup import (
    BackupError,
    Progress,
    create_backup,
    prune_backups,
    restore_archive,
    verify_archive,
)
from chefia_rt.bus.base import CacheEntry
from chefia_rt.bus.redis import RedisBus
from chefia_rt.config import Settings, load_settings
from chefia_rt.domain import EntityKey
from chefia_rt.schedule import cron_to_oncalendar
from chefia_rt.store.base import SessionRecord, Store
from chefia_rt.store.postgres import PostgresStore
from chefia_rt.store.sqlite import SQLiteStore
from tests.bus.conftest import drop_prefix, redis_reachable, unique_prefix
from tests.helpers import RunningServer, Terminal, eventually, hang_guarded, op, running_server
from tests.services import PG_DSN, REDIS_URL, drop_pg_schema, new_pg_schema, service_missing
from tests.store.test_contract import STAMPS, UNICODE, make_op, sync

ROOT = Path(__file__).resolve().parent.parent
KINDS = ["sqlite", "postgresql"]

# What the tables hold, independently of chefia_rt.backup.
KEYS = {
    "store_seqs": ("store_id",),
    "entities": ("store_id", "entity_type", "entity_id"),
    "sync_operations": ("id",),
    "audit_logs_master": ("id",),
    "conflicts": ("id",),
    "websocket_connections": ("session_id",),
}
JSON_COLUMNS = {
    "entities": {"data", "field_versions"},
    "sync_operations": {"data"},
    "audit_logs_master": {"changes"},
    "conflicts": {"operation", "server_data"},
}
BOOL_COLUMNS = {"deleted", "conflict_resolved"}
TIME_COLUMNS = {"entities": {"updated_at"}, "audit_logs_master": {"timestamp"}}
QUIET = Progress(io.StringIO(), tty=False)

Rows = dict[str, list[dict[str, Any]]]


# ---- databases ----------------------------------------------------------------------------------


@pytest.fixture
async def pg_schemas() -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Makes fresh PostgreSQL schemas (a DSN each); all dropped after the test."""
    made: list[str] = []

    async def make() -> str:
        dsn = await new_pg_schema()
        made.append(dsn)
        return dsn

    yield make
    for dsn in made:
        await drop_pg_schema(dsn)


class Databases:
    """A new, empty database of a kind: a SQLite file under tmp_path or a PostgreSQL schema."""

    def __init__(self, tmp_path: Path, pg: Callable[[], Awaitable[str]]) -> None:
        self.tmp_path = tmp_path
        self.pg = pg
        self.count = 0

    async def url(self, kind: str) -> str:
        self.count += 1
        if kind == "sqlite":
            return f"sqlite:///{self.tmp_path / f'db{self.count}' / 'chefia.db'}"
        return await self.pg()

    def settings(self, url: str, **overrides: Any) -> Settings:
        overrides.setdefault("backup_dir", str(self.tmp_path / "backups"))
        return load_settings(database_url=url, **overrides)


@pytest.fixture
def databases(tmp_path: Path, pg_schemas: Callable[[], Awaitable[str]]) -> Databases:
    return Databases(tmp_path, pg_schemas)


async def open_store(url: str) -> Store:
    store: Store
    if url.startswith("sqlite:///"):
        store = SQLiteStore(url.removeprefix("sqlite:///"))
    else:
        store = PostgresStore(url)
    await store.open()
    return store


def _normalize(table: str, row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if table == "store_seqs":
        out.pop("epoch", None)  # never carried: a restore starts a new one
    for column in JSON_COLUMNS.get(table, set()):
        if isinstance(out[column], str):
            out[column] = json.loads(out[column])
    for column in BOOL_COLUMNS & out.keys():
        out[column] = bool(out[column])
    for column in TIME_COLUMNS.get(table, set()):
        value = out[column]
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        out[column] = value.astimezone(UTC)
    return out


def _sorted(rows: Rows) -> Rows:
    return {
        table: sorted(found, key=lambda r, t=table: tuple(r[k] for k in KEYS[t]))  # type: ignore[misc]
        for table, found in rows.items()
    }


async def dump(url: str) -> Rows:
    """Every row of every table of the archive, normalized: JSON decoded, flags as bool,
    timestamps as aware datetimes."""
    rows: Rows = {}
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        db.row_factory = sqlite3.Row
        try:
            for table in KEYS:
                rows[table] = [
                    _normalize(table, dict(r)) for r in db.execute(f"SELECT * FROM {table}")
                ]
        finally:
            db.close()
    else:
        conn = await asyncpg.connect(url)
        try:
            for table in KEYS:
                rows[table] = [
                    _normalize(table, dict(r)) for r in await conn.fetch(f"SELECT * FROM {table}")
                ]
        finally:
            await conn.close()
    return _sorted(rows)


async def pg_tables(dsn: str) -> list[str]:
    schema = dsn.rsplit("search_path=", 1)[1]
    conn = await asyncpg.connect(PG_DSN)
    try:
        found = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
    finally:
        await conn.close()
    return sorted(r[0] for r in found)


def exists(path: Path | str) -> bool:
    return Path(path).exists()


def names_in(directory: Path | str) -> set[str]:
    return {p.name for p in Path(directory).iterdir()}


def truncate(path: Path, size: int | None = None) -> None:
    """Cut a file at `size` (default: half of it)."""
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2 if size is None else size)


async def untouched(url: str) -> bool:
    """The target database was never opened: no SQLite file, no table in the schema."""
    if url.startswith("sqlite:///"):
        return not exists(url.removeprefix("sqlite:///"))
    return await pg_tables(url) == []


OLD_MONTH = "2024-01-15T10:00:00.000000Z"


async def populate(store: Store) -> None:
    """A bit of everything: two stores, every policy, tombstones, a losing write (no seq), a
    pending manual conflict, sessions, unicode and the characters COPY escapes, audit rows of
    an old month and of this one."""
    awkward = {"path": "C:\\temp\\new", "text": "line1\nline2\ttab\r", "q": '"q" \\"', "nul": ""}
    await sync(
        store,
        [
            make_op("c1", "t1", {"status": "open", **UNICODE}, operation="CREATE"),
            make_op(
                "c2",
                "p1",
                {"price": 12.5, "tags": ["a", ["b"]], "none": None, "big": 2**53 + 1},
                entity_type="products",
                operation="CREATE",
                store_id="s2",
            ),
            make_op("c3", "cu1", awkward, entity_type="customers", operation="CREATE"),
        ],
        now=OLD_MONTH,
    )
    await sync(store, [make_op("u1", "t1", {"status": "closed"}, version=2, timestamp=STAMPS[2])])
    # Loses last-write-wins: kept in the log without a seq.
    await sync(store, [make_op("l1", "t1", {"status": "x"}, version=2, timestamp=STAMPS[1])])
    await sync(
        store,
        [
            make_op(
                "d1",
                "p1",
                operation="DELETE",
                version=2,
                store_id="s2",
                entity_type="products",
            )
        ],
    )
    await sync(
        store,
        [
            make_op(
                "k1", "k1", {"amount": 100}, entity_type="cashier_operations", operation="CREATE"
            )
        ],
    )
    # A pending manual conflict.
    await sync(
        store, [make_op("k2", "k1", {"amount": 120}, entity_type="cashier_operations", version=5)]
    )
    await store.record_session(
        SessionRecord("sess-1", "pos-1", "pos", "s1", "u1", "2024-01-15T09:00:00.000000Z")
    )
    await store.record_session(
        SessionRecord(
            "sess-2",
            "kds-1",
            "kds",
            "s2",
            None,
            "2024-01-15T09:00:00.000000Z",
            "2024-01-15T11:00:00.000000Z",
            1234,
            5678,
            9,
            10,
            1001,
        )
    )


async def populated(url: str) -> None:
    store = await open_store(url)
    try:
        await populate(store)
    finally:
        await store.close()


def read_archive(path: Path) -> tuple[dict[str, Any], Rows]:
    """The manifest and the rows of an archive, read with nothing but tarfile and gzip."""
    rows: Rows = {}
    with tarfile.open(path, "r:") as tar:
        names = tar.getnames()
        assert names[0] == "manifest.json"
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        for name in names[1:]:
            data = gzip.decompress(tar.extractfile(name).read())  # type: ignore[union-attr]
            table = name.removesuffix(".jsonl.gz")
            rows[table] = [
                _normalize(table, json.loads(line)) for line in data.decode().splitlines()
            ]
    return manifest, _sorted(rows)


# ---- a consistent archive of a server under write load -----------------------------------------


async def write_until(
    server: RunningServer,
    store: str,
    terminal_id: str,
    stop: asyncio.Event,
    confirmed_at: list[tuple[str, float, float]],
    history: asyncio.Event,
) -> None:
    """One terminal updating its own table as fast as it is confirmed, until `stop`, noting
    (store, sent, confirmed) times of each write; `history` is set once 600 writes are
    confirmed in all."""
    async with server.terminal(terminal_id, store=store) as terminal:
        version = 0
        while not stop.is_set():
            version += 1
            sent = time.monotonic()
            await terminal.send(
                op(
                    f"{terminal_id}-{version}",
                    f"table-{terminal_id}",
                    {"n": version, "by": terminal_id, "nome": "Açaí 🍧"},
                    operation="CREATE" if version == 1 else "UPDATE",
                    version=version,
                )
            )
            conf = await terminal.until("sync_confirmation")
            assert conf["status"] == "applied", conf
            confirmed_at.append((store, sent, time.monotonic()))
            if len(confirmed_at) >= 600:
                history.set()


def check_consistent(manifest: dict[str, Any], rows: Rows) -> None:
    """Every op up to a store's watermark is in the log, none beyond it, and the entities and
    the audit log are exactly what those ops produced."""
    watermarks = manifest["watermarks"]
    assert {r["store_id"]: r["last_seq"] for r in rows["store_seqs"]} == watermarks
    last_op: dict[tuple[str, str, str], dict[str, Any]] = {}
    for store, watermark in watermarks.items():
        ops = sorted(
            (r for r in rows["sync_operations"] if r["store_id"] == store),
            key=lambda r: r["seq"],
        )
        assert [r["seq"] for r in ops] == list(range(1, watermark + 1)), store
        for record in ops:
            last_op[(store, record["entity_type"], record["entity_id"])] = record
    entities = {(e["store_id"], e["entity_type"], e["entity_id"]): e for e in rows["entities"]}
    assert entities.keys() == last_op.keys()
    for key, entity in entities.items():
        assert (entity["version"], entity["data"]) == (
            last_op[key]["version"],
            last_op[key]["data"],
        )
    assert len(rows["audit_logs_master"]) == sum(watermarks.values())
    assert {a["operation_id"] for a in rows["audit_logs_master"]} == {
        r["id"] for r in rows["sync_operations"]
    }


@pytest.mark.parametrize("kind", KINDS)
async def test_backup_under_write_load_is_consistent(
    kind: str, tmp_path: Path, databases: Databases
) -> None:
    url = await databases.url(kind)
    stop, history = asyncio.Event(), asyncio.Event()
    confirmed_at: list[tuple[str, float, float]] = []
    async with running_server(tmp_path, database_url=url) as server:
        writers = [
            asyncio.create_task(
                write_until(server, store, f"pos-{store}-{n}", stop, confirmed_at, history)
            )
            for store in ("s1", "s2")
            for n in range(3)
        ]
        try:
            await hang_guarded(history.wait(), "600 writes before the backup", timeout=300)
            started = time.monotonic()
            result = await create_backup(
                server.settings, output_dir=tmp_path / "backups", progress=QUIET
            )
            ended = time.monotonic()
            # And writes after it in each store (sent once it ended, so beyond its watermark):
            # waited for by their confirmations, not by time.
            await eventually(
                lambda: {s for s, sent, _ in confirmed_at if sent > ended} == {"s1", "s2"},
                what="writes in both stores after the backup",
            )
        finally:
            stop.set()
            await asyncio.gather(*writers)
        # Writes went on before and after the snapshot (the watermarks below sit strictly
        # between); how many land inside the backup's window depends on the machine's speed.
        during = [t for _, _, t in confirmed_at if started <= t <= ended]
        print(
            f"{len(during)} writes confirmed while the {kind} backup ran ({ended - started:.3f}s)"
        )
        last_seqs = {s: (await server.worker.store.log_bounds(s)).last_seq for s in ("s1", "s2")}

    manifest, rows = read_archive(result.path)
    assert manifest["source"]["kind"] == kind
    watermarks = manifest["watermarks"]
    assert set(watermarks) == {"s1", "s2"}
    assert all(0 < watermarks[s] < last_seqs[s] for s in watermarks), (watermarks, last_seqs)
    check_consistent(manifest, rows)
    for table, info in manifest["members"].items():
        assert info["rows"] == len(rows[table.removesuffix(".jsonl.gz")])

    # And it restores, as it is, into a fresh database of the other kind.
    target = await databases.url("postgresql" if kind == "sqlite" else "sqlite")
    await restore_archive(databases.settings(target), result.path, progress=QUIET)
    restored = await dump(target)
    assert {t: r for t, r in restored.items()} == rows


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "target"),
    [(s, t) for s in KINDS for t in KINDS],
    ids=lambda kind: kind,
)
async def test_restore_reproduces_every_row(
    source: str, target: str, databases: Databases, tmp_path: Path
) -> None:
    source_url = await databases.url(source)
    await populated(source_url)
    before = await dump(source_url)
    assert before["conflicts"] and any(r["seq"] is None for r in before["sync_operations"])

    result = await create_backup(databases.settings(source_url), progress=QUIET)
    assert result.path.parent == tmp_path / "backups"
    assert result.path.stat().st_mode & 0o777 == 0o600  # business data
    target_url = await databases.url(target)
    restored = await restore_archive(databases.settings(target_url), result.path, progress=QUIET)
    assert restored.rows == {t: len(r) for t, r in before.items() if t in restored.rows}

    after = await dump(target_url)
    for table in KEYS:
        assert after[table] == before[table], table
    assert after == await dump(source_url) == before  # the source is unchanged

    # The restored store carries on where the archive ended: seqs, versions, audit ids.
    store = await open_store(target_url)
    try:
        assert (await store.log_bounds("s1")).last_seq == 4
        outcomes = await sync(
            store, [make_op("n1", "t1", {"status": "again"}, version=3, timestamp=STAMPS[3])]
        )
        assert outcomes[0].record is not None
        assert (outcomes[0].record.seq, outcomes[0].record.version) == (5, 3)
        duplicate = await sync(store, [make_op("c1", "t1", {"status": "open"}, operation="CREATE")])
        assert duplicate[0].status == "duplicate"
    finally:
        await store.close()
    audit_ids = [r["id"] for r in (await dump(target_url))["audit_logs_master"]]
    assert audit_ids == sorted(set(audit_ids)) and audit_ids[-1] > max(
        r["id"] for r in before["audit_logs_master"]
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_restore_starts_a_new_epoch_for_every_store(kind: str, databases: Databases) -> None:
    """A restored store's seqs restart below what its terminals may hold: its epoch changes,
    also when restoring over the very database the archive came from (--force)."""
    url = await databases.url(kind)
    await populated(url)
    store = await open_store(url)
    try:
        before = {s: await store.log_bounds(s) for s in ("s1", "s2")}
    finally:
        await store.close()
    result = await create_backup(databases.settings(url), progress=QUIET)
    await restore_archive(databases.settings(url), result.path, force=True, progress=QUIET)
    store = await open_store(url)
    try:
        after = {s: await store.log_bounds(s) for s in ("s1", "s2")}
    finally:
        await store.close()
    for s in ("s1", "s2"):
        assert after[s].last_seq == before[s].last_seq
        assert after[s].epoch and after[s].epoch != before[s].epoch
    assert after["s1"].epoch != after["s2"].epoch


async def test_postgres_restore_puts_audit_rows_into_their_month(
    databases: Databases,
) -> None:
    source = await databases.url("sqlite")
    await populated(source)
    result = await create_backup(databases.settings(source), progress=QUIET)
    target = await databases.url("postgresql")
    await restore_archive(databases.settings(target), result.path, progress=QUIET)
    now = datetime.now(UTC)
    conn = await asyncpg.connect(target)
    try:
        where = {
            r[0]: r[1]
            for r in await conn.fetch(
                "SELECT tableoid::regclass::text, count(*) FROM audit_logs_master GROUP BY 1"
            )
        }
    finally:
        await conn.close()
    assert where == {"audit_logs_2024_01": 3, f"audit_logs_{now:%Y_%m}": 3}, where


# ---- refusing damaged archives ------------------------------------------------------------------


@pytest.fixture
async def archive(databases: Databases) -> Path:
    url = await databases.url("sqlite")
    await populated(url)
    return (await create_backup(databases.settings(url), progress=QUIET)).path


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path, "r:") as tar:
        return {m.name: m for m in tar.getmembers()}


def read(path: Path) -> bytes:
    return path.read_bytes()


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def rewrite(
    path: Path,
    *,
    manifest: Callable[[dict[str, Any]], None] | None = None,
    drop: str | None = None,
    extra: tuple[str, bytes] | None = None,
) -> None:
    """Rebuild an archive with a changed manifest, a member left out or one added."""
    with tarfile.open(path, "r:") as tar:
        contents = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:", format=tarfile.USTAR_FORMAT) as out:
        for info, data in contents:
            if info.name == drop:
                continue
            if info.name == "manifest.json" and manifest is not None:
                body = json.loads(data)
                manifest(body)
                data = json.dumps(body).encode()
                info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        if extra is not None:
            info = tarfile.TarInfo(extra[0])
            info.size = len(extra[1])
            out.addfile(info, io.BytesIO(extra[1]))
    path.write_bytes(buffer.getvalue())


def cut_points(path: Path) -> dict[str, int]:
    found = members(path)
    manifest, entities = found["manifest.json"], found["entities.jsonl.gz"]
    last = max(found.values(), key=lambda m: m.offset)
    data_end = last.offset_data + -(-last.size // 512) * 512
    return {
        "inside the manifest": manifest.offset_data + manifest.size // 2,
        "inside a header": entities.offset + 100,
        "inside a member": entities.offset_data + entities.size // 2,
        "at a member boundary": entities.offset,
        "before the end blocks": data_end,
        "inside the end blocks": data_end + 512,
        "a few bytes": 200,
    }


async def assert_refused(
    path: Path, message: str, databases: Databases, kinds: list[str] = KINDS
) -> None:
    """verify and restore (into each kind of target) refuse with `message` in one line, and
    the targets are never even opened."""
    with pytest.raises(BackupError) as refused:
        verify_archive(path)
    text = str(refused.value)
    assert message in text and "\n" not in text, text
    for kind in kinds:
        target = await databases.url(kind)
        with pytest.raises(BackupError, match=re.escape(message)):
            await restore_archive(databases.settings(target), path, progress=QUIET)
        assert await untouched(target), f"{kind} target was touched"


async def test_a_flipped_byte_names_the_damaged_member(archive: Path, databases: Databases) -> None:
    entities = members(archive)["entities.jsonl.gz"]
    flip(archive, entities.offset_data + entities.size // 2)
    await assert_refused(archive, "checksum mismatch in entities.jsonl.gz", databases)


async def test_a_flipped_bit_in_a_gzip_header_is_still_a_checksum_mismatch(
    archive: Path, databases: Databases
) -> None:
    log = members(archive)["sync_operations.jsonl.gz"]
    flip(archive, log.offset_data, 0x01)  # the gzip magic: decompression fails first
    await assert_refused(archive, "checksum mismatch in sync_operations.jsonl.gz", databases)


@pytest.mark.parametrize(
    "where",
    [
        "inside the manifest",
        "inside a header",
        "inside a member",
        "at a member boundary",
        "before the end blocks",
        "inside the end blocks",
        "a few bytes",
    ],
)
async def test_a_truncated_archive_is_refused(
    archive: Path, databases: Databases, where: str
) -> None:
    truncate(archive, cut_points(archive)[where])
    await assert_refused(archive, "the archive is truncated", databases)


async def test_an_empty_file_is_refused(archive: Path, databases: Databases) -> None:
    truncate(archive, 0)
    await assert_refused(archive, "the archive is empty", databases, ["sqlite"])


async def test_a_future_format_is_refused_with_upgrade_advice(
    archive: Path, databases: Databases
) -> None:
    def future(manifest: dict[str, Any]) -> None:
        manifest["format_version"] = 3
        manifest["members"]["orders_v2.cbor"] = {}

    rewrite(archive, manifest=future)
    await assert_refused(
        archive,
        "archive format 3 is newer than this chefia-rt supports (2); upgrade",
        databases,
    )


async def test_a_future_schema_is_refused(archive: Path, databases: Databases) -> None:
    from chefia_rt.backup.format import manifest_checksum

    def newer(manifest: dict[str, Any]) -> None:
        manifest["source"]["schema_version"] = 99
        manifest["checksum"] = manifest_checksum(manifest)

    rewrite(archive, manifest=newer)
    await assert_refused(archive, "archive schema version 99 is newer", databases, ["sqlite"])


async def test_an_edited_manifest_is_refused(archive: Path, databases: Databases) -> None:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["watermarks"]["s1"] += 1  # claims an op the log does not have

    rewrite(archive, manifest=edit)
    await assert_refused(archive, "checksum mismatch in manifest.json", databases, ["sqlite"])


async def test_missing_and_extra_members_are_refused(
    archive: Path, databases: Databases, tmp_path: Path
) -> None:
    other = tmp_path / "other.tar"
    shutil.copy(archive, other)
    rewrite(archive, drop="conflicts.jsonl.gz")
    await assert_refused(archive, "member conflicts.jsonl.gz is missing", databases, ["sqlite"])
    rewrite(other, extra=("notes.txt", b"hello"))
    await assert_refused(other, "unexpected member notes.txt", databases, ["sqlite"])


async def test_not_an_archive(tmp_path: Path, databases: Databases) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    await assert_refused(junk, "not a readable chefia-rt archive", databases, ["sqlite"])
    with pytest.raises(BackupError, match="no such file"):
        verify_archive(tmp_path / "nope.tar")


async def test_any_flipped_byte_that_matters_is_refused(archive: Path) -> None:
    """Every byte of the manifest, the tar headers, the members' data and the end blocks is
    covered by a checksum (the tar header's own, the manifest's, a member's sha256)."""
    original = read(archive)
    found = sorted(members(archive).values(), key=lambda m: m.offset)
    significant: list[int] = []
    for m in found:
        # Byte 155 of a header ends its checksum field and is not summed: it carries nothing.
        significant += [o for o in range(m.offset, m.offset_data) if o - m.offset != 155]
        significant += range(m.offset_data, m.offset_data + m.size)
    data_end = found[-1].offset_data + -(-found[-1].size // 512) * 512
    significant += range(data_end, data_end + 1024)
    rng = random.Random(7)
    for offset in rng.sample(significant, 400):
        for mask in (0x01, 0xFF):
            damaged = bytearray(original)
            damaged[offset] ^= mask
            write(archive, bytes(damaged))
            with pytest.raises(BackupError) as refused:
                verify_archive(archive)
            assert "\n" not in str(refused.value)
    write(archive, original)
    verify_archive(archive)


def test_every_flipped_byte_of_a_member_is_a_checksum_mismatch_naming_it(archive: Path) -> None:
    """Whatever a damaged byte does to the rows first (garbage, a row without its columns, a
    seq beyond the watermark), the answer is the member's checksum mismatch."""
    original = read(archive)
    rng = random.Random(11)
    for name, entry in members(archive).items():
        if name == "manifest.json":
            continue
        for offset in rng.sample(range(entry.offset_data, entry.offset_data + entry.size), 12):
            damaged = bytearray(original)
            damaged[offset] ^= rng.choice([0x01, 0x10, 0xFF])
            write(archive, bytes(damaged))
            with pytest.raises(BackupError, match=f"checksum mismatch in {re.escape(name)}"):
                verify_archive(archive)
    write(archive, original)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_archive_changed_after_verification_rolls_back(
    kind: str, archive: Path, databases: Databases, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restore checks every member again while loading it: a file that changed between the
    verification and the load fails the restore, and its transaction leaves nothing behind."""
    import chefia_rt.backup.commands

    verify = chefia_rt.backup.commands.verify_archive
    original = read(archive)
    audit = members(archive)["audit_logs_master.jsonl.gz"]
    positions = random.Random(3).sample(range(audit.offset_data, audit.offset_data + audit.size), 6)
    for offset in positions:

        def verify_then_damage(
            path: Path,
            progress: Progress | None = None,
            key: str | None = None,
            offset: int = offset,
        ) -> Any:
            verified = verify(path, progress, key)
            flip(path, offset)
            return verified

        write(archive, original)
        monkeypatch.setattr(chefia_rt.backup.commands, "verify_archive", verify_then_damage)
        target = await databases.url(kind)
        with pytest.raises(BackupError, match=r"checksum mismatch in audit_logs_master\.jsonl\.gz"):
            await restore_archive(databases.settings(target), archive, progress=QUIET)
        assert await dump(target) == {table: [] for table in KEYS}


# ---- into a database that is not empty ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_restore_into_a_database_with_rows_needs_force(
    kind: str, databases: Databases
) -> None:
    source = await databases.url("sqlite")
    await populated(source)
    result = await create_backup(databases.settings(source), progress=QUIET)

    target = await databases.url(kind)
    store = await open_store(target)
    try:
        await sync(store, [make_op("other", "x1", {"mine": True}, store_id="s9")])
    finally:
        await store.close()
    before = await dump(target)
    with pytest.raises(BackupError, match=r"not empty \(store_seqs, entities, .*--force"):
        await restore_archive(databases.settings(target), result.path, progress=QUIET)
    assert await dump(target) == before

    await restore_archive(databases.settings(target), result.path, force=True, progress=QUIET)
    assert await dump(target) == await dump(source)


async def test_restore_drops_the_shared_cache(databases: Databases) -> None:
    """The RequestCache in Redis held the replaced data, at versions above the restored ones:
    after a restore no server may answer from it (a new cache epoch)."""
    await redis_reachable(REDIS_URL)
    prefix = unique_prefix()
    source = await databases.url("sqlite")
    await populated(source)
    archive = (await create_backup(databases.settings(source), progress=QUIET)).path
    held = RedisBus(REDIS_URL, prefix=prefix)
    await held.start(lambda *_: None, lambda *_: None, lambda: None)
    key = EntityKey("s1", "orders", "o1")
    try:
        replaced = CacheEntry(key, 99, b'{"version": 99}', fresh_for=30, keep_for=60)
        assert await held.cache_put([replaced], None) == 1
        before = await held.cache_get(key, 5.0)
        assert before.version == 99

        target = databases.settings(
            await databases.url("sqlite"), redis_url=REDIS_URL, redis_prefix=prefix
        )
        await restore_archive(target, archive, progress=QUIET)

        after = await held.cache_get(key, 5.0)
        assert after.epoch != before.epoch
        assert (after.version, after.body) == (0, None)
        # A put from a read made before the restore is refused too.
        assert await held.cache_put([replaced], before) == 0
    finally:
        await held.close()
        await drop_prefix(REDIS_URL, prefix)


async def test_a_failing_restore_changes_nothing(databases: Databases, tmp_path: Path) -> None:
    """A row the target refuses (here: a seq taken twice in one store) rolls everything back,
    the clearing of --force included."""
    source = await databases.url("sqlite")
    await populated(source)
    db = sqlite3.connect(source.removeprefix("sqlite:///"))
    db.execute("DROP INDEX sync_operations_store_seq")
    db.execute("UPDATE sync_operations SET seq = 1 WHERE id = 'u1'")
    db.commit()
    db.close()
    result = await create_backup(databases.settings(source), progress=QUIET)
    for kind in KINDS:
        target = await databases.url(kind)
        await populated(target)
        before = await dump(target)
        with pytest.raises(BackupError, match="nothing changed"):
            await restore_archive(
                databases.settings(target), result.path, force=True, progress=QUIET
            )
        assert await dump(target) == before, kind


# ---- retention ----------------------------------------------------------------------------------


def archive_name(moment: datetime, suffix: str = "") -> str:
    return f"chefia-rt-backup-{moment:%Y%m%dT%H%M%SZ}{suffix}.tar"


async def test_backup_prunes_old_archives_only(databases: Databases, tmp_path: Path) -> None:
    url = await databases.url("sqlite")
    await populated(url)
    directory = tmp_path / "backups"
    directory.mkdir()
    now = datetime.now(UTC)
    old = [
        archive_name(now - timedelta(days=31)),
        archive_name(now - timedelta(days=31), "-1"),
        archive_name(datetime(2020, 1, 1, 2, tzinfo=UTC)),
    ]
    young = [archive_name(now - timedelta(days=29)), archive_name(now - timedelta(days=1))]
    foreign = [
        "notes.txt",
        archive_name(now - timedelta(days=90)) + ".bak",
        "other-20200101T020000Z.tar",
        "chefia-rt-backup-2020-01-01.tar",
        "chefia-rt-backup-20200101T020000Z.tar.gz",
    ]
    for name in old + young + foreign:
        (directory / name).write_bytes(b"x")
    (directory / archive_name(now - timedelta(days=60), "-2")[:-4]).mkdir()  # not a .tar
    leftover, fresh = (
        directory / ".chefia-rt-backup-dead.tmp",
        directory / ".chefia-rt-backup-x.tmp",
    )
    leftover.write_bytes(b"half")
    fresh.write_bytes(b"in progress")
    two_days_ago = time.time() - 2 * 86400
    os.utime(leftover, (two_days_ago, two_days_ago))

    result = await create_backup(databases.settings(url), progress=QUIET)
    assert sorted(p.name for p in result.pruned) == sorted([*old, leftover.name])
    left = {p.name for p in directory.iterdir()}
    assert left == {
        *young,
        *foreign,
        archive_name(now - timedelta(days=60), "-2")[:-4],
        fresh.name,
        result.path.name,
    }


def test_prune_uses_the_retention(tmp_path: Path) -> None:
    now = datetime(2024, 3, 10, 2, 0, 5, tzinfo=UTC)
    names = [archive_name(now - timedelta(days=d, seconds=1)) for d in (1, 7, 8)]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = prune_backups(tmp_path, 7, now)
    assert [p.name for p in removed] == [names[2], names[1]]


async def test_two_backups_in_one_second_keep_both(databases: Databases) -> None:
    url = await databases.url("sqlite")
    await populated(url)
    moment = datetime(2024, 5, 1, 2, 0, 0, tzinfo=UTC)
    settings = databases.settings(url, backup_retention_days=100_000)
    first = await create_backup(settings, progress=QUIET, now=lambda: moment)
    second = await create_backup(settings, progress=QUIET, now=lambda: moment)
    assert first.path.name == "chefia-rt-backup-20240501T020000Z.tar"
    assert second.path.name == "chefia-rt-backup-20240501T020000Z-1.tar"
    verify_archive(first.path)
    verify_archive(second.path)
    assert not [p for p in first.path.parent.iterdir() if p.name.startswith(".")]


async def test_backup_of_what_is_not_a_chefia_database(databases: Databases) -> None:
    missing = await databases.url("sqlite")
    with pytest.raises(BackupError, match="no SQLite database at"):
        await create_backup(databases.settings(missing), progress=QUIET)
    assert not exists(missing.removeprefix("sqlite:///"))
    empty = await databases.url("postgresql")
    with pytest.raises(BackupError, match="no chefia-rt schema"):
        await create_backup(databases.settings(empty), progress=QUIET)
    assert names_in(databases.settings(empty).backup_dir) == set()  # no archive, no leftovers


# ---- progress -----------------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_progress_bar_on_a_terminal_one_line_otherwise(databases: Databases) -> None:
    url = await databases.url("sqlite")
    await populated(url)
    settings = databases.settings(url)
    pipe = io.StringIO()
    await create_backup(settings, progress=Progress(pipe))
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in pipe.getvalue(), pipe.getvalue()
    assert lines[0].startswith("backup chefia-rt-backup-") and "rows" in lines[0]

    tty = FakeTerminal()
    await create_backup(settings, progress=Progress(tty))
    shown = tty.getvalue()
    assert "\r" in shown
    for table in KEYS:
        assert table in shown
    assert shown.splitlines()[-1].startswith("backup chefia-rt-backup-")


# ---- what terminals see after a restore ---------------------------------------------------------


async def confirmed(terminal: Terminal, message: dict[str, Any]) -> dict[str, Any]:
    await terminal.send(message)
    return await terminal.until("sync_confirmation")


async def test_terminal_ahead_of_the_restored_log_gets_resync_required(tmp_path: Path) -> None:
    first, second = tmp_path / "before", tmp_path / "after"
    async with running_server(first) as server, server.terminal("pos-1") as pos:
        for n in range(1, 6):
            operation = "CREATE" if n == 1 else "UPDATE"
            await confirmed(pos, op(f"a{n}", "t7", {"n": n}, operation=operation, version=n))
        result = await create_backup(
            server.settings, output_dir=tmp_path / "backups", progress=QUIET
        )
        for n in range(6, 9):
            conf = await confirmed(pos, op(f"a{n}", "t7", {"n": n}, version=n))
        assert conf["seq"] == 8  # what pos-1 has applied when the server is lost

    # The server's disk is gone; the last archive is restored on a new one.
    settings = load_settings(database_url=f"sqlite:///{second / 'chefia.db'}")
    await restore_archive(settings, result.path, progress=QUIET)
    async with running_server(second) as server:
        async with server.terminal("pos-1", since=8) as pos:
            assert pos.established["last_seq"] == 5
            resync = await pos.expect("resync_required")
            assert (resync["since"], resync["last_seq"]) == (8, 5)
            await pos.send({"type": "snapshot_request"})
            snapshot = await pos.until("snapshot")
            assert snapshot["seq"] == 5
            assert [(e["entity_id"], e["version"], e["data"]) for e in snapshot["entities"]] == [
                ("t7", 5, {"n": 5})
            ]
            # Writing on from the restored state: the next seq is the watermark's successor.
            conf = await confirmed(pos, op("b6", "t7", {"n": 60}, version=6))
            assert (conf["seq"], conf["version"], conf["status"]) == (6, 6, "applied")
        # A terminal that had only seen older ops resumes from the restored log, no resync.
        async with server.terminal("pos-2", since=3) as other:
            pushed = [(await other.until("data_sync"))["operation"] for _ in range(3)]
            assert [(p["seq"], p["id"]) for p in pushed] == [(4, "a4"), (5, "a5"), (6, "b6")]


# ---- the command line ---------------------------------------------------------------------------


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    ours = ("WS_", "MAX_WS_", "DATABASE_URL", "REDIS_URL", "JWT_", "BACKUP_", "SYNC_")
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith(ours)}
    return subprocess.run(
        [sys.executable, "-m", "chefia_rt", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


async def test_cli_backup_verify_restore(tmp_path: Path, databases: Databases) -> None:
    url = await databases.url("sqlite")
    await populated(url)
    env = {"DATABASE_URL": url, "BACKUP_DIR": str(tmp_path / "nightly")}

    made = await asyncio.to_thread(cli, "backup", cwd=tmp_path, **env)
    assert made.returncode == 0, made.stderr
    path = Path(one_line(made.stdout))
    assert path.parent == tmp_path / "nightly" and exists(path)
    summary = one_line(made.stderr)  # not a terminal: no progress bar, one summary line
    assert summary.startswith(f"backup {path.name}: 6 tables") and "\r" not in made.stderr

    checked = await asyncio.to_thread(cli, "backup", "--verify", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert one_line(checked.stdout).startswith(f"{path}: ok (format 1, sqlite schema 4")
    assert checked.stderr == ""

    refused = await asyncio.to_thread(cli, "restore", str(path), cwd=tmp_path, **env)
    assert refused.returncode == 1
    assert one_line(refused.stderr).startswith("chefia-rt: the target database is not empty")
    forced = await asyncio.to_thread(cli, "restore", str(path), "--force", cwd=tmp_path, **env)
    assert forced.returncode == 0, forced.stderr
    assert one_line(forced.stdout).startswith(f"restored {path.name} (sqlite,")

    other = await databases.url("postgresql")
    into_pg = await asyncio.to_thread(cli, "restore", str(path), cwd=tmp_path, DATABASE_URL=other)
    assert into_pg.returncode == 0, into_pg.stderr
    assert await dump(other) == await dump(url)

    elsewhere = await asyncio.to_thread(
        cli, "backup", "--output", str(tmp_path / "adhoc"), cwd=tmp_path, **env
    )
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert Path(one_line(elsewhere.stdout)).parent == tmp_path / "adhoc"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip", "checksum mismatch in entities.jsonl.gz"),
        ("truncate", "the archive is truncated"),
        ("future", "archive format 3 is newer than this chefia-rt supports (2); upgrade"),
        ("missing", "no such file"),
    ],
)
async def test_cli_verify_refuses_with_one_line(
    archive: Path, tmp_path: Path, damage: str, message: str
) -> None:
    target = archive
    if damage == "flip":
        entities = members(archive)["entities.jsonl.gz"]
        flip(archive, entities.offset_data + 10)
    elif damage == "truncate":
        truncate(archive)
    elif damage == "future":
        rewrite(archive, manifest=lambda m: m.update(format_version=3))
    else:
        target = tmp_path / "gone.tar"
    result = await asyncio.to_thread(cli, "backup", "--verify", str(target), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert line.startswith(f"chefia-rt: {target}: ") and message in line, line
    db = tmp_path / "target.db"
    restore = await asyncio.to_thread(
        cli, "restore", str(target), cwd=tmp_path, DATABASE_URL=f"sqlite:///{db}"
    )
    assert restore.returncode == 1 and message in one_line(restore.stderr)
    assert not db.exists()


def test_cli_usage(tmp_path: Path) -> None:
    both = cli("backup", "--verify", "a.tar", "--output", "x", cwd=tmp_path)
    assert both.returncode == 2 and "not allowed with" in both.stderr
    assert cli("restore", cwd=tmp_path).returncode == 2
    for command in ("backup", "restore"):
        shown = cli(command, "--help", cwd=tmp_path)
        assert shown.returncode == 0 and f"usage: chefia-rt {command}" in shown.stdout
    assert "--force" in cli("restore", "--help", cwd=tmp_path).stdout


# ---- schedule and systemd units -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "expected"),
    [
        ("0 2 * * *", ["*-*-* 02:00:00"]),
        ("@daily", ["*-*-* 00:00:00"]),
        ("@hourly", ["*-*-* *:00:00"]),
        ("*/15 * * * *", ["*-*-* *:00,15,30,45:00"]),
        ("30 3 * * mon-fri", ["Mon..Fri *-*-* 03:30:00"]),
        ("0 4 * * 0", ["Sun *-*-* 04:00:00"]),
        ("0 4 * * 7", ["Sun *-*-* 04:00:00"]),
        ("0 8-18/2 * * 1-5", ["Mon..Fri *-*-* 08,10,12,14,16,18:00:00"]),
        ("15 1 1,15 jan,jul *", ["*-01,07-01,15 01:15:00"]),
        ("0 1-3 1-31/10 * *", ["*-*-01,11,21,31 01..03:00:00"]),
        # Cron runs when either day field matches; a timer fires on the union of its lines.
        ("0 2 1 * sat", ["*-*-01 02:00:00", "Sat *-*-* 02:00:00"]),
    ],
)
def test_cron_to_oncalendar(cron: str, expected: list[str]) -> None:
    assert cron_to_oncalendar(cron) == expected
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        service_missing("systemd-analyze", "not installed (apt-get install systemd)")
    for line in expected:
        checked = subprocess.run(
            [analyze, "calendar", line], capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, checked.stderr


@pytest.mark.parametrize(
    ("cron", "problem"),
    [
        ("0 2 * *", "5 fields"),
        ("61 2 * * *", "minute: '61' is outside 0-59"),
        ("0 2 * * funday", "day of week"),
        ("0 5-2 * * *", "runs backwards"),
        ("*/0 * * * *", "bad step"),
        ("@reboot", "unsupported"),
    ],
)
def test_bad_cron_is_refused(cron: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        cron_to_oncalendar(cron)
    from chefia_rt.errors import ConfigError

    with pytest.raises(ConfigError, match="BACKUP_SCHEDULE"):
        load_settings(backup_schedule=cron)


def test_cli_prints_oncalendar(tmp_path: Path) -> None:
    default = cli("backup", "--print-oncalendar", cwd=tmp_path)
    assert (default.returncode, default.stdout) == (0, "*-*-* 02:00:00\n")
    either = cli("backup", "--print-oncalendar", cwd=tmp_path, BACKUP_SCHEDULE="0 3 1 * sun")
    assert either.stdout.splitlines() == ["*-*-01 03:00:00", "Sun *-*-* 03:00:00"]


def unit_settings(path: Path) -> Iterator[tuple[str, str]]:
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            yield key, value


def test_systemd_units(tmp_path: Path) -> None:
    service, timer = (
        ROOT / "deploy/chefia-rt-backup.service",
        ROOT / "deploy/chefia-rt-backup.timer",
    )
    unit = dict(unit_settings(service))
    assert unit["Type"] == "oneshot" and unit["User"] == "chefia"
    assert unit["ExecStart"].endswith("chefia-rt backup")
    assert unit["EnvironmentFile"] == "/etc/chefia-rt/env"
    assert unit["NoNewPrivileges"] == "yes" and unit["ProtectSystem"] == "strict"
    assert unit["ReadWritePaths"] and unit["WorkingDirectory"] in unit["ReadWritePaths"].split()
    timing = dict(unit_settings(timer))
    default = Settings.model_fields["backup_schedule"].default
    assert [timing["OnCalendar"]] == cron_to_oncalendar(default) == ["*-*-* 02:00:00"]
    assert timing["Persistent"] == "true" and timing["Unit"] == service.name

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        service_missing("systemd-analyze", "not installed (apt-get install systemd)")
    # `verify` wants ExecStart's binary to exist: point it at this checkout's entry point.
    script = Path(sys.executable).parent / "chefia-rt"
    (tmp_path / service.name).write_text(
        service.read_text().replace("/opt/chefia-rt/current/venv/bin/chefia-rt", str(script))
    )
    shutil.copy(timer, tmp_path / timer.name)
    checked = subprocess.run(
        [analyze, "verify", service.name, timer.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.strip() == "", checked.stderr
