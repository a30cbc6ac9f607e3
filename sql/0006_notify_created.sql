-- openfhir-cache schema, version 6: NOTIFY payloads say when their log row was written.
-- Idempotent: safe to run again, by the node (`openfhir-cache migrate`) or by a DBA with
--   psql -v ON_ERROR_STOP=1 -f sql/0006_notify_created.sql
--
-- Same contract as version 3, one field more: `c`, the row's `created` in milliseconds since the
-- Unix epoch (the database's clock), so a node can measure how long a change took to reach it by
-- NOTIFY (`openfhir_invalidation_delay_seconds` in /metrics). Catch-up reads `created` from the
-- log itself. A node of an earlier release refuses payloads with the new field as malformed and
-- catches up from the log instead: correct, only slower (mixed releases are not supported).

-- The NOTIFY payload of one log row, with its `created`.
CREATE OR REPLACE FUNCTION openfhir_invalidation_payload(p_position bigint, p_xid xid8, p_group text,
                                                         p_tenant text, p_key text, p_op text,
                                                         p_origin text, p_created timestamptz)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN octet_length(f) > 4000
                THEN json_build_object('p', p_position, 'x', p_xid::text, 'g', p_group, 'o', p_op,
                                       'c', c, 'truncated', true)::text
                ELSE f END
      FROM (SELECT json_build_object('p', p_position, 'x', p_xid::text, 'g', p_group, 't', p_tenant,
                                     'k', p_key, 'o', p_op, 'n', p_origin, 'c', c)::text AS f, c
              FROM (SELECT (extract(epoch FROM p_created) * 1000)::bigint AS c) AS created
           ) AS full_payload
$$;

-- Writes one log row and, unless the transaction deferred it, its notification.
CREATE OR REPLACE FUNCTION openfhir_log_invalidation(p_group text, p_tenant text, p_key text, p_op text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_origin  text := NULLIF(current_setting('openfhir.origin', true), '');
    v_app     text;
    v_pos     bigint;
    v_xid     xid8;
    v_created timestamptz;
BEGIN
    IF v_origin IS NULL THEN
        v_app := current_setting('application_name', true);
        IF v_app LIKE 'openfhir-cache/%' THEN
            v_origin := substr(v_app, length('openfhir-cache/') + 1);
        END IF;
    END IF;
    INSERT INTO openfhir_invalidation_log (cache_group, tenant, key, operation, origin)
    VALUES (p_group, p_tenant, p_key, p_op, v_origin)
    RETURNING position, xid, created INTO v_pos, v_xid, v_created;
    IF current_setting('openfhir.notify', true) IS DISTINCT FROM 'deferred' THEN
        PERFORM pg_notify('openfhir_invalidation',
                          openfhir_invalidation_payload(v_pos, v_xid, p_group, p_tenant, p_key, p_op,
                                                        v_origin, v_created));
    END IF;
END $$;

-- Sends the notifications of committed transactions that deferred them (see version 3), with the
-- payload the trigger would have sent.
CREATE OR REPLACE FUNCTION openfhir_notify_transactions(p_xids xid8[])
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    r record;
    n bigint := 0;
BEGIN
    FOR r IN SELECT position, xid, cache_group, tenant, key, operation, origin, created
               FROM openfhir_invalidation_log WHERE xid = ANY (p_xids) ORDER BY position LOOP
        PERFORM pg_notify('openfhir_invalidation',
                          openfhir_invalidation_payload(r.position, r.xid, r.cache_group, r.tenant,
                                                        r.key, r.operation, r.origin, r.created));
        n := n + 1;
    END LOOP;
    RETURN n;
END $$;

INSERT INTO openfhir_schema_migrations (version, name) VALUES (6, '0006_notify_created.sql')
    ON CONFLICT (version) DO NOTHING;
