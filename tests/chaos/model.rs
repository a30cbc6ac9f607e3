//! What the chaos run reads and writes: the keys, how a node and the database each answer for a
//! key, and the writes.
//!
//! Every key is read through a *cached* route, so a stale cache entry shows up as a stale answer:
//!
//! | key | node route (cache) | database |
//! |---|---|---|
//! | `opt <tenant>/<id>` | `GET /opt/{id}` with `X-Tenant-Id` (`opt`, `tenant`) | `opt.content` |
//! | `context <id>` | `GET /fc/context/{id}`, YAML as uploaded (`context`) | `fhir_connect_context.content` |
//! | `contexts` | `GET /fc/context` (`all_contexts`) | every context's id and `metadata.version` |
//! | `helpers <template>` | `GET /fc/helpers/{template}` (`helpers`, `mapper`) | the mapping names of the model the template's context names |
//! | `tenant <id>` | `GET /tenants/{id}` (`tenant`) | `tenant.name` |

use std::fmt;

use tokio_postgres::NoTls;

pub const SCRATCH: &str = "chaos-scratch";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Opt { tenant: String, id: String },
    Context { id: String },
    AllContexts,
    Helpers { template: String, model: String },
    Tenant { id: String },
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Opt { tenant, id } => write!(f, "opt {tenant}/{id}"),
            Key::Context { id } => write!(f, "context default/{id}"),
            Key::AllContexts => write!(f, "contexts (list) default"),
            Key::Helpers { template, model } => {
                write!(f, "helpers default/{template} (model {model})")
            }
            Key::Tenant { id } => write!(f, "tenant {id}"),
        }
    }
}

/// One answer for a key: absent, a value, or an unexpected status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Obs {
    Missing,
    Val(String),
    Status(u16, String),
}

impl Obs {
    /// A short form for reports: the marker the value carries, if any.
    pub fn short(&self) -> String {
        match self {
            Obs::Missing => "absent".into(),
            Obs::Status(s, b) => format!("HTTP {s}: {}", truncate(b, 120)),
            Obs::Val(v) => {
                let markers = self.markers();
                if markers.is_empty() {
                    format!("{:?}", truncate(v, 80))
                } else {
                    markers.join(",")
                }
            }
        }
    }
}

impl Obs {
    /// The write markers (`mk<n>`) a value carries.
    pub fn markers(&self) -> Vec<&str> {
        let Obs::Val(v) = self else {
            return Vec::new();
        };
        let mut markers: Vec<&str> = v
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| {
                w.len() > 2 && w.starts_with("mk") && w[2..].bytes().all(|b| b.is_ascii_digit())
            })
            .collect();
        markers.dedup();
        markers
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}

/// Asks a node for `key`; `Err` is a transport error (refused, reset, timeout).
pub async fn observe(http: &reqwest::Client, base: &str, key: &Key) -> Result<Obs, String> {
    let (path, tenant, accept) = match key {
        Key::Opt { tenant, id } => (format!("/opt/{id}"), tenant.as_str(), None),
        Key::Context { id } => (
            format!("/fc/context/{id}"),
            "default",
            Some("application/yaml"),
        ),
        Key::AllContexts => ("/fc/context".to_string(), "default", None),
        Key::Helpers { template, .. } => (format!("/fc/helpers/{template}"), "default", None),
        Key::Tenant { id } => (format!("/tenants/{id}"), "default", None),
    };
    let mut req = http
        .get(format!("{base}{path}"))
        .header("x-tenant-id", tenant);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let body = r.text().await.map_err(|e| e.to_string())?;
    Ok(match status {
        200 => match key {
            Key::Opt { .. } | Key::Context { .. } => Obs::Val(body),
            Key::AllContexts => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => Obs::Val(contexts_summary(v.as_array().into_iter().flatten().map(
                    |c| {
                        (
                            // The list holds openFHIR's documents: the key is the normalized
                            // context.template.id.
                            c["context"]["template"]["id"].as_str().map_or_else(
                                || "?".to_string(),
                                |t| t.to_lowercase().replace(' ', "_"),
                            ),
                            c["metadata"]["version"].as_str().unwrap_or("?").to_string(),
                        )
                    },
                ))),
                Err(_) => Obs::Status(status, body),
            },
            Key::Helpers { .. } => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => Obs::Val(
                    v["roots"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| r["mapping"].as_str().unwrap_or("?").to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                Err(_) => Obs::Status(status, body),
            },
            Key::Tenant { .. } => match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) => Obs::Val(v["name"].as_str().unwrap_or("?").to_string()),
                Err(_) => Obs::Status(status, body),
            },
        },
        404 => Obs::Missing,
        _ => Obs::Status(status, body),
    })
}

