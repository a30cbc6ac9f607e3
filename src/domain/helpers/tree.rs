//! The helper tree's types: immutable nodes shared between copies, the accessors that read
//! them and the copy-on-write API that changes one copy (see the [parent module](super)).

use std::sync::Arc;

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

/// A list of helpers (a node's children, a tree's roots), shared between copies until one of
/// them writes below it.
pub(super) type Shared = Arc<[Arc<Helper>]>;

/// One mapping, resolved: a node of a [`HelperTree`].
///
/// Read it through its accessors; change it only through a `&mut Helper` from
/// [`HelperTree::get_mut`] or [`Helper::child_mut`], which make sure the node is this copy's own.
/// Serialized as it always was: `model`, `mapping`, `fhir_path`, `openehr_path`, `resolved`,
/// `children`, `state` (the JSON of `GET /fc/helpers/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Helper {
    /// Shared by every helper of one model expansion (interned by the builder).
    #[serde(serialize_with = "str_")]
    pub(super) model: Arc<str>,
    #[serde(serialize_with = "str_")]
    pub(super) mapping: Arc<str>,
    #[serde(serialize_with = "opt_str")]
    pub(super) fhir_path: Option<Arc<str>>,
    #[serde(serialize_with = "opt_str")]
    pub(super) openehr_path: Option<Arc<str>>,
    pub(super) resolved: bool,
    #[serde(serialize_with = "helpers")]
    pub(super) children: Shared,
    pub(super) state: Map<String, Value>,
}

impl Helper {
    /// The model the mapping belongs to (`metadata.name`).
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The mapping's name (empty when it has none).
    pub fn mapping(&self) -> &str {
        &self.mapping
    }

    /// `with.fhir`, as written (or as [`Helper::set_fhir_path`] replaced it in this copy).
    pub fn fhir_path(&self) -> Option<&str> {
        self.fhir_path.as_deref()
    }

    /// `with.openehr` made absolute: `$archetype`, `$composition` and `$reference` replaced,
    /// relative paths joined to the parent's. `None` when the mapping has no openEHR side.
    pub fn openehr_path(&self) -> Option<&str> {
        self.openehr_path.as_deref()
    }

    /// True when the template has a node at [`Helper::openehr_path`] or at its parent (a path
    /// ending in an RM attribute the template does not constrain, like `/time`). False without
    /// openEHR side.
    pub fn resolved(&self) -> bool {
        self.resolved
    }

    /// Child mappings: `followedBy`, then `reference`, then the slotted model's mappings. The
    /// `Arc`s are the shared nodes: `Arc::ptr_eq` tells whether two copies still share one.
    pub fn children(&self) -> &[Arc<Helper>] {
        &self.children
    }

    /// Per-use scratch state; empty in a built (cached) tree.
    pub fn state(&self) -> &Map<String, Value> {
        &self.state
    }

    /// The per-use state, to write. The node is already this copy's own (see the type's
    /// documentation), so writing here changes no other copy.
    pub fn state_mut(&mut self) -> &mut Map<String, Value> {
        &mut self.state
    }

    /// Replaces `with.fhir` in this copy.
    pub fn set_fhir_path(&mut self, path: Option<&str>) {
        self.fhir_path = path.map(Arc::from);
    }

    /// Replaces the resolved openEHR path in this copy (`resolved` is left as it is: the engine
    /// that rewrites a path knows whether it holds).
    pub fn set_openehr_path(&mut self, path: Option<&str>) {
        self.openehr_path = path.map(Arc::from);
    }

    /// Sets [`Helper::resolved`] in this copy.
    pub fn set_resolved(&mut self, resolved: bool) {
        self.resolved = resolved;
    }

    /// Child `i`, to change: copies this node's child list and the child when another copy
    /// shares them (the child's own children stay shared). `None`, copying nothing, when there
    /// is no child `i`.
    pub fn child_mut(&mut self, i: usize) -> Option<&mut Helper> {
        if i >= self.children.len() {
            return None;
        }
        Arc::make_mut(&mut self.children)
            .get_mut(i)
            .map(Arc::make_mut)
    }
}

/// The helpers of one template.
///
/// `clone()` is the isolated copy a use gets: it shares every node with the original, and
/// changes made through [`HelperTree::get_mut`] copy only the path to the changed node.
/// Serialized as `template_id`, `roots`, `unresolved`, as before its nodes were shared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HelperTree {
    #[serde(serialize_with = "str_")]
    pub(super) template_id: Arc<str>,
    #[serde(serialize_with = "helpers")]
    pub(super) roots: Shared,
    #[serde(serialize_with = "strings")]
    pub(super) unresolved: Arc<Vec<String>>,
}

