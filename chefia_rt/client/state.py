"""The terminal client's outbox and stream position, kept across restarts in an SQLite file."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ClientState:
    """The outbox and the stream position of one terminal in an SQLite file (`state_path`).

    An operation is committed (synchronous=FULL) before `send` hands it to the connection;
    answered ones are deleted and the position written in batches (the client's tick and
    `close`): lost in a crash, an answered operation is sent again and answered `duplicate`,
    and the stream resumes a little earlier (what the application took again comes again).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox"
            " (id TEXT PRIMARY KEY, ord INTEGER NOT NULL, message TEXT NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS position"
            " (one INTEGER PRIMARY KEY CHECK (one = 1), watermark INTEGER, epoch TEXT)"
        )

    def load(self) -> tuple[list[dict[str, Any]], int | None, str | None]:
        """The unanswered `data_sync` messages in send order, the watermark and the epoch."""
        rows = self._db.execute("SELECT message FROM outbox ORDER BY ord").fetchall()
        position = self._db.execute("SELECT watermark, epoch FROM position").fetchone()
        watermark, epoch = position if position is not None else (None, None)
        return [json.loads(text) for (text,) in rows], watermark, epoch

    def put(self, message: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO outbox (id, ord, message)"
            " VALUES (?, (SELECT COALESCE(MAX(ord), 0) + 1 FROM outbox), ?)",
            (message["operation"]["id"], json.dumps(message, separators=(",", ":"))),
        )

    def forget(self, op_ids: Sequence[str], watermark: int | None, epoch: str | None) -> None:
        with self._db:  # one transaction
            self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in op_ids])
            self._db.execute(
                "INSERT OR REPLACE INTO position (one, watermark, epoch) VALUES (1, ?, ?)",
                (watermark, epoch),
            )

    def close(self) -> None:
        self._db.close()
