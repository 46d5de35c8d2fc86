"""A restore is visible to resuming terminals (docs/protocol.md §9.2).

After a restore the store's seqs restart below what terminals hold; once new writes pass a
terminal's old watermark, seqs alone would make its resume look ordinary and it would mix two
streams. Every store's seq stream has an epoch, replaced by a restore: a terminal that resumes
with `since` and its old epoch gets resync_required, whatever the seqs say."""

from __future__ import annotations

import io
from pathlib import Path

from chefia_rt.backup import Progress, create_backup, restore_archive
from chefia_rt.client import Client, Snapshot, StoreOp
from tests.helpers import RunningServer, Terminal, op, running_server

QUIET = Progress(io.StringIO(), tty=False)


async def write(terminal: Terminal, first: int, last: int) -> None:
    for n in range(first, last + 1):
        await terminal.send(op(f"w{n}", f"T{n}", {"n": n}, operation="CREATE"))
        assert (await terminal.until("sync_confirmation"))["seq"] is not None


async def restored_server(tmp_path: Path, server: RunningServer) -> tuple[str, int, str]:
    """Back up at seq 2, write up to seq 5, restore the backup. (epoch, watermark, url)."""
    async with server.terminal("pos-1") as pos:
        await write(pos, 1, 2)
        archive = await create_backup(server.settings, progress=QUIET)
        await write(pos, 3, 5)
        epoch = pos.established["epoch"]
    return epoch, 5, archive.path.as_posix()


async def test_a_resume_with_the_epoch_of_before_a_restore_is_resync_required(
    tmp_path: Path,
) -> None:
    settings = {"backup_dir": str(tmp_path / "backups")}
    async with running_server(tmp_path, **settings) as server:
        epoch, watermark, archive = await restored_server(tmp_path, server)
        url = server.settings.database_url
    await restore_archive(server.settings, Path(archive), force=True, progress=QUIET)
    async with running_server(tmp_path, database_url=url, **settings) as server:
        async with server.terminal("pos-2") as pos:
            new_epoch = pos.established["epoch"]
            assert new_epoch != epoch and pos.established["last_seq"] == 2
            await write(pos, 10, 14)  # seqs 3..7: past the old watermark 5
        # Connecting with the old watermark and epoch: resync_required, not seqs 6 and 7.
        async with server.terminal("pos-1", since=watermark, epoch=epoch) as old:
            assert old.established["epoch"] == new_epoch
            resync = await old.expect("resync_required")
            assert resync["epoch"] == new_epoch and "epoch" in resync["reason"]
            await old.nothing()
            # A resume message with the old epoch is refused the same way...
            await old.send({"type": "resume", "since": watermark, "epoch": epoch})
            assert (await old.expect("resync_required"))["last_seq"] == 7
            # ...and the snapshot it asks for carries the new epoch.
            await old.send({"type": "snapshot_request"})
            snapshot = await old.until("snapshot")
            assert (snapshot["seq"], snapshot["epoch"]) == (7, new_epoch)
            await old.send({"type": "resume", "since": 7, "epoch": new_epoch})
            await old.nothing()
        # Without an epoch, seqs alone decide, as before epochs existed.
        async with server.terminal("pos-3", since=watermark) as legacy:
            ops = [await legacy.until("data_sync") for _ in range(2)]
            assert [o["operation"]["seq"] for o in ops] == [6, 7]


async def test_the_client_takes_a_snapshot_after_a_restore(tmp_path: Path) -> None:
    settings = {"backup_dir": str(tmp_path / "backups")}
    async with running_server(tmp_path, **settings) as server:
        epoch, watermark, archive = await restored_server(tmp_path, server)
        url = server.settings.database_url
    await restore_archive(server.settings, Path(archive), force=True, progress=QUIET)
    async with running_server(tmp_path, database_url=url, **settings) as server:
        async with server.terminal("pos-2") as pos:
            await write(pos, 10, 14)  # seqs 3..7
        client = Client(server.url, "pos-1", store_id="s1", since=watermark, epoch=epoch)
        async with client:
            events = client.events()
            first = await anext(events)
            # Never seqs 6 and 7 of the new stream on top of seq 5 of the old one.
            assert isinstance(first, Snapshot) and first.seq == 7
            assert {e["entity_id"] for e in first.entities} == {
                "T1",
                "T2",
                *(f"T{n}" for n in range(10, 15)),
            }
            assert client.epoch != epoch and client.watermark == 7
            await client.wait_connected(5)
            answer = await (await client.send("tables", "T99", {"n": 99}, operation="CREATE"))
            assert answer.kind == "confirmed"
            nxt = await anext(events)
            assert isinstance(nxt, StoreOp) and nxt.seq == 8
