-- Two audit rows per record instead of three, and no jsonb on the hot rows.
--
-- The mapper's "mapped" row repeated what the writer's row about the same command says
-- (event id, command id, transformation); only when and by which replica it was mapped were
-- its own. Those now travel with the command batch and are kept on the writer's row
-- (written, skipped or failed), so the mapper appends a row only for a record it cannot map.
-- `ml-connector audit` shows the mapping step from these columns as before. Measured on a
-- 2-core machine: an audit row costs PostgreSQL about 8 us and 440 bytes of WAL, and its
-- writer about 3.5 us.
--
-- The versions the poller and the writer recorded in `details` (jsonb: parsed and rebuilt by
-- PostgreSQL for every row, 1.6 us of server and 1.6 us of client CPU a row) get columns.
-- Rows written before this migration keep them in `details`.

ALTER TABLE audit_events
    ADD COLUMN source_version text,   -- the source record's version the row is about
    ADD COLUMN flow_version integer,  -- the flow version it was polled under
    ADD COLUMN mapped_at timestamptz, -- on the writer's rows: when its command was mapped
    ADD COLUMN mapped_by text;        -- ... and by which mapper replica
