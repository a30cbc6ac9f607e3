-- openfhir-cache schema, version 5: the record of the bootstrap directory's files (openFHIR's
-- `bootstrap` table, with the content hash this project adds).
-- Idempotent: safe to run again, by the node (`openfhir-cache migrate`) or by a DBA with
--   psql -v ON_ERROR_STOP=1 -f sql/0005_bootstrap.sql
--
-- One row per file a node loaded from OPENFHIR_BOOTSTRAP_DIR: its path in the directory, the
-- SHA-256 of the content it loaded, what it was and the key it was stored under. A node loads a
-- file only when it has no row or its content changed. Delete a row to load its file again at
-- the next start.

CREATE TABLE IF NOT EXISTS openfhir_bootstrap (
    path   text        PRIMARY KEY,
    sha256 text        NOT NULL,
    kind   text        NOT NULL CHECK (kind IN ('opt', 'context', 'model')),
    key    text        NOT NULL,
    node   text        NOT NULL,
    loaded timestamptz NOT NULL DEFAULT now()
);

INSERT INTO openfhir_schema_migrations (version, name) VALUES (5, '0005_bootstrap.sql')
    ON CONFLICT (version) DO NOTHING;