fn contexts_summary(items: impl Iterator<Item = (String, String)>) -> String {
    let mut v: Vec<String> = items.map(|(id, ver)| format!("{id}={ver}")).collect();
    v.sort();
    v.join(",")
}

// ---------------------------------------------------------------------------------------------
// The database
// ---------------------------------------------------------------------------------------------

/// A direct connection to the nodes' database, reconnected on demand (PostgreSQL restarts).
pub struct Sql {
    url: String,
    client: Option<tokio_postgres::Client>,
}

/// A failed SQL statement. `maybe_committed` is false when a write certainly did not happen: no
/// connection, or the server answered with an error.
#[derive(Debug)]
pub struct SqlError {
    pub maybe_committed: bool,
    pub message: String,
}

/// How long one harness statement may take before the connection is given up.
const STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Sql {
    pub fn new(url: &str) -> Sql {
        Sql {
            url: url.to_string(),
            client: None,
        }
    }

    async fn client(&mut self) -> Result<&tokio_postgres::Client, SqlError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            let mut cfg: tokio_postgres::Config = self.url.parse().map_err(|e| SqlError {
                maybe_committed: false,
                message: format!("bad URL: {e}"),
            })?;
            cfg.connect_timeout(std::time::Duration::from_secs(3));
            cfg.application_name("chaos-harness");
            let (client, conn) = cfg.connect(NoTls).await.map_err(|e| SqlError {
                maybe_committed: false,
                message: e.to_string(),
            })?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.client = Some(client);
        }
        Ok(self.client.as_ref().unwrap())
    }

    fn failed(&mut self, e: tokio_postgres::Error) -> SqlError {
        // A statement error (constraint, syntax) leaves the connection usable; anything else
        // (closed, reset) does not.
        let db_error = e.as_db_error().is_some();
        if !db_error {
            self.client = None;
        }
        SqlError {
            maybe_committed: !db_error,
            message: e.to_string(),
        }
    }

    /// The outcome of one statement run under [`STATEMENT_TIMEOUT`]: a timeout drops the
    /// connection and may have committed.
    fn settle<T>(
        &mut self,
        r: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, SqlError> {
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => {
                self.client = None;
                Err(SqlError {
                    maybe_committed: true,
                    message: "timed out".into(),
                })
            }
        }
    }

    pub async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, SqlError> {
        let c = self.client().await?;
        let r = tokio::time::timeout(STATEMENT_TIMEOUT, c.query(sql, params)).await;
        self.settle(r)
    }

    pub async fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, SqlError> {
        let c = self.client().await?;
        let r = tokio::time::timeout(STATEMENT_TIMEOUT, c.execute(sql, params)).await;
        self.settle(r)
    }

    /// What `key` is in the database now.
    pub async fn value(&mut self, key: &Key) -> Result<Obs, SqlError> {
        let one = |rows: Vec<tokio_postgres::Row>| match rows.first() {
            Some(r) => match r.get::<_, Option<String>>(0) {
                Some(v) => Obs::Val(v),
                None => Obs::Val("?".into()),
            },
            None => Obs::Missing,
        };
        Ok(match key {
            Key::Opt { tenant, id } => one(self
                .query(
                    "SELECT content FROM opt WHERE tenant = $1 AND template_id = $2",
                    &[tenant, id],
                )
                .await?),
            Key::Context { id } => one(self
                .query(
                    "SELECT content FROM fhir_connect_context \
                     WHERE tenant = 'default' AND template_id = $1",
                    &[id],
                )
                .await?),
            Key::AllContexts => {
                let rows = self
                    .query(
                        "SELECT template_id, coalesce(parsed->'metadata'->>'version', '?') \
                         FROM fhir_connect_context WHERE tenant = 'default'",
                        &[],
                    )
                    .await?;
                Obs::Val(contexts_summary(
                    rows.iter()
                        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))),
                ))
            }
            Key::Helpers { model, .. } => one(self
                .query(
                    "SELECT string_agg(m->>'name', ',' ORDER BY n) \
                     FROM fhir_connect_model, \
                          jsonb_array_elements(parsed->'mappings') WITH ORDINALITY AS x(m, n) \
                     WHERE tenant = 'default' AND name = $1",
                    &[model],
                )
                .await?),
            Key::Tenant { id } => one(self
                .query("SELECT name FROM tenant WHERE id = $1", &[id])
                .await?),
        })
    }

    /// Whether a row exists (`SELECT 1 ...`).
    pub async fn exists(
        &mut self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<bool, SqlError> {
        Ok(!self.query(sql, params).await?.is_empty())
    }
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub enum Write {
    PutOpt {
        tenant: String,
        id: String,
        marker: String,
    },
    DeleteOpt {
        tenant: String,
        id: String,
    },
    /// Plain SQL upsert of an OPT's content, straight in the database.
    SqlOpt {
        tenant: String,
        id: String,
        marker: String,
    },
    PutContext {
        id: String,
        marker: String,
    },
    PutModel {
        model: String,
        template: String,
        marker: String,
    },
    PutTenant {
        id: String,
        marker: String,
    },
    /// Plain SQL `UPDATE tenant SET name`.
    SqlTenant {
        id: String,
        marker: String,
    },
    DeleteTenant {
        id: String,
    },
}

impl Write {
    pub fn via_http(&self) -> bool {
        !matches!(self, Write::SqlOpt { .. } | Write::SqlTenant { .. })
    }

    /// The keys whose answers this write changes.
    pub fn keys(&self) -> Vec<Key> {
        match self {
            Write::PutOpt { tenant, id, .. }
            | Write::DeleteOpt { tenant, id }
            | Write::SqlOpt { tenant, id, .. } => vec![Key::Opt {
                tenant: tenant.clone(),
                id: id.clone(),
            }],
            Write::PutContext { id, .. } => vec![Key::Context { id: id.clone() }, Key::AllContexts],
            Write::PutModel {
                model, template, ..
            } => vec![Key::Helpers {
                template: template.clone(),
                model: model.clone(),
            }],
            Write::PutTenant { id, .. } | Write::SqlTenant { id, .. } => {
                vec![Key::Tenant { id: id.clone() }]
            }
            Write::DeleteTenant { id } => vec![
                Key::Tenant { id: id.clone() },
                Key::Opt {
                    tenant: id.clone(),
                    id: "s0".into(),
                },
            ],
        }
    }

    /// What each key written holds in the database once this write committed.
    pub fn values(&self) -> Vec<(Key, Obs)> {
        let keys = self.keys();
        match self {
            Write::PutOpt { id, marker, .. } | Write::SqlOpt { id, marker, .. } => {
                vec![(
                    keys[0].clone(),
                    Obs::Val(crate::common::opt_xml(id, marker)),
                )]
            }
            Write::DeleteOpt { .. } => vec![(keys[0].clone(), Obs::Missing)],
            Write::PutContext { id, marker } => {
                vec![(
                    keys[0].clone(),
                    Obs::Val(crate::common::context_yaml(id, marker)),
                )]
            }
            Write::PutModel { marker, .. } => {
                vec![(keys[0].clone(), Obs::Val(format!("m-{marker}")))]
            }
            Write::PutTenant { marker, .. } | Write::SqlTenant { marker, .. } => {
                vec![(keys[0].clone(), Obs::Val(format!("n-{marker}")))]
            }
            Write::DeleteTenant { .. } => keys.into_iter().map(|k| (k, Obs::Missing)).collect(),
        }
    }

    /// The marker the write carries (its version), if any.
    pub fn marker(&self) -> Option<&str> {
        match self {
            Write::PutOpt { marker, .. }
            | Write::SqlOpt { marker, .. }
            | Write::PutContext { marker, .. }
            | Write::PutModel { marker, .. }
            | Write::PutTenant { marker, .. }
            | Write::SqlTenant { marker, .. } => Some(marker),
            Write::DeleteOpt { .. } | Write::DeleteTenant { .. } => None,
        }
    }

    /// The kind, for the write counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Write::PutOpt { .. } => "PUT /opt",
            Write::DeleteOpt { .. } => "DELETE /opt",
            Write::SqlOpt { .. } => "SQL opt",
            Write::PutContext { .. } => "PUT /fc/context",
            Write::PutModel { .. } => "PUT /fc/model",
            Write::PutTenant { .. } => "PUT /tenants",
            Write::SqlTenant { .. } => "SQL tenant",
            Write::DeleteTenant { .. } => "DELETE /tenants",
        }
    }

    /// The HTTP request of an HTTP write: method, path, tenant header, content type, body.
    pub fn request(
        &self,
    ) -> (
        reqwest::Method,
        String,
        String,
        Option<&'static str>,
        String,
    ) {
        use reqwest::Method;
        match self {
            Write::PutOpt { tenant, id, marker } => (
                Method::PUT,
                format!("/opt/{id}"),
                tenant.clone(),
                Some("application/xml"),
                crate::common::opt_xml(id, marker),
            ),
            Write::DeleteOpt { tenant, id } => (
                Method::DELETE,
                format!("/opt/{id}"),
                tenant.clone(),
                None,
                String::new(),
            ),
            Write::PutContext { id, marker } => (
                Method::PUT,
                format!("/fc/context/{id}"),
                "default".into(),
                Some("application/yaml"),
                crate::common::context_yaml(id, marker),
            ),
            Write::PutModel { model, marker, .. } => (
                Method::PUT,
                format!("/fc/model/{model}"),
                "default".into(),
                Some("application/yaml"),
                model_yaml(model, marker),
            ),
            Write::PutTenant { id, marker } => (
                Method::PUT,
                format!("/tenants/{id}"),
                "default".into(),
                Some("application/json"),
                serde_json::json!({ "name": format!("n-{marker}") }).to_string(),
            ),
            Write::DeleteTenant { id } => (
                Method::DELETE,
                format!("/tenants/{id}"),
                "default".into(),
                None,
                String::new(),
            ),
            Write::SqlOpt { .. } | Write::SqlTenant { .. } => unreachable!("not an HTTP write"),
        }
    }
}

