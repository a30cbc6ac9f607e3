-- openfhir-cache schema, version 1: tenants and the artifacts they own.
-- Idempotent: safe to run again, by the node (`openfhir-cache migrate`) or by a DBA with
--   psql -v ON_ERROR_STOP=1 -f sql/0001_schema.sql
-- Table and column names follow openFHIR's so migration scripts find them.

CREATE TABLE IF NOT EXISTS openfhir_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS tenant (
    id      text        PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._-]{1,64}$'),
    name    text        NOT NULL,
    config  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created timestamptz NOT NULL DEFAULT now(),
    updated timestamptz NOT NULL DEFAULT now()
);

-- OPT templates: the XML as uploaded, keyed by (tenant, normalized template id).
CREATE TABLE IF NOT EXISTS opt (
    tenant               text        NOT NULL REFERENCES tenant (id) ON DELETE CASCADE,
    template_id          text        NOT NULL,
    original_template_id text        NOT NULL,
    content              text        NOT NULL,
    created              timestamptz NOT NULL DEFAULT now(),
    updated              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, template_id)
);

-- FHIR Connect contexts, one per (tenant, normalized template id); `content` is the upload byte
-- for byte, `parsed` the same document as JSON.
CREATE TABLE IF NOT EXISTS fhir_connect_context (
    tenant               text        NOT NULL REFERENCES tenant (id) ON DELETE CASCADE,
    template_id          text        NOT NULL,
    original_template_id text        NOT NULL,
    content              text        NOT NULL,
    content_format       text        NOT NULL CHECK (content_format IN ('yaml', 'json')),
    parsed               jsonb       NOT NULL,
    created              timestamptz NOT NULL DEFAULT now(),
    updated              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, template_id)
);

-- FHIR Connect models and extensions, keyed by (tenant, metadata.name).
CREATE TABLE IF NOT EXISTS fhir_connect_model (
    tenant         text        NOT NULL REFERENCES tenant (id) ON DELETE CASCADE,
    name           text        NOT NULL,
    kind           text        NOT NULL CHECK (kind IN ('model', 'extension')),
    archetype      text,
    extends        text,
    content        text        NOT NULL,
    content_format text        NOT NULL CHECK (content_format IN ('yaml', 'json')),
    parsed         jsonb       NOT NULL,
    created        timestamptz NOT NULL DEFAULT now(),
    updated        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, name)
);
CREATE INDEX IF NOT EXISTS fhir_connect_model_archetype ON fhir_connect_model (tenant, archetype);

INSERT INTO tenant (id, name) VALUES ('default', 'Default tenant') ON CONFLICT (id) DO NOTHING;

INSERT INTO openfhir_schema_migrations (version, name) VALUES (1, '0001_schema.sql')
    ON CONFLICT (version) DO NOTHING;
