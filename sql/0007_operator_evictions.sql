-- openfhir-cache schema, version 7: operators' evictions are recorded in the invalidation log.
-- Idempotent: safe to run again, by the node (`openfhir-cache migrate`) or by a DBA with
--   psql -v ON_ERROR_STOP=1 -f sql/0007_operator_evictions.sql
--
-- `POST /caches/evict` on a node writes one log row with operation 'EVICT' (through
-- openfhir_log_invalidation, so it is announced by NOTIFY like any change) besides broadcasting it
-- to its peers, so a peer that misses the broadcast (a cut link, a restart) applies it by NOTIFY or
-- catch-up. `cache_group` says what was evicted: 'opt', 'fhir_connect', 'tenant' or 'all'; `tenant`
-- NULL means every tenant, `key` NULL every key of the tenant. A node of an earlier release reads
-- such a row as a change of that group (or ignores 'all' and 'fhir_connect' as groups it does not
-- know): mixed releases are not supported.

ALTER TABLE openfhir_invalidation_log
    DROP CONSTRAINT IF EXISTS openfhir_invalidation_log_operation_check;
ALTER TABLE openfhir_invalidation_log
    ADD CONSTRAINT openfhir_invalidation_log_operation_check
    CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'EVICT'));

INSERT INTO openfhir_schema_migrations (version, name) VALUES (7, '0007_operator_evictions.sql')
    ON CONFLICT (version) DO NOTHING;
