//! Which key an artifact id stands for: the UUID openFHIR's API addresses OPTs, contexts and
//! models by, mapped to the template id or model name the caches are keyed by.
//!
//! # Guarantees
//! An entry is a hint, never trusted: a reader that finds one loads the artifact by its key and
//! serves it only if the artifact carries the id asked for; otherwise it forgets the entry and
//! asks the database. So the index needs no invalidation: a rename, a delete or a new artifact
//! under the old key costs one extra query, never a wrong answer.

use uuid::Uuid;

/// Most ids remembered; the least recently used go first.
const CAPACITY: u64 = 100_000;

/// `(kind, tenant, id)` -> key.
pub struct IdIndex {
    map: moka::future::Cache<(&'static str, String, Uuid), String>,
}

impl Default for IdIndex {
    fn default() -> Self {
        IdIndex {
            map: moka::future::Cache::new(CAPACITY),
        }
    }
}

impl IdIndex {
    /// The key `id` stood for when last seen (`kind`: `opt`, `context` or `model`).
    pub async fn get(&self, kind: &'static str, tenant: &str, id: Uuid) -> Option<String> {
        self.map.get(&(kind, tenant.to_string(), id)).await
    }

    /// Remembers the key of `id`.
    pub async fn insert(&self, kind: &'static str, tenant: &str, id: Uuid, key: &str) {
        self.map
            .insert((kind, tenant.to_string(), id), key.to_string())
            .await;
    }

    /// Forgets `id` (its entry turned out stale).
    pub async fn forget(&self, kind: &'static str, tenant: &str, id: Uuid) {
        self.map.invalidate(&(kind, tenant.to_string(), id)).await;
    }
}
