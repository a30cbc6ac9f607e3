//! The eviction rule: the caches and groups, the [`Change`]s every channel describes, and
//! [`targets`], which says what each change evicts.

use serde::{Deserialize, Serialize};

/// A cache group: the unit of TTL configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Group {
    /// OPT templates.
    Opt,
    /// FHIR Connect contexts (and, later, mapper indexes and helpers).
    FhirConnect,
    /// Tenant records.
    Tenant,
}

/// One cache inside a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CacheName {
    /// `tenant:templateId` -> OPT.
    Opt,
    /// `tenant:templateId` -> FHIR Connect context.
    Context,
    /// `tenant` -> every context of the tenant.
    AllContexts,
    /// `tenant` -> tenant record.
    Tenant,
    /// `tenant:templateId` -> compiled mapper index.
    Mapper,
    /// `tenant:templateId` -> helper tree.
    Helpers,
}

impl CacheName {
    /// Every cache, in display order.
    pub const ALL: [CacheName; 6] = [
        CacheName::Opt,
        CacheName::Context,
        CacheName::AllContexts,
        CacheName::Mapper,
        CacheName::Helpers,
        CacheName::Tenant,
    ];

    /// The group whose TTL this cache uses.
    pub fn group(self) -> Group {
        match self {
            CacheName::Opt => Group::Opt,
            CacheName::Context
            | CacheName::AllContexts
            | CacheName::Mapper
            | CacheName::Helpers => Group::FhirConnect,
            CacheName::Tenant => Group::Tenant,
        }
    }

    /// True for caches keyed by tenant alone.
    pub fn keyed_by_tenant(self) -> bool {
        matches!(self, CacheName::AllContexts | CacheName::Tenant)
    }

    /// The name used in `/caches` and `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheName::Opt => "opt",
            CacheName::Context => "context",
            CacheName::AllContexts => "all_contexts",
            CacheName::Tenant => "tenant",
            CacheName::Mapper => "mapper",
            CacheName::Helpers => "helpers",
        }
    }
}

/// Something that changed in the source of truth, as every channel describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Change {
    /// An OPT was created, replaced or deleted.
    Opt {
        /// Tenant id.
        tenant: String,
        /// Normalized template id.
        template_id: String,
    },
    /// A FHIR Connect context was created, replaced or deleted.
    Context {
        /// Tenant id.
        tenant: String,
        /// Normalized template id.
        template_id: String,
    },
    /// A FHIR Connect model or extension was created, replaced or deleted.
    Model {
        /// Tenant id.
        tenant: String,
        /// The model's `metadata.name`.
        name: String,
    },
    /// A tenant record was created or updated (`deleted: false`) or deleted with everything it owned.
    Tenant {
        /// Tenant id.
        tenant: String,
        /// True when the tenant and its artifacts are gone.
        deleted: bool,
    },
    /// A change in a table an embedding application put under invalidation
    /// (`openfhir_track_table`), for the cache group it registered
    /// ([`Caches::register_group`](super::Caches::register_group)).
    Custom {
        /// The group name given to `openfhir_track_table`.
        group: String,
        /// Tenant, or `None` for every tenant (TRUNCATE).
        tenant: Option<String>,
        /// Key (key columns joined with `:`), or `None` for every key.
        key: Option<String>,
    },
    /// An explicit eviction: a group (or all groups), optionally narrowed to a tenant and a key.
    Evict {
        /// `None`: every group.
        group: Option<Group>,
        /// `None`: every tenant.
        tenant: Option<String>,
        /// `None`: every key of the tenant. Needs `tenant`.
        key: Option<String>,
    },
}

/// What one cache must drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One key: `tenant:id`, or `tenant` for tenant-keyed caches (`id: None`).
    Key {
        /// Tenant id.
        tenant: String,
        /// The id within the tenant, absent for tenant-keyed caches.
        id: Option<String>,
    },
    /// Every entry of a tenant.
    Tenant(String),
    /// Everything.
    All,
}

