//! openFHIR's bootstrap directory: the OPTs and FHIR Connect files a deployment mounts (a Docker
//! volume, a Kubernetes ConfigMap) and keeps in git, loaded at start-up, once per cluster.
//!
//! The rules are openFHIR's (`BootstrapRunner`): the directory is `OPENFHIR_BOOTSTRAP_DIR`
//! (default `/app/bootstrap/`), sub-folders are read when
//! `OPENFHIR_BOOTSTRAP_RECURSIVELY_OPEN_DIRECTORIES` is true (the default); a file whose name ends
//! in `context.yaml` or `context.yml` is a context, any other `.yaml` or `.yml` a model (or
//! extension), a `.opt` an OPT; anything else is skipped with a warning. Files load into the
//! `default` tenant, through the same validation and write path as the API, so every node's
//! caches are evicted as for any write.
//!
//! # Once per cluster
//! A node holds a PostgreSQL advisory lock for its whole run, so nodes that start together load
//! one after the other, and records every file it loaded in `openfhir_bootstrap` (its path in the
//! directory and the SHA-256 of its content). A file recorded with the same content is not loaded
//! again: a restart loads nothing. Beyond openFHIR (which records file names only), a file whose
//! content changed is loaded again and replaces the artifact of its key, so a new mapping in git
//! reaches a running cluster by a rolling restart. A file that fails (a validation error, say) is
//! logged with its name and the reasons and not recorded, so the next start tries it again; the
//! others still load, and the node starts.
//!
//! Hidden entries (names starting with `.`, such as the `..data` links of a ConfigMap volume) are
//! skipped: their files are the same files again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use sha2::Digest;

use crate::domain::{FcFormat, DEFAULT_TENANT};
use crate::error::{Error, Result};
use crate::node::{Node, Put};
use crate::store::FcTable;

/// Arbitrary constant naming the bootstrap's advisory lock ("ofboot" in ASCII).
const LOCK_KEY: i64 = 0x6f66_626f_6f74;

/// What a file in the bootstrap directory is, by its name (openFHIR's rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// `*.opt`.
    Opt,
    /// Any other `*.yaml`, `*.yml`: a model or extension.
    Model,
    /// `*context.yaml`, `*context.yml`.
    Context,
}

impl FileKind {
    /// The kind a file name says, or `None` for a file openFHIR would not load.
    pub fn of(name: &str) -> Option<FileKind> {
        if name.ends_with("context.yaml") || name.ends_with("context.yml") {
            Some(FileKind::Context)
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            Some(FileKind::Model)
        } else if name.ends_with(".opt") {
            Some(FileKind::Opt)
        } else {
            None
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            FileKind::Opt => "opt",
            FileKind::Context => "context",
            FileKind::Model => "model",
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Files loaded that created an artifact.
    pub created: usize,
    /// Files loaded that replaced an artifact (new or changed content under a taken key).
    pub replaced: usize,
    /// Files recorded with the same content: not loaded again.
    pub unchanged: usize,
    /// Files refused (their reasons are logged).
    pub refused: usize,
    /// Files whose names match no rule, and sub-folders not opened.
    pub ignored: usize,
}

impl Summary {
    /// Files loaded, created or replaced.
    pub fn loaded(&self) -> usize {
        self.created + self.replaced
    }
}

/// Where a node's bootstrap run is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Loading (readiness waits for it to end, whatever becomes of its files).
    Running,
    /// Ended: what it did, or `None` when there was nothing to load (no run, too).
    Done(Option<Summary>),
    /// The database failed during the run (files are tried again at the next start).
    Failed(String),
}

/// A node's bootstrap phase, watched by readiness and by whoever waits for the run.
#[derive(Debug)]
pub struct Progress(tokio::sync::watch::Sender<Phase>);

impl Default for Progress {
    fn default() -> Self {
        Progress(tokio::sync::watch::Sender::new(Phase::Done(None)))
    }
}

impl Progress {
    /// A run about to start: [`Phase::Running`] until [`run_recorded`] ends.
    pub fn running() -> Progress {
        Progress(tokio::sync::watch::Sender::new(Phase::Running))
    }

