-- openfhir-cache schema, version 2: the invalidation log, its triggers and NOTIFY.
-- Idempotent: safe to run again, by the node (`openfhir-cache migrate`) or by a DBA with
--   psql -v ON_ERROR_STOP=1 -f sql/0002_invalidation_log.sql
--
-- Every change to a tracked table (INSERT, UPDATE, DELETE; TRUNCATE as a flush of its group),
-- however it is made (the API, a migration script, a DBA in psql), writes one log row per changed
-- key and sends `pg_notify('openfhir_invalidation', ...)` in the same transaction. Nodes LISTEN
-- for the notification and also replay the log (catch-up), so none stays stale for long.

CREATE TABLE IF NOT EXISTS openfhir_invalidation_log (
    position    bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The writing transaction. Positions are assigned at insert, not at commit, so readers use
    -- xid and the snapshot's xmin to know which rows are final (see docs/coherence.md).
    xid         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    cache_group text        NOT NULL,
    tenant      text,                -- NULL: every tenant (TRUNCATE)
    key         text,                -- NULL: every key of the tenant, or tenant-keyed group
    operation   text        NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
    origin      text,                -- node id when written by a node, else NULL
    -- clock_timestamp(), not now(): a long transaction's rows must not look old on commit.
    created     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS openfhir_invalidation_log_xid ON openfhir_invalidation_log (xid);
CREATE INDEX IF NOT EXISTS openfhir_invalidation_log_created ON openfhir_invalidation_log (created);

-- Rows with an xid below this horizon may have been pruned: a node whose cursor is older
-- flushes its caches instead of trusting them.
CREATE TABLE IF NOT EXISTS openfhir_invalidation_horizon (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    xid       xid8    NOT NULL
);
INSERT INTO openfhir_invalidation_horizon (xid) VALUES ('0') ON CONFLICT (singleton) DO NOTHING;

-- Writes one log row and its notification. The payload stays far below NOTIFY's 8000-byte
-- limit: a key too long to carry is left out and the listener reads the row instead.
CREATE OR REPLACE FUNCTION openfhir_log_invalidation(p_group text, p_tenant text, p_key text, p_op text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_origin  text := NULLIF(current_setting('openfhir.origin', true), '');
    v_app     text := current_setting('application_name', true);
    v_pos     bigint;
    v_payload text;
BEGIN
    IF v_origin IS NULL AND v_app LIKE 'openfhir-cache/%' THEN
        v_origin := substr(v_app, length('openfhir-cache/') + 1);
    END IF;
    INSERT INTO openfhir_invalidation_log (cache_group, tenant, key, operation, origin)
    VALUES (p_group, p_tenant, p_key, p_op, v_origin)
    RETURNING position INTO v_pos;
    v_payload := json_build_object('p', v_pos, 'x', pg_current_xact_id()::text, 'g', p_group,
                                   't', p_tenant, 'k', p_key, 'o', p_op, 'n', v_origin)::text;
    IF octet_length(v_payload) > 4000 THEN
        v_payload := json_build_object('p', v_pos, 'x', pg_current_xact_id()::text, 'g', p_group,
                                       'o', p_op, 'truncated', true)::text;
    END IF;
    PERFORM pg_notify('openfhir_invalidation', v_payload);
END $$;

-- Row trigger. Arguments: cache group, tenant column, key columns (comma-separated; '' for a
-- table keyed by tenant alone). An UPDATE that moves a row to another key logs both keys.
CREATE OR REPLACE FUNCTION openfhir_invalidation_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_group   text := TG_ARGV[0];
    v_tcol    text := TG_ARGV[1];
    v_kcols   text[] := CASE WHEN TG_ARGV[2] = '' THEN ARRAY[]::text[] ELSE string_to_array(TG_ARGV[2], ',') END;
    v_old     jsonb;
    v_new     jsonb;
    v_old_key text;
    v_new_key text;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        v_old := to_jsonb(OLD);
        SELECT string_agg(v_old ->> trim(c), ':' ORDER BY o) INTO v_old_key
          FROM unnest(v_kcols) WITH ORDINALITY AS u(c, o);
        PERFORM openfhir_log_invalidation(v_group, v_old ->> v_tcol, v_old_key, TG_OP);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        v_new := to_jsonb(NEW);
        SELECT string_agg(v_new ->> trim(c), ':' ORDER BY o) INTO v_new_key
          FROM unnest(v_kcols) WITH ORDINALITY AS u(c, o);
        IF TG_OP = 'INSERT' OR (v_new ->> v_tcol, v_new_key) IS DISTINCT FROM (v_old ->> v_tcol, v_old_key) THEN
            PERFORM openfhir_log_invalidation(v_group, v_new ->> v_tcol, v_new_key, TG_OP);
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- Statement trigger for TRUNCATE: a flush of the whole group.
CREATE OR REPLACE FUNCTION openfhir_invalidation_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM openfhir_log_invalidation(TG_ARGV[0], NULL, NULL, 'TRUNCATE');
    RETURN NULL;
END $$;

-- Puts a table under invalidation: every change to it is logged and announced under `p_group`,
-- keyed by `p_tenant_column` and `p_key_columns` (joined with ':'). Idempotent. An embedding
-- application calls it for its own tables and registers a cache group of the same name:
--   SELECT openfhir_track_table('my_mapping_table', 'my_group', 'tenant', ARRAY['name']);
CREATE OR REPLACE FUNCTION openfhir_track_table(p_table regclass, p_group text, p_tenant_column text,
                                                p_key_columns text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    c text;
BEGIN
    IF p_group !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'openfhir_track_table: cache group % must match ^[a-z][a-z0-9_]{0,62}$', quote_literal(p_group);
    END IF;
    FOREACH c IN ARRAY array_prepend(p_tenant_column, coalesce(p_key_columns, ARRAY[]::text[])) LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = c AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'openfhir_track_table: table % has no column %', p_table, quote_ident(c);
        END IF;
    END LOOP;
    EXECUTE format('DROP TRIGGER IF EXISTS openfhir_invalidation_row ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS openfhir_invalidation_truncate ON %s', p_table);
    EXECUTE format('CREATE TRIGGER openfhir_invalidation_row AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION openfhir_invalidation_row(%L, %L, %L)',
                   p_table, p_group, p_tenant_column, array_to_string(coalesce(p_key_columns, ARRAY[]::text[]), ','));
    EXECUTE format('CREATE TRIGGER openfhir_invalidation_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION openfhir_invalidation_truncate(%L)',
                   p_table, p_group);
END $$;

SELECT openfhir_track_table('tenant', 'tenant', 'id', ARRAY[]::text[]);
SELECT openfhir_track_table('opt', 'opt', 'tenant', ARRAY['template_id']);
SELECT openfhir_track_table('fhir_connect_context', 'context', 'tenant', ARRAY['template_id']);
SELECT openfhir_track_table('fhir_connect_model', 'model', 'tenant', ARRAY['name']);

INSERT INTO openfhir_schema_migrations (version, name) VALUES (2, '0002_invalidation_log.sql')
    ON CONFLICT (version) DO NOTHING;
