"""The writer's batches on a real Worker (SQLite, in-process bus) with the hub's fake transport:
what it does after a commit, seen from the connections."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chefia_rt.config import load_settings
from chefia_rt.domain import Operation
from chefia_rt.hub import Outbound, Session
from chefia_rt.pipeline import ANSWER_SLICE
from chefia_rt.worker import Worker
from tests.test_hub import FakeTransport

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    worker = Worker.create(load_settings(database_url=f"sqlite:///{tmp_path / 'chefia.db'}"))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def connect(worker: Worker, terminal_id: str, transport: FakeTransport) -> Session:
    limits = Outbound(
        queue_size=10_000,
        urgent_size=10_000,
        batch_max=100,
        batch_window=0.002,
        compression_threshold=None,
    )
    session = Session(
        terminal_id, "pos", "s1", uuid.uuid4().hex, "msgpack", None, transport, limits
    )
    await worker.sessions.open(session, None)
    return session


def update(op_id: str, entity_id: str) -> Operation:
    return Operation(
        op_id,
        "s1",
        "tables",
        entity_id,
        "CREATE",
        {"n": 1},
        1,
        "2024-01-15T10:30:00.000000Z",
        "pos-1",
    )


async def test_a_large_batch_lets_other_connections_go_between_its_slices(worker: Worker) -> None:
    """The answers and pushes of a large batch go out a slice at a time, the event loop
    running in between: what other connections need waits for one slice, not the batch."""
    sender, receiver = FakeTransport(), FakeTransport()
    pos = await connect(worker, "pos-1", sender)
    await connect(worker, "pos-2", receiver)
    await asyncio.sleep(0.05)  # both greeted, live
    greeted = len(sender.messages())
    size = 4 * ANSWER_SLICE
    seen: list[int] = []  # confirmations the sender had whenever another task ran

    async def other_connection() -> None:
        # Runs until the batch is answered, however long its commit takes (a loaded machine).
        frames = -1
        while True:
            if len(sender.frames) != frames:
                frames = len(sender.frames)
                seen.append(len(sender.messages()) - greeted)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(other_connection())
    for i in range(size):  # all queued before the writer runs: one batch
        worker.pipeline.submit(update(f"op{i}", f"t{i}"), pos, time.monotonic())
    await worker.pipeline.answered_so_far()
    await asyncio.sleep(0.05)
    watcher.cancel()
    confirmations = [m for m in sender.messages() if m["type"] == "sync_confirmation"]
    assert [m["operation_id"] for m in confirmations] == [f"op{i}" for i in range(size)]
    pushes = [m for m in receiver.messages() if m["type"] == "data_sync"]
    assert [m["operation"]["seq"] for m in pushes] == list(range(1, size + 1))
    # Other tasks ran while the batch was being answered, not only before and after it.
    assert any(0 < count < size for count in seen), sorted(set(seen))