    /// The phase now.
    pub fn phase(&self) -> Phase {
        self.0.borrow().clone()
    }

    fn set(&self, phase: Phase) {
        self.0.send_replace(phase);
    }

    /// Waits for the run to end: its summary, or why the database failed it.
    pub async fn finished(&self) -> std::result::Result<Option<Summary>, String> {
        let mut rx = self.0.subscribe();
        let phase = rx
            .wait_for(|p| !matches!(p, Phase::Running))
            .await
            .map(|p| p.clone())
            .unwrap_or_else(|_| Phase::Failed("the node stopped".into()));
        match phase {
            Phase::Done(s) => Ok(s),
            Phase::Failed(e) => Err(e),
            Phase::Running => Err("still running".into()),
        }
    }
}

/// The supervised task name of the bootstrap run.
pub const TASK_BOOTSTRAP: &str = "bootstrap";

/// [`run`], recording its outcome in `progress` (made with [`Progress::running`]). A database
/// failure is logged; the node goes on serving.
///
/// A run that ends without an outcome (it panicked, or was aborted at shutdown) records
/// [`Phase::Failed`], so neither readiness nor [`Progress::finished`] waits for it forever. It
/// runs as a one-shot supervised task ([`TASK_BOOTSTRAP`]): a panic is a bug that would recur on
/// a second run, so the task is marked dead (readiness names it) rather than run again.
pub async fn run_recorded(node: Arc<Node>, progress: Arc<Progress>) {
    let mut unfinished = Unfinished(Some(progress));
    let phase = match run(&node).await {
        Ok(s) => Phase::Done(s),
        Err(e) => {
            tracing::error!(error = %e, "bootstrap failed: the database did not answer; the files are tried again at the next start");
            Phase::Failed(e.to_string())
        }
    };
    if let Some(p) = unfinished.0.take() {
        p.set(phase);
    }
}

/// Records a bootstrap run that ended without an outcome, when dropped before the run set one.
struct Unfinished(Option<Arc<Progress>>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let why = if std::thread::panicking() {
                "the bootstrap run panicked; the files are tried again at the next start"
            } else {
                "the bootstrap run was stopped before it finished"
            };
            p.set(Phase::Failed(why.into()));
        }
    }
}

/// One file found in the directory.
#[derive(Debug, Clone)]
struct Found {
    /// The path relative to the directory, `/`-separated: the record's key.
    rel: String,
    path: PathBuf,
    kind: FileKind,
}

/// Lists the loadable files under `dir`, in path order (OPTs first, then models, then contexts),
/// and counts the entries skipped.
fn scan(dir: &Path, recursive: bool, summary: &mut Summary) -> std::io::Result<Vec<Found>> {
    let mut found = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((at, prefix)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&at)?.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let rel = format!("{prefix}{name}");
            let path = e.path();
            // Follows links: a ConfigMap's files are links.
            let Ok(meta) = std::fs::metadata(&path) else {
                tracing::warn!(file = %rel, "bootstrap: cannot read this entry; skipped");
                summary.ignored += 1;
                continue;
            };
            if meta.is_dir() {
                if recursive {
                    stack.push((path, format!("{rel}/")));
                } else {
                    tracing::warn!(
                        folder = %rel,
                        "bootstrap: found a folder; set OPENFHIR_BOOTSTRAP_RECURSIVELY_OPEN_DIRECTORIES=true to load what is in sub-folders"
                    );
                    summary.ignored += 1;
                }
                continue;
            }
            match FileKind::of(&name) {
                Some(kind) => found.push(Found { rel, path, kind }),
                None => {
                    tracing::warn!(
                        file = %rel,
                        "bootstrap: the file name matches no rule (*.opt, *context.yaml or *context.yml, other *.yaml or *.yml); skipped"
                    );
                    summary.ignored += 1;
                }
            }
        }
    }
    found.sort_by(|a, b| (a.kind as u8, &a.rel).cmp(&(b.kind as u8, &b.rel)));
    Ok(found)
}