/// THE eviction rule: which entries of which caches a change invalidates.
///
/// * OPT -> `opt`, `mapper` and `helpers` of that key.
/// * context -> `context`, `mapper` and `helpers` of that key and `all_contexts` of the tenant.
/// * model -> `mapper` and `helpers` of every template of the tenant.
/// * tenant -> the tenant record; deleted: every entry of the tenant in every cache.
pub fn targets(change: &Change) -> Vec<(CacheName, Scope)> {
    let key = |t: &str, id: &str| Scope::Key {
        tenant: t.to_string(),
        id: Some(id.to_string()),
    };
    let tenant_key = |t: &str| Scope::Key {
        tenant: t.to_string(),
        id: None,
    };
    match change {
        Change::Opt {
            tenant,
            template_id,
        } => vec![
            (CacheName::Opt, key(tenant, template_id)),
            (CacheName::Mapper, key(tenant, template_id)),
            (CacheName::Helpers, key(tenant, template_id)),
        ],
        Change::Context {
            tenant,
            template_id,
        } => vec![
            (CacheName::Context, key(tenant, template_id)),
            (CacheName::AllContexts, tenant_key(tenant)),
            (CacheName::Mapper, key(tenant, template_id)),
            (CacheName::Helpers, key(tenant, template_id)),
        ],
        // Any template of the tenant may name the model (or an extension of it): evict the
        // tenant's compiled artifacts, never less.
        Change::Model { tenant, .. } => vec![
            (CacheName::Mapper, Scope::Tenant(tenant.clone())),
            (CacheName::Helpers, Scope::Tenant(tenant.clone())),
        ],
        Change::Custom { .. } => vec![],
        Change::Tenant {
            tenant,
            deleted: false,
        } => vec![(CacheName::Tenant, tenant_key(tenant))],
        Change::Tenant {
            tenant,
            deleted: true,
        } => CacheName::ALL
            .iter()
            .map(|&c| (c, Scope::Tenant(tenant.clone())))
            .collect(),
        Change::Evict {
            group,
            tenant,
            key: k,
        } => CacheName::ALL
            .iter()
            // The compiled artifacts are built from the OPT too: flushing OPTs flushes them.
            .filter(|c| {
                group.is_none_or(|g| {
                    c.group() == g
                        || (g == Group::Opt && matches!(c, CacheName::Mapper | CacheName::Helpers))
                })
            })
            .map(|&c| {
                let scope = match (tenant, k) {
                    (None, _) => Scope::All,
                    (Some(t), _) if c.keyed_by_tenant() => tenant_key(t),
                    (Some(t), Some(k)) => key(t, k),
                    (Some(t), None) => Scope::Tenant(t.clone()),
                };
                (c, scope)
            })
            .collect(),
    }
}

/// The `operation` of a log row that records an operator's eviction (`POST /caches/evict`).
pub const EVICT_OPERATION: &str = "EVICT";

/// The `cache_group` of an eviction log row that names no group (every group).
const EVICT_ALL: &str = "all";

impl Change {
    /// The log row (`cache_group`, `tenant`, `key`) that records this change when it is an
    /// operator's eviction ([`Change::Evict`]), written with operation [`EVICT_OPERATION`];
    /// `None` for the other changes, which their triggers record.
    /// [`Change::from_log`] reads the row back into the same change.
    pub fn eviction_row(&self) -> Option<(&'static str, Option<&str>, Option<&str>)> {
        let Change::Evict { group, tenant, key } = self else {
            return None;
        };
        let group = match group {
            None => EVICT_ALL,
            Some(Group::Opt) => "opt",
            Some(Group::FhirConnect) => "fhir_connect",
            Some(Group::Tenant) => "tenant",
        };
        Some((group, tenant.as_deref(), key.as_deref()))
    }

