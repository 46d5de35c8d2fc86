-- Server events for the Terminal Monitor (backups, restores): written by the chefia-rt CLI,
-- polled by the server and shown in every store's activity feed. Operational history, not
-- store data: backups leave this table out, and a restore leaves it as it was.
-- created_at: epoch seconds; payload: JSON text.
CREATE TABLE server_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    payload     TEXT NOT NULL
);
