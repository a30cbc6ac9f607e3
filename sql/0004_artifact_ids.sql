-- openfhir-cache schema, version 4: every OPT, context and model gets the server-assigned id
-- (a UUID) that openFHIR's API hands out and addresses them by (`/opt/{id}`, `/fc/context/{id}`,
-- `/fc/model/{id}`).
-- Idempotent: safe to run again, by the node (`openfhir-cache migrate`) or by a DBA with
--   psql -v ON_ERROR_STOP=1 -f sql/0004_artifact_ids.sql
--
-- Existing rows get a fresh id each (gen_random_uuid() is volatile, so ADD COLUMN evaluates it per
-- row); nothing else of a row changes, and no invalidation is logged (DDL fires no row trigger).
-- The tables keep their keys, (tenant, template_id) and (tenant, name): the caches, the
-- invalidation log and the routes that address an artifact by template id or model name go on
-- working unchanged. Adding the column rewrites each table once under an ACCESS EXCLUSIVE lock,
-- which takes well under a second for the few hundred rows a deployment holds.

ALTER TABLE opt ADD COLUMN IF NOT EXISTS id uuid NOT NULL DEFAULT gen_random_uuid();
CREATE UNIQUE INDEX IF NOT EXISTS opt_id ON opt (id);

ALTER TABLE fhir_connect_context ADD COLUMN IF NOT EXISTS id uuid NOT NULL DEFAULT gen_random_uuid();
CREATE UNIQUE INDEX IF NOT EXISTS fhir_connect_context_id ON fhir_connect_context (id);

ALTER TABLE fhir_connect_model ADD COLUMN IF NOT EXISTS id uuid NOT NULL DEFAULT gen_random_uuid();
CREATE UNIQUE INDEX IF NOT EXISTS fhir_connect_model_id ON fhir_connect_model (id);

INSERT INTO openfhir_schema_migrations (version, name) VALUES (4, '0004_artifact_ids.sql')
    ON CONFLICT (version) DO NOTHING;
