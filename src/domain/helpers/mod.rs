//! Helpers: the tree of a context's mappings with their openEHR paths resolved against the
//! template's node tree.
//!
//! [`build`] is pure. A [`HelperTree`] is a persistent tree: every node sits behind an `Arc`
//! and is never changed in place while it is shared. The cache keeps one tree per template, and
//! each use takes a `clone()`, which only bumps three reference counts (the tree is not walked).
//! A use changes its copy through [`HelperTree::get_mut`] (or [`Helper::child_mut`]), which
//! copies the nodes on the path from the root to the node it returns and nothing else
//! (copy-on-write with [`Arc::make_mut`]): the cached tree and every other copy keep the old
//! nodes, and all the subtrees off that path stay shared.
//!
//! Why `Arc` nodes and not a persistent-collection crate (`im`, `rpds`): a helper's children are
//! a handful of nodes written rarely and read in order; an `Arc<[Arc<Helper>]>` per node is one
//! allocation, reads as a plain slice, and copy-on-write through `Arc::make_mut` copies exactly
//! the path. The crates' chunked vectors and trees pay off for large collections edited often,
//! which these are not, and would add a dependency and an extra layer to every read.
//!
//! ```
//! # use openfhir_cache::domain::helpers::HelperTree;
//! # fn use_the_tree(cached: &HelperTree) {
//! let mut mine = cached.clone(); // what `Node::helpers_copy` hands out: no node is copied
//! if let Some(path) = mine.find_path(|h| h.mapping() == "height") {
//!     if let Some(h) = mine.get_mut(&path) {
//!         // Copies the nodes from the root to `h` in `mine` only.
//!         h.state_mut().insert("value".into(), serde_json::json!(1.8));
//!     }
//! }
//! assert!(cached.iter().all(|h| h.state().is_empty()));
//! # }
//! ```

use std::sync::Arc;

use serde_json::Map;

use crate::domain::fc_model::{Mapping, ModelDocument};
use crate::domain::mapper::MapperIndex;
use crate::domain::opt::TemplateTree;

mod tree;

use tree::Shared;
pub use tree::{Helper, HelperTree};

/// Deepest helper nesting expanded; children below it are reported in
/// [`HelperTree::unresolved`] instead.
pub const MAX_DEPTH: usize = 32;

/// Most helpers one tree may hold: distinct models slotting each other can multiply the tree at
/// every level, and a tenant's upload must not be able to exhaust a node's memory.
pub const MAX_HELPERS: usize = 20_000;

/// Most bytes the strings of one tree (paths, names, [`HelperTree::unresolved`] entries) may take.
/// A parent's path is repeated in every child with a relative path, and a slotted model is
/// expanded once per slot, so one long path over many children would otherwise cost gigabytes
/// for an upload of a megabyte. Once reached, nothing more is expanded (reported as `limit: ...`).
pub const MAX_TREE_BYTES: usize = 64 << 20;