impl HelperTree {
    /// The normalized template id.
    pub fn template_id(&self) -> &str {
        &self.template_id
    }

    /// One helper per mapping of the start model(s).
    pub fn roots(&self) -> &[Arc<Helper>] {
        &self.roots
    }

    /// What did not resolve: `model/mapping: path` for openEHR paths, and `start: ...`,
    /// `archetype: ...`, `slot: ...`, `cycle: ...`, `depth: ...`, `template: ...`, `limit: ...`
    /// entries.
    pub fn unresolved(&self) -> &[String] {
        &self.unresolved
    }

    /// The [`HelperTree::unresolved`] entries of this copy, to change (copied on the first write
    /// when shared).
    pub fn unresolved_mut(&mut self) -> &mut Vec<String> {
        Arc::make_mut(&mut self.unresolved)
    }

    /// Every helper, depth first, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Helper> {
        let mut stack: Vec<&Helper> = self.roots.iter().rev().map(|h| &**h).collect();
        std::iter::from_fn(move || {
            let h = stack.pop()?;
            stack.extend(h.children.iter().rev().map(|c| &**c));
            Some(h)
        })
    }

    /// The helper at an index path: `[i]` is root `i`, `[i, j]` its child `j`, and so on.
    /// `None` for an empty path or an index out of range.
    pub fn get(&self, path: &[usize]) -> Option<&Helper> {
        let (first, rest) = path.split_first()?;
        let mut h: &Helper = self.roots.get(*first)?;
        for &i in rest {
            h = h.children.get(i)?;
        }
        Some(h)
    }

    /// The helper at an index path (as [`HelperTree::get`]), to change in this copy only.
    ///
    /// Copy-on-write: every node from the root to it (and the child lists holding them) that
    /// this copy shares with another is copied first; everything else stays shared. A second
    /// write on the same path copies nothing more. An invalid path returns `None` and copies
    /// nothing.
    pub fn get_mut(&mut self, path: &[usize]) -> Option<&mut Helper> {
        // Checked first so that a path failing halfway leaves no copied nodes behind.
        self.get(path)?;
        let (first, rest) = path.split_first()?;
        let mut h = Arc::make_mut(Arc::make_mut(&mut self.roots).get_mut(*first)?);
        for &i in rest {
            h = h.child_mut(i)?;
        }
        Some(h)
    }

    /// The index path of the deepest helper (the first one found at that depth): the node whose
    /// write copies the longest path. Empty for a tree without helpers.
    pub fn deepest_path(&self) -> Vec<usize> {
        let mut best = Vec::new();
        let mut stack: Vec<(&Helper, Vec<usize>)> = self
            .roots
            .iter()
            .enumerate()
            .map(|(i, h)| (&**h, vec![i]))
            .collect();
        stack.reverse();
        while let Some((h, path)) = stack.pop() {
            if path.len() > best.len() {
                best = path.clone();
            }
            for (i, c) in h.children.iter().enumerate().rev() {
                let mut p = path.clone();
                p.push(i);
                stack.push((&**c, p));
            }
        }
        best
    }

    /// The index path of the first helper, depth first, for which `pred` holds (to pass to
    /// [`HelperTree::get_mut`]).
    pub fn find_path(&self, mut pred: impl FnMut(&Helper) -> bool) -> Option<Vec<usize>> {
        // Depth first with an explicit stack of (helper, its path), in the order of `iter`.
        let mut stack: Vec<(&Helper, Vec<usize>)> = self
            .roots
            .iter()
            .enumerate()
            .rev()
            .map(|(i, h)| (&**h, vec![i]))
            .collect();
        while let Some((h, path)) = stack.pop() {
            if pred(h) {
                return Some(path);
            }
            for (i, c) in h.children.iter().enumerate().rev() {
                let mut p = path.clone();
                p.push(i);
                stack.push((&**c, p));
            }
        }
        None
    }
}

// The serialized form is the one the tree had as plain owned data (`String`, `Vec<Helper>`), so
// `GET /fc/helpers/{id}` answers the same bytes; serde's own `Arc` support (its `rc` feature)
// would do the same but changes the feature set every dependency is built with.

fn str_<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

fn opt_str<S: Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&**v),
        None => s.serialize_none(),
    }
}

fn helpers<S: Serializer>(v: &Shared, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|h| &**h))
}

fn strings<S: Serializer>(v: &Arc<Vec<String>>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter())
}
