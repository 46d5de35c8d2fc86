-- Operation ids (and the conflicts named after them) are unique within a store, not across
-- stores: every restaurant has a "pos-1", and two stores may use the same id at the same moment.
-- SQLite cannot change a primary key in place: the tables are rebuilt with their rows.
CREATE TABLE sync_operations_new (
    id                TEXT NOT NULL,
    store_id          TEXT NOT NULL,
    seq               INTEGER,
    entity_type       TEXT NOT NULL,
    entity_id         TEXT NOT NULL,
    operation         TEXT NOT NULL,
    data              TEXT NOT NULL,
    version           INTEGER,
    deleted           INTEGER NOT NULL DEFAULT 0,
    status            TEXT NOT NULL,
    conflict_resolved INTEGER NOT NULL DEFAULT 0,
    terminal_id       TEXT NOT NULL,
    user_id           TEXT,
    priority          TEXT NOT NULL,
    timestamp         TEXT NOT NULL,
    server_time       TEXT NOT NULL,
    PRIMARY KEY (store_id, id)
);
INSERT INTO sync_operations_new (id, store_id, seq, entity_type, entity_id, operation, data,
    version, deleted, status, conflict_resolved, terminal_id, user_id, priority, timestamp,
    server_time)
SELECT id, store_id, seq, entity_type, entity_id, operation, data, version, deleted, status,
    conflict_resolved, terminal_id, user_id, priority, timestamp, server_time
FROM sync_operations;
DROP TABLE sync_operations;
ALTER TABLE sync_operations_new RENAME TO sync_operations;
CREATE UNIQUE INDEX sync_operations_store_seq ON sync_operations (store_id, seq) WHERE seq IS NOT NULL;
CREATE INDEX sync_operations_entity ON sync_operations (store_id, entity_type, entity_id);
CREATE INDEX sync_operations_timestamp ON sync_operations (server_time);

CREATE TABLE conflicts_new (
    id             TEXT NOT NULL,
    store_id       TEXT NOT NULL,
    operation_id   TEXT NOT NULL,
    operation      TEXT NOT NULL,
    server_version INTEGER NOT NULL,
    server_data    TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (store_id, id)
);
INSERT INTO conflicts_new (id, store_id, operation_id, operation, server_version, server_data,
    created_at)
SELECT id, store_id, operation_id, operation, server_version, server_data, created_at
FROM conflicts;
DROP TABLE conflicts;
ALTER TABLE conflicts_new RENAME TO conflicts;

-- The epoch of a store's seq stream: set when the stream starts, replaced by a restore, so that
-- a watermark from before the restore is never taken for one of the restored stream.
CREATE TABLE store_seqs_new (
    store_id   TEXT PRIMARY KEY,
    last_seq   INTEGER NOT NULL,
    epoch      TEXT NOT NULL DEFAULT (lower(hex(randomblob(16))))
);
INSERT INTO store_seqs_new (store_id, last_seq) SELECT store_id, last_seq FROM store_seqs;
DROP TABLE store_seqs;
ALTER TABLE store_seqs_new RENAME TO store_seqs;