/// Builds the helpers of `index` against `template`.
///
/// The roots are the mappings of the model `context.start` designates (a model name or an
/// archetype id, see [`MapperIndex::resolve`]). When `start` designates no model (typically the
/// template's root COMPOSITION archetype), the roots are the mappings of every model of
/// `context.archetypes`, in order; a `start` that is neither a model nor the template's root
/// archetype is also reported in `unresolved`.
///
/// openEHR paths: `$archetype` becomes the path of the first template node whose archetype id is
/// the model's (for a slotted model, the first such node under the slot, else the slot's own
/// path), `$composition` the root path, `$reference` the path of the mapping holding the
/// `reference`; a path without `$` is relative to the parent mapping's path. Children come from
/// `followedBy.mappings`, `reference.mappings` and `slotArchetype` (the mappings of the slotted
/// model). A model already being expanded on the current branch is not expanded again
/// (`cycle: ...`), and nothing deeper than [`MAX_DEPTH`] is expanded (`depth: ...`).
pub fn build(index: &MapperIndex, template: &TemplateTree) -> HelperTree {
    let mut b = Builder {
        index,
        template,
        no_children: Arc::from(Vec::new()),
        unresolved: Vec::new(),
        branch: Vec::new(),
        made: 0,
        bytes: 0,
        limited: false,
    };
    if template.header().normalized_id != index.template_id {
        b.unresolved.push(format!(
            "template: the mapper is for '{}', the template is '{}'",
            index.template_id,
            template.header().normalized_id
        ));
    }
    let ctx = index.context.context.as_ref();
    let start = ctx
        .and_then(|c| c.start.as_deref())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let mut roots = Vec::new();
    let starting = start.map(|s| index.resolve(s)).unwrap_or_default();
    if starting.is_empty() {
        let root_archetype = template.root().archetype_id.as_deref();
        if start.is_none() || start != root_archetype {
            b.unresolved.push(match start {
                None => "start: the context has no context.start".to_string(),
                Some(s) => format!(
                    "start: '{s}' is neither a model of the context nor the template's root archetype"
                ),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for name in index.context.archetypes() {
            if let Some((name, model)) = index.by_model.get_key_value(name.trim()) {
                if seen.insert(name.as_str()) {
                    roots.extend(b.model(name, model, None, 1));
                }
            }
        }
    } else {
        // Every model the start designates (several may map its archetype), in order.
        for (name, model) in starting {
            roots.extend(b.model(name, model, None, 1));
        }
    }
    b.unresolved.shrink_to_fit();
    HelperTree {
        template_id: Arc::from(index.template_id.as_str()),
        roots: Arc::from(roots),
        unresolved: Arc::new(b.unresolved),
    }
}

/// Where the `$` variables and relative paths of a mapping point.
#[derive(Clone, Default)]
struct Scope {
    archetype: Option<String>,
    parent: Option<String>,
    reference: Option<String>,
}

struct Builder<'a> {
    index: &'a MapperIndex,
    template: &'a TemplateTree,
    /// The one empty child list every leaf of the tree shares (a leaf costs no allocation).
    no_children: Shared,
    unresolved: Vec<String>,
    /// The models being expanded on the current branch, outermost first.
    branch: Vec<String>,
    /// Helpers made so far (bounded by [`MAX_HELPERS`]).
    made: usize,
    /// Bytes of the strings made so far (bounded by [`MAX_TREE_BYTES`]).
    bytes: usize,
    /// The `limit: ...` entry was reported.
    limited: bool,
}

impl Builder<'_> {
    /// The helpers of every mapping of `model`; `slot` is the path of the slot it is pulled into.
    fn model(
        &mut self,
        name: &str,
        model: &ModelDocument,
        slot: Option<&str>,
        depth: usize,
    ) -> Vec<Arc<Helper>> {
        let archetype = self.archetype_path(name, model, slot);
        let scope = Scope {
            archetype,
            ..Scope::default()
        };
        self.branch.push(name.to_string());
        // One string for the model's name, shared by all its helpers.
        let model_name: Arc<str> = Arc::from(name);
        let mut helpers = Vec::new();
        for m in model.mappings() {
            if self.limit_reached(name, m.name.as_deref().unwrap_or_default()) {
                break;
            }
            helpers.push(Arc::new(self.mapping(&model_name, m, &scope, depth)));
        }
        self.branch.pop();
        helpers
    }

    /// Records a [`HelperTree::unresolved`] entry.
    fn report(&mut self, entry: String) {
        self.bytes += entry.len();
        self.unresolved.push(entry);
    }

    /// True once the tree holds [`MAX_HELPERS`] helpers or [`MAX_TREE_BYTES`] bytes; the first
    /// time, reports that `model/mapping` and what follows are not expanded.
    fn limit_reached(&mut self, model: &str, mapping: &str) -> bool {
        if self.made < MAX_HELPERS && self.bytes < MAX_TREE_BYTES {
            return false;
        }
        if !self.limited {
            self.limited = true;
            self.unresolved.push(format!(
                "limit: the tree reached {MAX_HELPERS} helpers or {} MiB; {model}/{mapping} and later mappings are not expanded",
                MAX_TREE_BYTES >> 20
            ));
        }
        true
    }

    /// The path `$archetype` stands for in `model`.
    fn archetype_path(
        &mut self,
        name: &str,
        model: &ModelDocument,
        slot: Option<&str>,
    ) -> Option<String> {
        let id = model.archetype()?;
        let mut nodes = self
            .template
            .iter()
            .filter(|n| n.archetype_id.as_deref() == Some(id));
        let found = match slot {
            Some(s) => nodes
                .find(|n| is_under(&n.path, s))
                .or_else(|| {
                    self.template
                        .iter()
                        .find(|n| n.archetype_id.as_deref() == Some(id))
                })
                .map(|n| n.path.clone())
                .or_else(|| Some(s.to_string())),
            None => nodes.next().map(|n| n.path.clone()),
        };
        if found.is_none() {
            self.report(format!(
                "archetype: model '{name}': archetype '{id}' is not in the template"
            ));
        }
        found
    }

    fn mapping(&mut self, model: &Arc<str>, m: &Mapping, scope: &Scope, depth: usize) -> Helper {
        let name: &str = m.name.as_deref().unwrap_or_default();
        let with = m.with.as_ref();
        let openehr_path = with
            .and_then(|w| w.openehr.as_deref())
            .map(|raw| substitute(raw.trim(), scope, &self.template.root().path));
        let resolved = openehr_path.as_deref().is_some_and(|p| self.resolves(p));
        let fhir_path = with.and_then(|w| w.fhir.as_deref());
        self.bytes += model.len()
            + name.len()
            + fhir_path.map_or(0, str::len)
            + openehr_path.as_ref().map_or(0, String::len);
        if let (Some(p), false) = (&openehr_path, resolved) {
            self.report(format!("{model}/{name}: {p}"));
        }

        let followed = m.followed_by.as_ref().and_then(|f| f.mappings.as_deref());
        let referenced = m.reference.as_ref().and_then(|r| r.mappings.as_deref());
        let slot = m
            .slot_archetype
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty());
        let has_children = followed.is_some_and(|f| !f.is_empty())
            || referenced.is_some_and(|r| !r.is_empty())
            || slot.is_some();
        let mut children = Vec::new();
        self.made += 1;
        if has_children && self.limit_reached(model, name) {
            // Reported once by limit_reached.
        } else if has_children && depth >= MAX_DEPTH {
            self.report(format!(
                "depth: {model}/{name}: children deeper than {MAX_DEPTH} levels are not expanded"
            ));
        } else if has_children {
            let here = openehr_path.clone().or_else(|| scope.parent.clone());
            let child_scope = Scope {
                parent: here.clone(),
                ..scope.clone()
            };
            for c in followed.unwrap_or_default() {
                if self.limit_reached(model, c.name.as_deref().unwrap_or_default()) {
                    break;
                }
                children.push(Arc::new(self.mapping(model, c, &child_scope, depth + 1)));
            }
            let ref_scope = Scope {
                parent: here.clone(),
                reference: here.clone(),
                ..scope.clone()
            };
            for c in referenced.unwrap_or_default() {
                if self.limit_reached(model, c.name.as_deref().unwrap_or_default()) {
                    break;
                }
                children.push(Arc::new(self.mapping(model, c, &ref_scope, depth + 1)));
            }
            if let Some(slot) = slot {
                let targets: Vec<(String, Arc<ModelDocument>)> = self
                    .index
                    .resolve(slot)
                    .into_iter()
                    .map(|(n, m)| (n.to_string(), Arc::clone(m)))
                    .collect();
                if targets.is_empty() {
                    self.report(format!(
                        "slot: {model}/{name}: '{slot}' names no model of the context"
                    ));
                }
                // Every model of the slotted archetype is pulled in, as openFHIR's engine does.
                for (target, tm) in targets {
                    if self.branch.contains(&target) {
                        self.report(format!(
                            "cycle: {model}/{name}: {} -> {target} is not expanded again",
                            self.branch.join(" -> ")
                        ));
                        continue;
                    }
                    children.extend(self.model(&target, &tm, here.as_deref(), depth + 1));
                }
            }
        }
        Helper {
            model: Arc::clone(model),
            mapping: Arc::from(name),
            fhir_path: fhir_path.map(Arc::from),
            openehr_path: openehr_path.map(Arc::from),
            resolved,
            children: if children.is_empty() {
                Arc::clone(&self.no_children)
            } else {
                Arc::from(children)
            },
            state: Map::new(),
        }
    }

    /// The template has a node at `path`, or at its parent when that is not the root.
    /// A path resolves if the template has it, or if its last segment is a plain reference-model
    /// attribute (`.../value`, `/time`: no `[node id]`) of a node the template has.
    fn resolves(&self, path: &str) -> bool {
        if self.template.find(path).is_some() {
            return true;
        }
        let last = path.rsplit('/').next().unwrap_or("");
        !last.contains('[')
            && parent(path).is_some_and(|p| p != "/" && self.template.find(p).is_some())
    }
}