    /// The change a row of `openfhir_invalidation_log` (or its NOTIFY payload) describes.
    /// A row without a tenant is a TRUNCATE: a flush of the group.
    pub fn from_log(
        group: &str,
        tenant: Option<&str>,
        key: Option<&str>,
        operation: &str,
    ) -> Change {
        let owned = |s: &str| s.to_string();
        if operation == EVICT_OPERATION {
            // A group this release does not know is read as every group: evicting too much costs
            // reloads, evicting too little would leave stale entries.
            let group = match group {
                "opt" => Some(Group::Opt),
                "fhir_connect" => Some(Group::FhirConnect),
                "tenant" => Some(Group::Tenant),
                _ => None,
            };
            return Change::Evict {
                group,
                tenant: tenant.map(owned),
                key: key.filter(|_| tenant.is_some()).map(owned),
            };
        }
        match (group, tenant, key) {
            ("opt", Some(t), Some(k)) => Change::Opt {
                tenant: owned(t),
                template_id: owned(k),
            },
            ("context", Some(t), Some(k)) => Change::Context {
                tenant: owned(t),
                template_id: owned(k),
            },
            ("model", Some(t), Some(k)) => Change::Model {
                tenant: owned(t),
                name: owned(k),
            },
            ("tenant", Some(t), _) => Change::Tenant {
                tenant: owned(t),
                deleted: operation == "DELETE",
            },
            ("opt", _, _) => Change::Evict {
                group: Some(Group::Opt),
                tenant: tenant.map(owned),
                key: None,
            },
            ("context" | "model", _, _) => Change::Evict {
                group: Some(Group::FhirConnect),
                tenant: tenant.map(owned),
                key: None,
            },
            ("tenant", None, _) => Change::Evict {
                group: None,
                tenant: None,
                key: None,
            },
            (other, _, _) => Change::Custom {
                group: owned(other),
                tenant: tenant.map(owned),
                key: key.map(owned),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let k = |id: Option<&str>| Scope::Key {
            tenant: "a".into(),
            id: id.map(Into::into),
        };
        let opt = Change::Opt {
            tenant: "a".into(),
            template_id: "t".into(),
        };
        assert_eq!(
            targets(&opt),
            vec![
                (CacheName::Opt, k(Some("t"))),
                (CacheName::Mapper, k(Some("t"))),
                (CacheName::Helpers, k(Some("t"))),
            ]
        );
        let ctx = Change::Context {
            tenant: "a".into(),
            template_id: "t".into(),
        };
        assert_eq!(
            targets(&ctx),
            vec![
                (CacheName::Context, k(Some("t"))),
                (CacheName::AllContexts, k(None)),
                (CacheName::Mapper, k(Some("t"))),
                (CacheName::Helpers, k(Some("t"))),
            ]
        );
        let opt_flush = Change::Evict {
            group: Some(Group::Opt),
            tenant: None,
            key: None,
        };
        let caches: Vec<CacheName> = targets(&opt_flush).into_iter().map(|(c, _)| c).collect();
        assert_eq!(
            caches,
            vec![CacheName::Opt, CacheName::Mapper, CacheName::Helpers]
        );
        let model = Change::Model {
            tenant: "a".into(),
            name: "OBSERVATION.height.v2".into(),
        };
        assert_eq!(
            targets(&model),
            vec![
                (CacheName::Mapper, Scope::Tenant("a".into())),
                (CacheName::Helpers, Scope::Tenant("a".into())),
            ]
        );
        let del = Change::Tenant {
            tenant: "a".into(),
            deleted: true,
        };
        assert_eq!(targets(&del).len(), CacheName::ALL.len());
        assert!(targets(&del)
            .iter()
            .all(|(_, s)| *s == Scope::Tenant("a".into())));
        let upd = Change::Tenant {
            tenant: "a".into(),
            deleted: false,
        };
        assert_eq!(
            targets(&upd),
            vec![(
                CacheName::Tenant,
                Scope::Key {
                    tenant: "a".into(),
                    id: None
                }
            )]
        );
        let fc = Change::Evict {
            group: Some(Group::FhirConnect),
            tenant: Some("a".into()),
            key: Some("t".into()),
        };
        assert_eq!(targets(&fc), targets(&ctx));
        let all = Change::Evict {
            group: None,
            tenant: None,
            key: None,
        };
        assert!(targets(&all).iter().all(|(_, s)| *s == Scope::All));
        assert_eq!(targets(&all).len(), CacheName::ALL.len());
    }

    #[test]
    fn changes_round_trip_as_json() {
        let c = Change::Model {
            tenant: "a".into(),
            name: "OBSERVATION.height.v2".into(),
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Change>(&s).unwrap(), c);
    }

    #[test]
    fn log_rows_map_to_changes() {
        assert_eq!(
            Change::from_log("opt", Some("a"), Some("t"), "UPDATE"),
            Change::Opt {
                tenant: "a".into(),
                template_id: "t".into()
            }
        );
        assert_eq!(
            Change::from_log("tenant", Some("a"), None, "DELETE"),
            Change::Tenant {
                tenant: "a".into(),
                deleted: true
            }
        );
        assert_eq!(
            Change::from_log("context", None, None, "TRUNCATE"),
            Change::Evict {
                group: Some(Group::FhirConnect),
                tenant: None,
                key: None
            }
        );
        assert_eq!(
            Change::from_log("tenant", None, None, "TRUNCATE"),
            Change::Evict {
                group: None,
                tenant: None,
                key: None
            }
        );
        assert!(matches!(
            Change::from_log("mine", Some("a"), Some("k"), "INSERT"),
            Change::Custom { .. }
        ));
    }

    #[test]
    fn operator_evictions_round_trip_through_the_log() {
        let groups = [
            None,
            Some(Group::Opt),
            Some(Group::FhirConnect),
            Some(Group::Tenant),
        ];
        let scopes = [(None, None), (Some("a"), None), (Some("a"), Some("t"))];
        for group in groups {
            for (tenant, key) in scopes {
                let c = Change::Evict {
                    group,
                    tenant: tenant.map(Into::into),
                    key: key.map(Into::into),
                };
                let (g, t, k) = c.eviction_row().expect("an eviction has a log row");
                assert_eq!(
                    Change::from_log(g, t, k, EVICT_OPERATION),
                    c,
                    "{g} {t:?} {k:?}"
                );
            }
        }
        // Only evictions are written by the node; the triggers record the rest.
        let opt = Change::Opt {
            tenant: "a".into(),
            template_id: "t".into(),
        };
        assert_eq!(opt.eviction_row(), None);
        // A group a later release might add is read as every group, never as none.
        assert_eq!(
            Change::from_log("future", Some("a"), None, EVICT_OPERATION),
            Change::Evict {
                group: None,
                tenant: Some("a".into()),
                key: None
            }
        );
    }
}
