-- openfhir-cache schema, version 9: a node's deferred notifications are packed, several log rows
-- to one NOTIFY.
-- Idempotent: safe to run again, by the node (`openfhir-cache migrate`) or by a DBA with
--   psql -v ON_ERROR_STOP=1 -f sql/0009_packed_notify.sql
--
-- Why: `openfhir_notify_transactions` (version 3, payload of version 6) sent one notification per
-- log row. Every notification is queued by PostgreSQL, read by every listening backend and
-- delivered to every node, which wakes, parses and applies it: that work is paid per
-- notification, so per row. Now the rows' payloads (unchanged, `openfhir_invalidation_payload`)
-- are sent as JSON arrays, as many rows to one notification as fit in 7,900 bytes (NOTIFY's limit
-- is 8,000; one payload is at most about 4,000). A node of this release reads an array as its rows
-- in order and a single object as before (plain-SQL writes are still announced one row per
-- notification, by the trigger). A node of an earlier release refuses an array as malformed and
-- catches up from the log instead: correct, only slower (mixed releases are not supported).
--
-- The statement still commits without waiting for a WAL flush, as before: it writes no WAL
-- before its commit record, and PostgreSQL commits such a transaction asynchronously
-- (`RecordTransactionCommit`), whatever `synchronous_commit` says.

CREATE OR REPLACE FUNCTION openfhir_notify_transactions(p_xids xid8[])
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    r       record;
    v_one   text;
    v_batch text := '';
    n       bigint := 0;
BEGIN
    FOR r IN SELECT position, xid, cache_group, tenant, key, operation, origin, created
               FROM openfhir_invalidation_log WHERE xid = ANY (p_xids) ORDER BY position LOOP
        v_one := openfhir_invalidation_payload(r.position, r.xid, r.cache_group, r.tenant, r.key,
                                               r.operation, r.origin, r.created);
        IF v_batch <> '' AND octet_length(v_batch) + octet_length(v_one) + 3 > 7900 THEN
            PERFORM pg_notify('openfhir_invalidation', '[' || v_batch || ']');
            v_batch := '';
        END IF;
        v_batch := CASE WHEN v_batch = '' THEN v_one ELSE v_batch || ',' || v_one END;
        n := n + 1;
    END LOOP;
    IF v_batch <> '' THEN
        PERFORM pg_notify('openfhir_invalidation', '[' || v_batch || ']');
    END IF;
    RETURN n;
END $$;

INSERT INTO openfhir_schema_migrations (version, name) VALUES (9, '0009_packed_notify.sql')
    ON CONFLICT (version) DO NOTHING;