/// Loads the bootstrap directory as configured; `Ok(None)` when there is none to load.
/// Errors only when the database fails (a file that fails is counted and logged, not an error).
pub async fn run(node: &Arc<Node>) -> Result<Option<Summary>> {
    let cfg = node.config().bootstrap.clone();
    let Some(dir) = cfg.dir.clone() else {
        tracing::debug!("OPENFHIR_BOOTSTRAP_DIR is empty: no bootstrap");
        return Ok(None);
    };
    if !dir.is_dir() {
        if cfg.dir_is_default {
            tracing::info!(dir = %dir.display(), "no bootstrap directory here; nothing to load (OPENFHIR_BOOTSTRAP_DIR)");
        } else {
            tracing::warn!(dir = %dir.display(), "OPENFHIR_BOOTSTRAP_DIR is not a directory; nothing loaded");
        }
        return Ok(None);
    }
    let mut summary = Summary::default();
    let files = scan(&dir, cfg.recursive, &mut summary).map_err(|e| {
        Error::invalid(
            "cannot read the bootstrap directory",
            format!("{}: {e}", dir.display()),
        )
    })?;

    // One node at a time, on a connection of its own: a session lock on a pooled connection
    // would outlive a run cancelled half-way.
    let lock = node.db().dedicated("bootstrap").await?;
    let waiting = tokio::time::Instant::now();
    lock.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    if waiting.elapsed() > std::time::Duration::from_millis(100) {
        tracing::info!(
            waited_ms = waiting.elapsed().as_millis() as u64,
            "bootstrap: waited for another node's run"
        );
    }
    let result = load_all(node, &lock, &files, &mut summary).await;
    // The lock ends with the connection anyway; unlocking first frees the next node at once.
    let _ = lock
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    result?;
    tracing::info!(
        dir = %dir.display(),
        files = files.len(),
        loaded = summary.loaded(),
        created = summary.created,
        replaced = summary.replaced,
        unchanged = summary.unchanged,
        refused = summary.refused,
        ignored = summary.ignored,
        "bootstrap done: {} loaded, {} unchanged, {} refused, {} ignored",
        summary.loaded(),
        summary.unchanged,
        summary.refused,
        summary.ignored
    );
    Ok(Some(summary))
}

async fn load_all(
    node: &Arc<Node>,
    db: &tokio_postgres::Client,
    files: &[Found],
    summary: &mut Summary,
) -> Result<()> {
    for f in files {
        let bytes = match tokio::fs::read(&f.path).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(file = %f.rel, error = %e, "bootstrap: cannot read the file; skipped");
                summary.refused += 1;
                continue;
            }
        };
        let hash: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let recorded: Option<String> = db
            .query_opt(
                "SELECT sha256 FROM openfhir_bootstrap WHERE path = $1",
                &[&f.rel],
            )
            .await?
            .map(|r| r.get(0));
        if recorded.as_deref() == Some(hash.as_str()) {
            tracing::debug!(file = %f.rel, "bootstrap: already loaded with this content; skipped");
            summary.unchanged += 1;
            continue;
        }
        match load(node, f.kind, &bytes).await {
            Ok((key, created)) => {
                db.execute(
                    "INSERT INTO openfhir_bootstrap (path, sha256, kind, key, node) VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (path) DO UPDATE SET sha256 = EXCLUDED.sha256, kind = EXCLUDED.kind, \
                     key = EXCLUDED.key, node = EXCLUDED.node, loaded = now()",
                    &[&f.rel, &hash, &f.kind.as_str(), &key, &node.id()],
                )
                .await?;
                let what = if recorded.is_some() {
                    "changed since it was loaded; loaded again"
                } else {
                    "loaded"
                };
                tracing::info!(file = %f.rel, kind = f.kind.as_str(), key = %key, created, "bootstrap: {what}");
                if created {
                    summary.created += 1;
                } else {
                    summary.replaced += 1;
                }
            }
            Err(e) if e.is_unavailable() => return Err(e),
            Err(e) => {
                let reasons = match e.root() {
                    Error::Invalid { message, details } if !details.is_empty() => {
                        format!("{message}: {}", details.join("; "))
                    }
                    other => other.to_string(),
                };
                tracing::warn!(file = %f.rel, kind = f.kind.as_str(), %reasons, "bootstrap: file refused; the others still load");
                summary.refused += 1;
            }
        }
    }
    Ok(())
}

