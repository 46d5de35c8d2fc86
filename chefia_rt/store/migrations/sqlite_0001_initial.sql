-- chefia-rt schema for SQLite (the embedded default). JSON columns hold JSON text.
CREATE TABLE store_seqs (
    store_id   TEXT PRIMARY KEY,
    last_seq   INTEGER NOT NULL
);

CREATE TABLE entities (
    store_id       TEXT NOT NULL,
    entity_type    TEXT NOT NULL,
    entity_id      TEXT NOT NULL,
    version        INTEGER NOT NULL,
    data           TEXT NOT NULL,
    deleted        INTEGER NOT NULL DEFAULT 0,
    timestamp      TEXT NOT NULL,
    field_versions TEXT NOT NULL DEFAULT '{}',
    updated_at     TEXT NOT NULL,
    updated_by     TEXT NOT NULL,
    PRIMARY KEY (store_id, entity_type, entity_id)
);

CREATE TABLE sync_operations (
    id                TEXT PRIMARY KEY,
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
    server_time       TEXT NOT NULL
);
CREATE UNIQUE INDEX sync_operations_store_seq ON sync_operations (store_id, seq) WHERE seq IS NOT NULL;
CREATE INDEX sync_operations_entity ON sync_operations (entity_type, entity_id);
CREATE INDEX sync_operations_timestamp ON sync_operations (server_time);

CREATE TABLE audit_logs_master (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    operation_id      TEXT NOT NULL,
    store_id          TEXT NOT NULL,
    entity_type       TEXT NOT NULL,
    entity_id         TEXT NOT NULL,
    operation         TEXT NOT NULL,
    terminal_id       TEXT NOT NULL,
    user_id           TEXT,
    changes           TEXT NOT NULL,
    sync_status       TEXT NOT NULL,
    conflict_resolved INTEGER NOT NULL DEFAULT 0,
    timestamp         TEXT NOT NULL
);
CREATE INDEX audit_logs_timestamp ON audit_logs_master (timestamp);
CREATE INDEX audit_logs_entity ON audit_logs_master (store_id, entity_type, entity_id);

CREATE TABLE conflicts (
    id             TEXT PRIMARY KEY,
    store_id       TEXT NOT NULL,
    operation_id   TEXT NOT NULL,
    operation      TEXT NOT NULL,
    server_version INTEGER NOT NULL,
    server_data    TEXT NOT NULL,
    created_at     TEXT NOT NULL
);

CREATE TABLE websocket_connections (
    session_id      TEXT PRIMARY KEY,
    terminal_id     TEXT NOT NULL,
    terminal_type   TEXT NOT NULL,
    store_id        TEXT NOT NULL,
    user_id         TEXT,
    connected_at    TEXT NOT NULL,
    disconnected_at TEXT,
    bytes_in        INTEGER NOT NULL DEFAULT 0,
    bytes_out       INTEGER NOT NULL DEFAULT 0,
    messages_in     INTEGER NOT NULL DEFAULT 0,
    messages_out    INTEGER NOT NULL DEFAULT 0,
    close_code      INTEGER
);
CREATE INDEX websocket_connections_terminal ON websocket_connections (store_id, terminal_id);
