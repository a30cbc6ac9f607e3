-- openfhir-cache schema, version 8: a cheaper invalidation log. The log and its horizon are
-- UNLOGGED, and `created` is indexed by BRIN instead of a B-tree.
-- Idempotent: safe to run again, by the node (`openfhir-cache migrate`) or by a DBA with
--   psql -v ON_ERROR_STOP=1 -f sql/0008_unlogged_log.sql
--
-- Why: every change to a tracked table writes a log row in the writer's transaction. As a logged
-- table with three B-tree indexes, that row added a heap record and three index records to the
-- WAL of every write, which the writer's COMMIT then flushed. UNLOGGED, the row writes no WAL at
-- all; `created` is only read by pruning (a range scan over an append-only column), which a BRIN
-- index serves at a fraction of a B-tree's insert cost. Nothing else reads `created` by index.
--
-- The crash rule (docs/coherence.md, "The log after a crash"): PostgreSQL empties an UNLOGGED
-- table when it recovers from a crash (an immediate shutdown, a killed postmaster or backend, a
-- power cut) and on a promoted standby or a restored base backup. The horizon is UNLOGGED with
-- the log, so it is emptied at the same moment; a node that finds the horizon row missing
-- recreates it at the current snapshot's xmin, and every node whose watermark is below it (every
-- node that may have missed a lost row) flushes its caches, as it does for a pruned log. A clean
-- shutdown (`pg_ctl stop -m fast` or `smart`) keeps both tables.
--
-- The position sequence stays logged: positions are never handed out twice, also across a crash,
-- so a node never takes a new row for one it applied before the crash.
--
-- SET UNLOGGED rewrites the table once under an ACCESS EXCLUSIVE lock (writers to tracked tables
-- wait for it); on a table that is UNLOGGED already it does nothing.

ALTER TABLE openfhir_invalidation_log SET UNLOGGED;
-- PostgreSQL 15 made the identity sequence UNLOGGED with its table; before 15 sequences are always
-- logged (and ALTER SEQUENCE has no SET LOGGED).
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 150000
       AND to_regclass('openfhir_invalidation_log_position_seq') IS NOT NULL THEN
        EXECUTE 'ALTER SEQUENCE openfhir_invalidation_log_position_seq SET LOGGED';
    END IF;
END $$;
ALTER TABLE openfhir_invalidation_horizon SET UNLOGGED;

DROP INDEX IF EXISTS openfhir_invalidation_log_created;
CREATE INDEX IF NOT EXISTS openfhir_invalidation_log_created_brin
    ON openfhir_invalidation_log USING brin (created);

INSERT INTO openfhir_schema_migrations (version, name) VALUES (8, '0008_unlogged_log.sql')
    ON CONFLICT (version) DO NOTHING;
