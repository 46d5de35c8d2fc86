-- Every index is one more insertion (and WAL record) per logged operation.
-- Nothing reads the log by entity (terminals read it by seq, the HTTP API reads `entities`).
DROP INDEX IF EXISTS sync_operations_entity;

-- Log and audit rows arrive in time order, so a BRIN index finds a time range (the daily prune
-- of the log, an audit query) at a fraction of a btree's size and upkeep.
DROP INDEX IF EXISTS sync_operations_server_time;
CREATE INDEX sync_operations_server_time ON sync_operations USING brin (server_time);
DROP INDEX IF EXISTS audit_logs_timestamp;
CREATE INDEX audit_logs_timestamp ON audit_logs_master USING brin (timestamp);
