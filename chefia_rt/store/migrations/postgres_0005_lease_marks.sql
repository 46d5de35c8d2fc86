-- Every lock lease granted, by entity, with the latest instant it may be in force (epoch ms).
-- A batch reads the marks of its entities with its seq lock and asks the bus for the leases of
-- the marked ones only: a write to an entity nobody locked costs no lease round trip.
CREATE TABLE IF NOT EXISTS lease_marks (
    store_id text NOT NULL,
    entity_type text NOT NULL,
    entity_id text NOT NULL,
    until_ms bigint NOT NULL,
    PRIMARY KEY (store_id, entity_type, entity_id)
);
