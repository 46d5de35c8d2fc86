-- Operation ids (and the conflicts named after them) are unique within a store, not across
-- stores: every restaurant has a "pos-1", and two stores may use the same id at the same moment.
-- Existing ids were unique globally, so they stay unique per store.
ALTER TABLE sync_operations DROP CONSTRAINT sync_operations_pkey;
ALTER TABLE sync_operations ADD PRIMARY KEY (store_id, id);
DROP INDEX sync_operations_entity;
CREATE INDEX sync_operations_entity ON sync_operations (store_id, entity_type, entity_id);

ALTER TABLE conflicts DROP CONSTRAINT conflicts_pkey;
ALTER TABLE conflicts ADD PRIMARY KEY (store_id, id);

-- The epoch of a store's seq stream: set when the stream starts, replaced by a restore, so that
-- a watermark from before the restore is never taken for one of the restored stream.
ALTER TABLE store_seqs ADD COLUMN epoch text NOT NULL DEFAULT gen_random_uuid()::text;
