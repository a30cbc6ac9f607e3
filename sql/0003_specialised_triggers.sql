-- openfhir-cache schema, version 3: invalidation triggers specialised per table, and NOTIFY that
-- a node can send itself after COMMIT.
-- Idempotent: safe to run again, by the node (`openfhir-cache migrate`) or by a DBA with
--   psql -v ON_ERROR_STOP=1 -f sql/0003_specialised_triggers.sql
--
-- Same contract as version 2 (one log row per changed key, TRUNCATE as a flush of its group, the
-- same NOTIFY payload), two costs less:
-- * `openfhir_track_table` generates a row trigger function for each table that reads the tenant
--   and key columns straight from OLD and NEW. Version 2's generic trigger built to_jsonb(OLD) and
--   to_jsonb(NEW), which detoasts the whole row (an OPT's XML) to read two short columns.
-- * A transaction that sets `openfhir.notify` to 'deferred' (transaction-local, as a node's own
--   writes do) is logged but not announced by the trigger: PostgreSQL serialises the commits of
--   transactions that sent a notification, so the node sends it after COMMIT instead, from a
--   separate short transaction (`openfhir_notify_transactions`), batched. Every other writer
--   (psql, migration scripts, other programs) is still announced by the trigger.

-- The NOTIFY payload of one log row. Stays far below NOTIFY's 8000-byte limit: a key too long to
-- carry is left out and the listener reads the row instead.
CREATE OR REPLACE FUNCTION openfhir_invalidation_payload(p_position bigint, p_xid xid8, p_group text,
                                                         p_tenant text, p_key text, p_op text,
                                                         p_origin text)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN octet_length(f) > 4000
                THEN json_build_object('p', p_position, 'x', p_xid::text, 'g', p_group, 'o', p_op,
                                       'truncated', true)::text
                ELSE f END
      FROM (SELECT json_build_object('p', p_position, 'x', p_xid::text, 'g', p_group, 't', p_tenant,
                                     'k', p_key, 'o', p_op, 'n', p_origin)::text AS f) AS full_payload
$$;

-- Writes one log row and, unless the transaction deferred it, its notification.
CREATE OR REPLACE FUNCTION openfhir_log_invalidation(p_group text, p_tenant text, p_key text, p_op text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_origin text := NULLIF(current_setting('openfhir.origin', true), '');
    v_app    text;
    v_pos    bigint;
    v_xid    xid8;
BEGIN
    IF v_origin IS NULL THEN
        v_app := current_setting('application_name', true);
        IF v_app LIKE 'openfhir-cache/%' THEN
            v_origin := substr(v_app, length('openfhir-cache/') + 1);
        END IF;
    END IF;
    INSERT INTO openfhir_invalidation_log (cache_group, tenant, key, operation, origin)
    VALUES (p_group, p_tenant, p_key, p_op, v_origin)
    RETURNING position, xid INTO v_pos, v_xid;
    IF current_setting('openfhir.notify', true) IS DISTINCT FROM 'deferred' THEN
        PERFORM pg_notify('openfhir_invalidation',
                          openfhir_invalidation_payload(v_pos, v_xid, p_group, p_tenant, p_key, p_op, v_origin));
    END IF;
END $$;

-- Sends the notifications of committed transactions that deferred them: one per log row, in log
-- order, with the payload the trigger would have sent. A node calls it after COMMIT in its own
-- short transaction, which writes nothing, so it holds the notification lock only briefly.
-- Returns how many it sent.
CREATE OR REPLACE FUNCTION openfhir_notify_transactions(p_xids xid8[])
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    r record;
    n bigint := 0;
BEGIN
    FOR r IN SELECT position, xid, cache_group, tenant, key, operation, origin
               FROM openfhir_invalidation_log WHERE xid = ANY (p_xids) ORDER BY position LOOP
        PERFORM pg_notify('openfhir_invalidation',
                          openfhir_invalidation_payload(r.position, r.xid, r.cache_group, r.tenant,
                                                        r.key, r.operation, r.origin));
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

-- The text of column `p_column` of the row `p_row` ('OLD' or 'NEW'), exactly as version 2 read it
-- (`to_jsonb(row) ->> column`): text and varchar as they are, any other type through its JSON form
-- (which touches only that column, never the rest of the row).
CREATE OR REPLACE FUNCTION openfhir_column_text(p_table regclass, p_row text, p_column text)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN a.atttypid IN ('text'::regtype, 'varchar'::regtype)
                THEN format('%s.%I::text', p_row, p_column)
                ELSE format('(to_jsonb(%s.%I) #>> ''{}'')', p_row, p_column) END
      FROM pg_attribute a
     WHERE a.attrelid = p_table AND a.attname = p_column AND a.attnum > 0 AND NOT a.attisdropped
$$;

-- The key expression of `p_row`: the key columns joined with ':', NULL columns left out, NULL
-- when every one is NULL or there are none (version 2's string_agg, unrolled).
CREATE OR REPLACE FUNCTION openfhir_key_expression(p_table regclass, p_row text, p_key_columns text[])
RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_parts text[] := ARRAY[]::text[];
    c       text;
BEGIN
    FOREACH c IN ARRAY p_key_columns LOOP
        v_parts := v_parts || openfhir_column_text(p_table, p_row, c);
    END LOOP;
    IF cardinality(v_parts) = 0 THEN
        RETURN 'NULL::text';
    ELSIF cardinality(v_parts) = 1 THEN
        RETURN v_parts[1];
    END IF;
    RETURN format('CASE WHEN %s THEN NULL::text ELSE concat_ws('':'', %s) END',
                  (SELECT string_agg(format('%s IS NULL', p), ' AND ') FROM unnest(v_parts) AS p),
                  array_to_string(v_parts, ', '));
END $$;

-- Puts a table under invalidation: every change to it is logged and announced under `p_group`,
-- keyed by `p_tenant_column` and `p_key_columns` (joined with ':'). Idempotent; call it again
-- after changing the table's key columns. An embedding application calls it for its own tables
-- and registers a cache group of the same name:
--   SELECT openfhir_track_table('my_mapping_table', 'my_group', 'tenant', ARRAY['name']);
-- It generates the table's own trigger function, `openfhir_invalidation_row_<hash of the table
-- name>` (an UPDATE that moves a row to another key logs both keys), and drops the one it replaces.
CREATE OR REPLACE FUNCTION openfhir_track_table(p_table regclass, p_group text, p_tenant_column text,
                                                p_key_columns text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[] := coalesce(p_key_columns, ARRAY[]::text[]);
    v_fn   text;
    v_old  regprocedure;
    c      text;
BEGIN
    IF p_group IS NULL OR p_group !~ '^[a-z][a-z0-9_]{0,62}$' THEN
        RAISE EXCEPTION 'openfhir_track_table: cache group % must match ^[a-z][a-z0-9_]{0,62}$', quote_nullable(p_group);
    END IF;
    FOREACH c IN ARRAY array_prepend(p_tenant_column, v_keys) LOOP
        IF c IS NULL OR NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = p_table AND attname = c AND attnum > 0 AND NOT attisdropped) THEN
            RAISE EXCEPTION 'openfhir_track_table: table % has no column %', p_table, quote_ident(c);
        END IF;
    END LOOP;
    SELECT 'openfhir_invalidation_row_' || left(md5(format('%I.%I', n.nspname, t.relname)), 16)
      INTO v_fn
      FROM pg_class t JOIN pg_namespace n ON n.oid = t.relnamespace
     WHERE t.oid = p_table;
    -- The body is passed as a quoted literal, not dollar-quoted: identifiers may contain '$'.
    EXECUTE format('CREATE OR REPLACE FUNCTION %I() RETURNS trigger LANGUAGE plpgsql AS %L', v_fn, format(
$body$
DECLARE
    v_old_tenant text;
    v_old_key    text;
    v_new_tenant text;
    v_new_key    text;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        v_old_tenant := %s;
        v_old_key := %s;
        PERFORM openfhir_log_invalidation(%L, v_old_tenant, v_old_key, TG_OP);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        v_new_tenant := %s;
        v_new_key := %s;
        IF TG_OP = 'INSERT' OR (v_new_tenant, v_new_key) IS DISTINCT FROM (v_old_tenant, v_old_key) THEN
            PERFORM openfhir_log_invalidation(%L, v_new_tenant, v_new_key, TG_OP);
        END IF;
    END IF;
    RETURN NULL;
END$body$,
        openfhir_column_text(p_table, 'OLD', p_tenant_column), openfhir_key_expression(p_table, 'OLD', v_keys),
        p_group,
        openfhir_column_text(p_table, 'NEW', p_tenant_column), openfhir_key_expression(p_table, 'NEW', v_keys),
        p_group));
    EXECUTE format('COMMENT ON FUNCTION %I() IS %L', v_fn,
                   format('openfhir-cache invalidation trigger generated by openfhir_track_table(%L, %L, %L, %L); '
                          'call it again instead of editing', p_table::text, p_group, p_tenant_column, v_keys::text));

    SELECT tgfoid::regprocedure INTO v_old
      FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'openfhir_invalidation_row' AND NOT tgisinternal;
    EXECUTE format('DROP TRIGGER IF EXISTS openfhir_invalidation_row ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS openfhir_invalidation_truncate ON %s', p_table);
    EXECUTE format('CREATE TRIGGER openfhir_invalidation_row AFTER INSERT OR UPDATE OR DELETE ON %s '
                   'FOR EACH ROW EXECUTE FUNCTION %I()', p_table, v_fn);
    EXECUTE format('CREATE TRIGGER openfhir_invalidation_truncate AFTER TRUNCATE ON %s '
                   'FOR EACH STATEMENT EXECUTE FUNCTION openfhir_invalidation_truncate(%L)',
                   p_table, p_group);
    -- The function generated for this table under another name (it was renamed since), unless
    -- something else still uses it.
    IF v_old IS NOT NULL
       AND (SELECT proname FROM pg_proc WHERE oid = v_old) LIKE 'openfhir\_invalidation\_row\_%'
       AND (SELECT proname FROM pg_proc WHERE oid = v_old) <> v_fn
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgfoid = v_old) THEN
        EXECUTE format('DROP FUNCTION %s', v_old);
    END IF;
END $$;

-- Takes a table out of invalidation: drops its triggers and the function generated for it.
-- Idempotent; NULL (e.g. `to_regclass` of a table that does not exist) does nothing.
CREATE OR REPLACE FUNCTION openfhir_untrack_table(p_table regclass)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_fn regprocedure;
BEGIN
    IF p_table IS NULL THEN
        RETURN;
    END IF;
    SELECT tgfoid::regprocedure INTO v_fn
      FROM pg_trigger WHERE tgrelid = p_table AND tgname = 'openfhir_invalidation_row' AND NOT tgisinternal;
    EXECUTE format('DROP TRIGGER IF EXISTS openfhir_invalidation_row ON %s', p_table);
    EXECUTE format('DROP TRIGGER IF EXISTS openfhir_invalidation_truncate ON %s', p_table);
    IF v_fn IS NOT NULL
       AND (SELECT proname FROM pg_proc WHERE oid = v_fn) LIKE 'openfhir\_invalidation\_row\_%'
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgfoid = v_fn) THEN
        EXECUTE format('DROP FUNCTION %s', v_fn);
    END IF;
END $$;

SELECT openfhir_track_table('tenant', 'tenant', 'id', ARRAY[]::text[]);
SELECT openfhir_track_table('opt', 'opt', 'tenant', ARRAY['template_id']);
SELECT openfhir_track_table('fhir_connect_context', 'context', 'tenant', ARRAY['template_id']);
SELECT openfhir_track_table('fhir_connect_model', 'model', 'tenant', ARRAY['name']);

-- Application tables tracked under version 2 still use its generic trigger: regenerate theirs
-- from the trigger's arguments (group, tenant column, key columns joined with ','). A table that
-- cannot be regenerated keeps the version 2 trigger, which still works, and is named in a warning.
DO $$
DECLARE
    t      record;
    v_args text[];
    v_rest bytea;
    v_cut  int;
BEGIN
    FOR t IN SELECT tgrelid::regclass AS tbl, tgnargs, tgargs FROM pg_trigger
              WHERE tgname = 'openfhir_invalidation_row' AND NOT tgisinternal
                AND tgfoid = 'openfhir_invalidation_row()'::regprocedure LOOP
        v_args := ARRAY[]::text[];
        v_rest := t.tgargs;
        FOR i IN 1..t.tgnargs LOOP
            v_cut := position('\x00'::bytea IN v_rest);
            v_args := v_args || convert_from(substring(v_rest FROM 1 FOR v_cut - 1), getdatabaseencoding());
            v_rest := substring(v_rest FROM v_cut + 1);
        END LOOP;
        BEGIN
            PERFORM openfhir_track_table(t.tbl, v_args[1], v_args[2],
                CASE WHEN coalesce(v_args[3], '') = '' THEN ARRAY[]::text[]
                     ELSE ARRAY(SELECT trim(k) FROM unnest(string_to_array(v_args[3], ',')) AS k) END);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'openfhir-cache: % keeps the version 2 invalidation trigger (%); call openfhir_track_table for it',
                t.tbl, SQLERRM;
        END;
    END LOOP;
END $$;

INSERT INTO openfhir_schema_migrations (version, name) VALUES (3, '0003_specialised_triggers.sql')
    ON CONFLICT (version) DO NOTHING;