/// Writes one file through the API's path, creating or replacing the artifact of its key;
/// returns the key and whether it was created.
async fn load(node: &Node, kind: FileKind, bytes: &[u8]) -> Result<(String, bool)> {
    match kind {
        FileKind::Opt => {
            let text = std::str::from_utf8(bytes).map_err(|e| {
                Error::invalid("OPT is not UTF-8", format!("the OPT is not UTF-8: {e}"))
            })?;
            let (s, w) = node.put_opt(DEFAULT_TENANT, text, Put::Upsert).await?;
            Ok((s.template_id, w.created))
        }
        FileKind::Context | FileKind::Model => {
            let table = if kind == FileKind::Context {
                FcTable::Context
            } else {
                FcTable::Model
            };
            // openFHIR reads these files as YAML, which JSON is too.
            let (d, w) = node
                .put_fc(table, DEFAULT_TENANT, bytes, FcFormat::Yaml, Put::Upsert)
                .await?;
            Ok((d.id, w.created))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_read_as_openfhir_reads_them() {
        assert_eq!(FileKind::of("growth.context.yml"), Some(FileKind::Context));
        assert_eq!(
            FileKind::of("KDS_diagnose.context.yaml"),
            Some(FileKind::Context)
        );
        assert_eq!(FileKind::of("mycontext.yaml"), Some(FileKind::Context));
        assert_eq!(FileKind::of("height.model.yml"), Some(FileKind::Model));
        assert_eq!(FileKind::of("ext.yaml"), Some(FileKind::Model));
        assert_eq!(FileKind::of("Growth chart.opt"), Some(FileKind::Opt));
        for other in ["README.md", "a.json", "x.opt.bak", "context.yml.orig"] {
            assert_eq!(FileKind::of(other), None, "{other}");
        }
    }

    #[test]
    fn a_scan_lists_loadable_files_in_order_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("sub/deeper")).unwrap();
        std::fs::create_dir_all(p.join("..data")).unwrap();
        for f in [
            "b.context.yml",
            "a.model.yml",
            "t.opt",
            "notes.txt",
            "sub/m.yaml",
            "sub/deeper/x.opt",
            "..data/a.model.yml",
            ".hidden.yml",
        ] {
            std::fs::write(p.join(f), "x").unwrap();
        }
        let mut s = Summary::default();
        let found: Vec<String> = scan(p, true, &mut s)
            .unwrap()
            .into_iter()
            .map(|f| f.rel)
            .collect();
        assert_eq!(
            found,
            [
                "sub/deeper/x.opt",
                "t.opt",
                "a.model.yml",
                "sub/m.yaml",
                "b.context.yml"
            ]
        );
        assert_eq!(s.ignored, 1, "notes.txt");
        let mut s = Summary::default();
        let found: Vec<String> = scan(p, false, &mut s)
            .unwrap()
            .into_iter()
            .map(|f| f.rel)
            .collect();
        assert_eq!(found, ["t.opt", "a.model.yml", "b.context.yml"]);
        assert_eq!(s.ignored, 2, "notes.txt and the folder");
    }
}
