"""Group commit for SQLite: the WAL is synced in a thread of its own, after the commit.

The writer's connection runs `synchronous=NORMAL`, so COMMIT only writes the transaction's
frames into the WAL file, and the event loop that runs it never waits for the disk. Each commit
takes the next *generation*; `durable(generation)` returns once a sync of the WAL that began
after that commit has finished. One sync covers every commit made before it began, so at most
one runs at a time and the commits that arrive meanwhile share the next.

What waits for it: every answer to a commit, and every read that may have seen one (a catch-up
must not push an operation that a power cut could still take back). After a sync fails,
nothing that was written since the last good one can be trusted to be on disk: every waiter and
every later call gets StorageUnavailable, and the process must be restarted to recover from
what the file holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from chefia_rt.errors import StorageUnavailable

log = logging.getLogger("chefia_rt.store.wal")


class WalSync:
    """The WAL's syncs for one SQLite file, and who waits for them (event-loop side)."""

    def __init__(self, wal_path: str | None) -> None:
        # None: an in-memory database, which has nothing to sync.
        self._path = wal_path
        self._fd: int | None = None
        self._fd_lock = threading.Lock()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-sync")
        self.written = 0  # generation of the last commit
        self.synced = 0  # every generation up to this one is on disk
        self.syncs = 0  # syncs begun for commits made on the event loop
        self._syncing: Future[None] | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.failure: OSError | None = None

    def check(self) -> None:
        """StorageUnavailable once a sync has failed."""
        if self.failure is not None:
            raise StorageUnavailable(f"storage failed to sync its log: {self.failure}; restart")

    def committed(self) -> int:
        """A commit was made on the event loop: its generation."""
        self.written += 1
        if self._path is None:
            self.synced = self.written
        return self.written

    async def durable(self, generation: int) -> None:
        """Until `generation` is on disk."""
        self.check()
        if self.synced >= generation:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((generation, waiter))
        self._start()
        await waiter

    def sync_now(self) -> None:
        """The sync itself, on the calling thread (writes made in the connection's own thread
        sync there, before they return). fdatasync, as SQLite itself syncs on Linux: it still
        syncs the file's size when a commit grew the WAL, and it skips the journal commit of
        timestamps that made fsync several times slower on ext4."""
        if self._path is None:
            return
        try:
            with self._fd_lock:
                if self._fd is None:
                    self._fd = os.open(self._path, os.O_RDONLY)
                fd = self._fd
            os.fdatasync(fd)
        except OSError as exc:
            if self.failure is None:
                log.critical("sync of the SQLite WAL failed, storage stops: %s", exc)
                self.failure = exc
            raise

    def _start(self) -> None:
        if self._syncing is not None or self.failure is not None or self.synced >= self.written:
            return
        loop = asyncio.get_running_loop()
        target = self.written
        self.syncs += 1
        job = self._thread.submit(self.sync_now)
        self._syncing = job
        job.add_done_callback(lambda done: loop.call_soon_threadsafe(self._done, done, target))

    def _done(self, job: Future[None], target: int) -> None:
        self._syncing = None
        if job.exception() is None:
            self.synced = max(self.synced, target)
        waiting = []
        for generation, waiter in self._waiters:
            if waiter.done():
                continue  # its caller stopped waiting
            if self.failure is not None:
                waiter.set_exception(
                    StorageUnavailable(f"storage failed to sync its log: {self.failure}; restart")
                )
            elif generation <= self.synced:
                waiter.set_result(None)
            else:
                waiting.append((generation, waiter))
        self._waiters = waiting
        if waiting:
            self._start()

    async def close(self) -> None:
        """After the last commit: its sync finishes, then the thread and the file are closed."""
        syncing = self._syncing
        if syncing is not None:
            await asyncio.wait([asyncio.wrap_future(syncing)])
        await asyncio.to_thread(self._thread.shutdown)
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