/// A model named `name` whose one mapping is named `m-<marker>`, so the helper tree of a template
/// whose context names it shows which version a node compiled.
pub fn model_yaml(name: &str, marker: &str) -> String {
    format!(
        "grammar: FHIRConnect/v1.0.0\ntype: model\nmetadata:\n  name: {name}\n  version: \"{marker}\"\nspec:\n  system: FHIR\n  version: R4\n  openEhrConfig:\n    archetype: openEHR-EHR-OBSERVATION.{name}.v1\n  fhirConfig:\n    structureDefinition: http://hl7.org/fhir/StructureDefinition/Observation\nmappings:\n  - name: \"m-{marker}\"\n    with:\n      fhir: \"$resource.value\"\n      openehr: \"$archetype/data[at0001]\"\n"
    )
}

/// The context of template `template`, naming model `model` (and starting from it).
pub fn model_context_yaml(template: &str, model: &str) -> String {
    format!(
        "grammar: FHIRConnect/v1.0.0\ntype: context\nmetadata:\n  name: {template}\n  version: \"fixed\"\nspec:\n  system: FHIR\n  version: R4\ncontext:\n  profile:\n    url: http://hl7.org/fhir/StructureDefinition/Observation\n  template:\n    id: {template}\n  archetypes:\n    - {model}\n  start: {model}\n"
    )
}
