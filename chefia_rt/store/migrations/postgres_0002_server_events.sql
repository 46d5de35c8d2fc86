-- Server events for the Terminal Monitor (backups, restores): written by the chefia-rt CLI,
-- polled by every worker and shown in every store's activity feed. Operational history, not
-- store data: backups leave this table out, and a restore leaves it as it was.
CREATE TABLE server_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL,
    created_at  timestamptz NOT NULL,
    payload     jsonb NOT NULL
);
