"""The terminal client: an asyncio WebSocket client that keeps a terminal in sync through faults.

    async with Client(["ws://127.0.0.1:8001/ws"], "pos-1", store_id="s1") as client:
        answer = await (await client.send("tables", "table-7", {"status": "occupied"}))
        async for event in client.events():   # StoreOp and Snapshot, in seq order, once each
            ...

What it guarantees the application (docs/protocol.md §7, §9; docs/clients.md):

- **Nothing sent is lost.** Every operation waits in a bounded outbox until the server answers
  it. After a reconnect every unanswered one is sent again with its original id (the server
  answers a repeat `duplicate`, which is a confirmation), and one answered `sync_error` 1013 or
  4005 (storage down, rate limit) is sent again a little later.
- **Every operation of the store once, in seq order.** The application gets its own confirmed
  operations and the ones pushed by others as one stream ordered by seq. Confirmations travel in
  the server's urgent lane and may overtake pushes of lower seqs, so the client holds what
  arrives early and keeps a contiguous watermark: the highest seq up to which it has
  everything. It reconnects with `since=` that watermark and `epoch=` the epoch of the store's
  seq stream it was read in, and drops any seq it already has. A restored store starts a new
  epoch: the server then answers resync_required, and the client takes a snapshot rather than
  mixing the two streams (a seq of the new epoch is never taken for one of the old).
- **Reconnects by itself**, with exponential backoff and jitter over the given URLs (a node
  that died sends the terminal to the next one), until `Backoff.max_attempts` /
  `Backoff.max_elapsed` say stop. A takeover (4004: the terminal connected somewhere else) stops
  it at once: two connections of one terminal would only keep replacing each other. Auth and
  protocol closes (4001-4003, 4006, 1009) stop it too: retrying cannot fix them.
- **resync_required** (the log no longer reaches back to the watermark, or the epoch changed) is
  answered with a `snapshot_request`; until the snapshot arrives no operation of the stream is
  handed over. The application gets a Snapshot and the stream goes on after its seq. Keep
  `watermark` and `epoch` together when persisting them (`since=`, `epoch=`).

**Kept across restarts** with `state_path`: an SQLite file holding the outbox and the stream
position. An operation is committed there before it goes on the wire and deleted once answered;
a new client on the same file (after a crash, a restart) sends every unanswered operation again
with its original id (a repeat is answered `duplicate`) and resumes after the watermark of the
events the application took, in that epoch. A `since` given explicitly wins over the file's.

Every wait has a timeout, every task belongs to the client and is cancelled by `close()`, and
every buffer is bounded: the outbox (`send` waits for room), the events not yet taken (the
client stops reading the socket until the application catches up; the server then closes it as
a slow reader with 1013 and the client resumes from its watermark), and the seqs held ahead of
a gap (a gap that does not fill reconnects with `since`).

How it is built: `client.py` is the Client (reconnecting, and the application's side);
`connection.py` serves one WebSocket connection (reading, sending, timers); `core.py` and
`stream.py` are the bookkeeping without I/O (the outbox and answers; the seq stream and
snapshots), fed the server's messages and the time; `state.py` is the state file; `model.py`
holds what the application gets (StoreOp, Snapshot, Answer, ClientStats, Backoff, ClientStopped).
"""

from chefia_rt.client.client import Client
from chefia_rt.client.core import RETRY_CODES
from chefia_rt.client.model import (
    FATAL_CLOSES,
    Answer,
    Backoff,
    ClientStats,
    ClientStopped,
    Event,
    OutboxFull,
    Snapshot,
    StoreOp,
    utc_timestamp,
)
from chefia_rt.client.state import ClientState

__all__ = [
    "FATAL_CLOSES",
    "RETRY_CODES",
    "Answer",
    "Backoff",
    "Client",
    "ClientState",
    "ClientStats",
    "ClientStopped",
    "Event",
    "OutboxFull",
    "Snapshot",
    "StoreOp",
    "utc_timestamp",
]