/// `raw` with its leading variable replaced (or joined to the parent when relative).
fn substitute(raw: &str, scope: &Scope, root: &str) -> String {
    let vars = [
        ("$archetype", scope.archetype.as_deref()),
        ("$composition", Some(root)),
        ("$reference", scope.reference.as_deref()),
    ];
    for (var, base) in vars {
        if let Some(rest) = raw.strip_prefix(var) {
            if rest.is_empty() || rest.starts_with('/') {
                return match base {
                    Some(b) => join(b, rest),
                    None => raw.to_string(),
                };
            }
        }
    }
    if raw.starts_with('$') || raw.starts_with('/') {
        return raw.to_string();
    }
    match scope.parent.as_deref() {
        Some(p) => join(p, &format!("/{raw}")),
        None => raw.to_string(),
    }
}

/// `base` + `rest` (`rest` empty or starting with `/`), without doubling the root's `/`.
fn join(base: &str, rest: &str) -> String {
    if rest.is_empty() {
        base.to_string()
    } else if base == "/" || base.is_empty() {
        rest.to_string()
    } else {
        format!("{}{rest}", base.trim_end_matches('/'))
    }
}

/// `path` without its last segment (a `/` inside `[...]` does not split).
fn parent(path: &str) -> Option<&str> {
    let mut depth = 0i32;
    let mut last = None;
    for (i, c) in path.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            '/' if depth == 0 => last = Some(i),
            _ => {}
        }
    }
    match last? {
        0 if path.len() > 1 => Some("/"),
        0 => None,
        i => Some(&path[..i]),
    }
}

/// `path` is `base` or below it.
fn is_under(path: &str, base: &str) -> bool {
    path == base
        || (path.starts_with(base) && (base.ends_with('/') || path[base.len()..].starts_with('/')))
}

#[cfg(test)]
mod tests;
