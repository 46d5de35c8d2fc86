-- Every index is one more insertion per logged operation.
-- Nothing reads the log by entity (terminals read it by seq, the HTTP API reads `entities`).
DROP INDEX IF EXISTS sync_operations_entity;
