//! OPTs, FHIR Connect contexts and models: reads by id or key (cached), and the writes that
//! follow openFHIR's rules (create, rewrite or rename by path, delete, purge).

use std::future::Future;
use std::sync::Arc;

use uuid::Uuid;

use super::{not_found, utf8, Node, Put, WRITE_ATTEMPTS};
use crate::cache::{CacheName, Change};
use crate::domain::{
    self, normalize_template_id, parse_fc, FcDocument, FcFormat, FcList, OptDocument,
};
use crate::error::{Error, Result};
use crate::store::{Artifact, FcTable, OptSummary, Target, WriteMode, Written};

impl Node {
    // ---- artifacts: OPTs, contexts, models ----

    /// Writes an artifact as `put` says (see [`Put`]): `update` rewrites an existing row the
    /// path found, `create` writes the document under its own key. Retries when the row found
    /// was renamed or deleted before the write reached it.
    async fn put_artifact<D, U, UF, C, CF>(
        &self,
        a: Artifact,
        tenant: &str,
        key: &str,
        put: Put<'_>,
        update: U,
        create: C,
    ) -> Result<(D, Written)>
    where
        U: Fn(Target) -> UF,
        UF: Future<Output = Result<Option<(D, Written)>>>,
        C: Fn(WriteMode) -> CF,
        CF: Future<Output = Result<(D, Written)>>,
    {
        for _ in 0..WRITE_ATTEMPTS {
            let found = match put {
                Put::At(path) => self.db.find(a, tenant, path).await?,
                Put::Create | Put::Upsert => None,
            };
            let Some(target) = found else {
                // As openFHIR: a PUT whose path names nothing creates; except that a PUT to the
                // document's own key replaces (this API's PUT by template id or model name).
                let mode = match put {
                    Put::Create => WriteMode::Create,
                    Put::Upsert => WriteMode::Upsert,
                    Put::At(path) if a.path_key(path) == key => WriteMode::Upsert,
                    Put::At(_) => WriteMode::Create,
                };
                return self.write(vec![a.change(tenant, key)], create(mode)).await;
            };
            let mut changes = vec![a.change(tenant, &target.key)];
            if target.key != key {
                changes.push(a.change(tenant, key));
            }
            if let Some(done) = self.write(changes, update(target)).await? {
                return Ok(done);
            }
        }
        Err(Error::Conflict(format!(
            "the {} kept changing while it was being written; retry",
            a.what()
        )))
    }

    /// Deletes the artifact `path` addresses (its id, else its key). `None` when there was
    /// none, which is not an error (openFHIR answers 204 either way); else the writing
    /// transaction.
    pub async fn delete_artifact(
        &self,
        a: Artifact,
        tenant: &str,
        path: &str,
    ) -> Result<Option<u64>> {
        for _ in 0..WRITE_ATTEMPTS {
            let Some(target) = self.db.find(a, tenant, path).await? else {
                return Ok(None);
            };
            let change = a.change(tenant, &target.key);
            if let Some(xid) = self
                .write(vec![change], self.db.delete_target(a, tenant, &target))
                .await?
            {
                return Ok(Some(xid));
            }
        }
        Ok(None)
    }

    /// Deletes every OPT, context and model of the tenant (openFHIR's `GET /$purge`), evicting
    /// them on every node like any other write. Returns the writing transaction.
    pub async fn purge(&self, tenant: &str) -> Result<u64> {
        let change = Change::Evict {
            group: None,
            tenant: Some(tenant.to_string()),
            key: None,
        };
        self.write(vec![change], self.db.purge(tenant)).await
    }

