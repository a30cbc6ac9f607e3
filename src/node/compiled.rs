//! The compiled artifacts of a template: its mapper index and helper tree, compiled once and
//! cached in the FHIR Connect group.

use std::sync::Arc;

use super::Node;
use crate::cache::CacheName;
use crate::error::{Error, Result};
use crate::store::FcTable;

impl Node {
    // ---- compiled artifacts ----

    /// The compiled mapper index of a template (cached in the FHIR Connect group; concurrent cold
    /// requests compile once), by template id or by its context's id. A context the engine
    /// cannot compile (see [`crate::domain::mapper::compile`]) is `Unprocessable`, listing every
    /// problem; nothing is cached then.
    pub async fn mapper(
        &self,
        tenant: &str,
        path: &str,
    ) -> Result<Arc<crate::domain::mapper::CompiledMapper>> {
        let id = self.template_key(tenant, path).await?;
        self.caches
            .mapper
            .get_or_load(tenant, Some(&id), || async {
                let compiled = self.compile_mapper(tenant, &id).await?;
                Ok(self.loaded(CacheName::Mapper, &id, compiled).await)
            })
            .await
    }

    async fn compile_mapper(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<crate::domain::mapper::CompiledMapper> {
        use crate::domain::fc_model::{typed, ContextDocument, ModelDocument};
        let ctx = self.context_by_key(tenant, id).await?;
        // Stored documents were checked when they were uploaded; only their shape is read here.
        let corrupt = |what: &'static str, id: &str, e: Error| Error::CorruptRow {
            what,
            id: id.to_string(),
            reason: e.to_string(),
        };
        let context: ContextDocument =
            typed(&ctx.json, "context").map_err(|e| corrupt("context", id, e))?;
        // As the engine, only the models the context names are read: a broken model of another
        // template cannot break this one.
        let named: std::collections::BTreeSet<&str> = context
            .archetypes()
            .iter()
            .chain(context.extensions())
            .map(|s| s.trim())
            .collect();
        let mut models = std::collections::BTreeMap::new();
        for m in self.db.fcs(FcTable::Model, tenant).await? {
            if !named.contains(m.id.as_str()) {
                continue;
            }
            let model: ModelDocument =
                typed(&m.json, "model").map_err(|e| corrupt("model", &m.id, e))?;
            models.insert(m.id.clone(), model);
        }
        let template_uploaded = match self.opt_by_key(tenant, id).await {
            Ok(_) => true,
            Err(e) if matches!(e.root(), Error::NotFound { .. }) => false,
            Err(e) => return Err(e),
        };
        let started = std::time::Instant::now();
        let index =
            crate::domain::mapper::compile(&context, &models, template_uploaded).map_err(|e| {
                Error::Unprocessable {
                    message: format!("cannot compile the mapper for template '{id}'"),
                    details: e.missing,
                }
            })?;
        for w in &index.warnings {
            tracing::info!(tenant, template = id, warning = %w, "mapper compiled with a warning");
        }
        Ok(crate::domain::mapper::CompiledMapper {
            index,
            compiled_at: time::OffsetDateTime::now_utc(),
            node: self.id.clone(),
            compile_us: started.elapsed().as_micros() as u64,
        })
    }

    /// The helper tree of a template (by template id or its context's id), shared and
    /// immutable (cached). Code that writes per-request state must use [`Node::helpers_copy`].
    pub async fn helpers(
        &self,
        tenant: &str,
        path: &str,
    ) -> Result<Arc<crate::domain::helpers::HelperTree>> {
        let id = self.template_key(tenant, path).await?;
        self.caches
            .helpers
            .get_or_load(tenant, Some(&id), || async {
                let mapper = self.mapper(tenant, &id).await?;
                let opt = self.opt_by_key(tenant, &id).await?;
                let tree = crate::domain::helpers::build(&mapper.index, &opt.tree);
                Ok(self.loaded(CacheName::Helpers, &id, tree).await)
            })
            .await
    }

    /// An isolated copy of the helper tree for one use: mutating it never changes the cached
    /// tree or another request's copy.
    ///
    /// The copy shares every node with the cached tree (it costs three reference-count
    /// increments, not a walk of the tree); writes through
    /// [`HelperTree::get_mut`](crate::domain::helpers::HelperTree::get_mut) copy only the path to
    /// the node written.
    pub async fn helpers_copy(
        &self,
        tenant: &str,
        template_id: &str,
    ) -> Result<crate::domain::helpers::HelperTree> {
        Ok((*self.helpers(tenant, template_id).await?).clone())
    }
}
