-- chefia-rt schema for PostgreSQL. Applied by `chefia-rt migrate` and at start, under an
-- advisory lock so that workers starting together apply it once.
CREATE TABLE store_seqs (
    store_id   text PRIMARY KEY,
    last_seq   bigint NOT NULL
);

CREATE TABLE entities (
    store_id       text NOT NULL,
    entity_type    text NOT NULL,
    entity_id      text NOT NULL,
    version        bigint NOT NULL,
    data           jsonb NOT NULL,
    deleted        boolean NOT NULL DEFAULT false,
    timestamp      text NOT NULL,
    field_versions jsonb NOT NULL DEFAULT '{}',
    updated_at     timestamptz NOT NULL DEFAULT now(),
    updated_by     text NOT NULL,
    PRIMARY KEY (store_id, entity_type, entity_id)
);

CREATE TABLE sync_operations (
    id                text PRIMARY KEY,
    store_id          text NOT NULL,
    seq               bigint,
    entity_type       text NOT NULL,
    entity_id         text NOT NULL,
    operation         text NOT NULL,
    data              jsonb NOT NULL,
    version           bigint,
    deleted           boolean NOT NULL DEFAULT false,
    status            text NOT NULL,
    conflict_resolved boolean NOT NULL DEFAULT false,
    terminal_id       text NOT NULL,
    user_id           text,
    priority          text NOT NULL,
    timestamp         text NOT NULL,
    server_time       text NOT NULL
);
CREATE UNIQUE INDEX sync_operations_store_seq ON sync_operations (store_id, seq) WHERE seq IS NOT NULL;
CREATE INDEX sync_operations_entity ON sync_operations (entity_type, entity_id);
CREATE INDEX sync_operations_server_time ON sync_operations (server_time);

-- Partitioned by month; the server creates the current and next months' partitions at start
-- and keeps them ahead daily (a row trigger cannot create partitions of its own table).
CREATE TABLE audit_logs_master (
    id                bigint GENERATED ALWAYS AS IDENTITY,
    operation_id      text NOT NULL,
    store_id          text NOT NULL,
    entity_type       text NOT NULL,
    entity_id         text NOT NULL,
    operation         text NOT NULL,
    terminal_id       text NOT NULL,
    user_id           text,
    changes           jsonb NOT NULL,
    sync_status       text NOT NULL,
    conflict_resolved boolean NOT NULL DEFAULT false,
    timestamp         timestamptz NOT NULL
) PARTITION BY RANGE (timestamp);
-- Rows whose month has no partition yet land here rather than fail a commit.
CREATE TABLE audit_logs_default PARTITION OF audit_logs_master DEFAULT;
CREATE INDEX audit_logs_entity ON audit_logs_master (store_id, entity_type, entity_id);
CREATE INDEX audit_logs_timestamp ON audit_logs_master (timestamp);

CREATE TABLE conflicts (
    id             text PRIMARY KEY,
    store_id       text NOT NULL,
    operation_id   text NOT NULL,
    operation      jsonb NOT NULL,
    server_version bigint NOT NULL,
    server_data    jsonb NOT NULL,
    created_at     text NOT NULL
);

CREATE TABLE websocket_connections (
    session_id      text PRIMARY KEY,
    terminal_id     text NOT NULL,
    terminal_type   text NOT NULL,
    store_id        text NOT NULL,
    user_id         text,
    connected_at    text NOT NULL,
    disconnected_at text,
    bytes_in        bigint NOT NULL DEFAULT 0,
    bytes_out       bigint NOT NULL DEFAULT 0,
    messages_in     bigint NOT NULL DEFAULT 0,
    messages_out    bigint NOT NULL DEFAULT 0,
    close_code      integer
);
CREATE INDEX websocket_connections_terminal ON websocket_connections (store_id, terminal_id);