    /// The cached artifact with id `id`, found through the id index (a hint, checked here
    /// against the id the artifact carries) or the database.
    async fn by_id<T, L, LF>(
        &self,
        a: Artifact,
        tenant: &str,
        id: Uuid,
        id_of: fn(&T) -> Uuid,
        load: L,
    ) -> Result<Option<Arc<T>>>
    where
        L: Fn(String) -> LF,
        LF: Future<Output = Result<Arc<T>>>,
    {
        let check = |r: Result<Arc<T>>| match r {
            Ok(doc) if id_of(&doc) == id => Ok(Some(doc)),
            Ok(_) => Ok(None),
            Err(e) if matches!(e.root(), Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        };
        if let Some(key) = self.caches.ids.get(a.kind(), tenant, id).await {
            if let Some(doc) = check(load(key).await)? {
                return Ok(Some(doc));
            }
            self.caches.ids.forget(a.kind(), tenant, id).await;
        }
        let Some(key) = self.db.key_of(a, tenant, id).await? else {
            return Ok(None);
        };
        let doc = check(load(key.clone()).await)?;
        if doc.is_some() {
            self.caches.ids.insert(a.kind(), tenant, id, &key).await;
        }
        Ok(doc)
    }

    // ---- OPT ----

    /// An OPT (cached), by id or by template id (normalized here); an id match wins.
    pub async fn opt(&self, tenant: &str, path: &str) -> Result<Arc<OptDocument>> {
        if let Ok(id) = Uuid::parse_str(path.trim()) {
            let load = |key: String| async move { self.opt_by_key(tenant, &key).await };
            if let Some(doc) = self
                .by_id(Artifact::Opt, tenant, id, |d| d.id, load)
                .await?
            {
                return Ok(doc);
            }
        }
        self.opt_by_key(tenant, &normalize_template_id(path)).await
    }

    pub(super) async fn opt_by_key(&self, tenant: &str, id: &str) -> Result<Arc<OptDocument>> {
        domain::validate_artifact_id("template id", id)?;
        self.caches
            .opt
            .get_or_load(tenant, Some(id), || async {
                let o = self.db.opt(tenant, id).await?;
                self.loaded(CacheName::Opt, id, o)
                    .await
                    .ok_or_else(|| not_found("OPT", id))
            })
            .await
    }

    /// Metadata of every OPT of the tenant.
    pub async fn opts(&self, tenant: &str) -> Result<Vec<OptSummary>> {
        self.db.opts(tenant).await
    }

    /// Stores an OPT as `put` says ([`Put`]). The whole template is parsed (and so validated)
    /// before anything is written.
    pub async fn put_opt(
        &self,
        tenant: &str,
        xml: &str,
        put: Put<'_>,
    ) -> Result<(OptSummary, Written)> {
        let t = crate::domain::opt::TemplateTree::parse(xml)?
            .header()
            .clone();
        let (db, t) = (&self.db, &t);
        self.put_artifact(
            Artifact::Opt,
            tenant,
            &t.normalized_id,
            put,
            |target| async move { db.update_opt(tenant, &target, t, xml).await },
            |mode| db.put_opt(tenant, t, xml, mode),
        )
        .await
    }

    /// Deletes the OPT `path` addresses; see [`Node::delete_artifact`].
    pub async fn delete_opt(&self, tenant: &str, path: &str) -> Result<Option<u64>> {
        self.delete_artifact(Artifact::Opt, tenant, path).await
    }

    // ---- FHIR Connect contexts ----

    /// A context (cached), by id or by template id (normalized here); an id match wins.
    pub async fn context(&self, tenant: &str, path: &str) -> Result<Arc<FcDocument>> {
        if let Ok(id) = Uuid::parse_str(path.trim()) {
            let load = |key: String| async move { self.context_by_key(tenant, &key).await };
            if let Some(doc) = self
                .by_id(Artifact::Context, tenant, id, |d| d.uuid, load)
                .await?
            {
                return Ok(doc);
            }
        }
        self.context_by_key(tenant, &normalize_template_id(path))
            .await
    }

    pub(super) async fn context_by_key(&self, tenant: &str, id: &str) -> Result<Arc<FcDocument>> {
        domain::validate_artifact_id("template id", id)?;
        self.caches
            .context
            .get_or_load(tenant, Some(id), || async {
                let c = self.db.fc(FcTable::Context, tenant, id).await?;
                self.loaded(CacheName::Context, id, c)
                    .await
                    .ok_or_else(|| not_found("context", id))
            })
            .await
    }

    /// The template id a path to a template's context, mapper or helpers names: a context's id
    /// stands for that context's template.
    pub(super) async fn template_key(&self, tenant: &str, path: &str) -> Result<String> {
        if Uuid::parse_str(path.trim()).is_ok() {
            match self.context(tenant, path).await {
                Ok(c) => return Ok(c.id.clone()),
                Err(e) if matches!(e.root(), Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let id = normalize_template_id(path);
        domain::validate_artifact_id("template id", &id)?;
        Ok(id)
    }

    /// Every context of the tenant (cached as one entry).
    pub async fn contexts(&self, tenant: &str) -> Result<Arc<FcList>> {
        self.caches
            .all_contexts
            .get_or_load(tenant, None, || async {
                let all = self.db.fcs(FcTable::Context, tenant).await?;
                let all = self.loaded(CacheName::AllContexts, tenant, all).await;
                Ok(FcList {
                    docs: all.into_iter().map(Arc::new).collect(),
                    rendered: Default::default(),
                })
            })
            .await
    }

    /// Stores a context as `put` says ([`Put`]).
    pub async fn put_context(
        &self,
        tenant: &str,
        body: &[u8],
        format: FcFormat,
        put: Put<'_>,
    ) -> Result<(FcDocument, Written)> {
        self.put_fc(FcTable::Context, tenant, body, format, put)
            .await
    }

    /// Deletes the context `path` addresses; see [`Node::delete_artifact`].
    pub async fn delete_context(&self, tenant: &str, path: &str) -> Result<Option<u64>> {
        self.delete_artifact(Artifact::Context, tenant, path).await
    }

    /// Stores a FHIR Connect document in `table` as `put` says ([`Put`]), after checking it by
    /// openFHIR's rules ([`crate::domain::fc_model`]).
    pub async fn put_fc(
        &self,
        table: FcTable,
        tenant: &str,
        body: &[u8],
        format: FcFormat,
        put: Put<'_>,
    ) -> Result<(FcDocument, Written)> {
        let doc = parse_fc(body, format, table.kind())?;
        let content = utf8(body)?;
        let (db, d) = (&self.db, &doc);
        self.put_artifact(
            table.into(),
            tenant,
            &doc.key,
            put,
            |target| async move {
                db.update_fc(table, tenant, &target, d, content, format)
                    .await
            },
            |mode| db.put_fc(table, tenant, d, content, format, mode),
        )
        .await
    }

    // ---- FHIR Connect models ----

    /// A model or extension, by id or by name; an id match wins (read from the database;
    /// compiled artifacts are cached).
    pub async fn model(&self, tenant: &str, path: &str) -> Result<FcDocument> {
        if Uuid::parse_str(path.trim()).is_err() {
            domain::validate_artifact_id("model name", path)?;
        }
        self.db
            .fc_at(FcTable::Model, tenant, path)
            .await?
            .ok_or_else(|| not_found("model", path))
    }

    /// Every model and extension of the tenant.
    pub async fn models(&self, tenant: &str) -> Result<Vec<FcDocument>> {
        self.db.fcs(FcTable::Model, tenant).await
    }

    /// Stores a model or extension as `put` says ([`Put`]).
    pub async fn put_model(
        &self,
        tenant: &str,
        body: &[u8],
        format: FcFormat,
        put: Put<'_>,
    ) -> Result<(FcDocument, Written)> {
        self.put_fc(FcTable::Model, tenant, body, format, put).await
    }

    /// Deletes the model `path` addresses; see [`Node::delete_artifact`].
    pub async fn delete_model(&self, tenant: &str, path: &str) -> Result<Option<u64>> {
        self.delete_artifact(Artifact::Model, tenant, path).await
    }
}
