//! The mapper index of a (tenant, template): the context's core models with its extensions merged
//! in, indexed by model name and by archetype id.
//!
//! Models and extensions are resolved the way openFHIR's engine resolves them (see [`compile`]):
//! several models may map one archetype, a name the context lists but nobody uploaded is left
//! out, and an extension step that finds nothing to change is skipped. Those are
//! [`MapperIndex::warnings`]; only what the engine itself cannot get past fails the compile.
//!
//! [`compile`] is pure: it merges into *clones* of the models it is given, so shared (cached)
//! documents are never mutated, and it reports every problem at once in a [`CompileError`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::domain::fc_model::{ContextDocument, ExtensionKind, FollowedBy, Mapping, ModelDocument};

/// The compiled mappers of one context: immutable, shareable (`Arc<MapperIndex>`).
#[derive(Debug, Clone)]
pub struct MapperIndex {
    /// The normalized template id ([`crate::domain::normalize_template_id`] of
    /// `context.template.id`).
    pub template_id: String,
    /// The context document.
    pub context: Arc<ContextDocument>,
    /// The merged core models, by `metadata.name`.
    pub by_model: BTreeMap<String, Arc<ModelDocument>>,
    /// Archetype id (`spec.openEhrConfig.archetype`) -> the names of the models that map it, in
    /// `context.archetypes` order.
    pub by_archetype: BTreeMap<String, Vec<String>>,
    /// The extensions merged into at least one model, in `context.extensions` order.
    pub merged_extensions: Vec<String>,
    /// What the compile left out, as openFHIR's engine leaves it out: names not uploaded,
    /// extensions of models the context does not use, `appendTo` or `overwrite` targets not found.
    pub warnings: Vec<String>,
    /// `context.start` as the engine reads it: the archetype of the first model it designates,
    /// else as written.
    pub start: Option<String>,
}

/// A compiled mapper index with where and when it was compiled: the `mapper` cache's value.
#[derive(Debug, Clone)]
pub struct CompiledMapper {
    /// The index.
    pub index: MapperIndex,
    /// When it was compiled.
    pub compiled_at: time::OffsetDateTime,
    /// The node that compiled it.
    pub node: String,
    /// How long compiling took, in microseconds (loading the inputs excluded).
    pub compile_us: u64,
}

/// Why a mapper index could not be compiled: every problem found, in the order found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot compile the mapper: {}", missing.join("; "))]
pub struct CompileError {
    /// One sentence per problem.
    pub missing: Vec<String>,
}

impl MapperIndex {
    /// The models a name or an archetype id designates, as the engine looks a key up: the model
    /// of that name, then the models of that archetype id; failing both, the models of archetype
    /// `openEHR-EHR-<key>` (`CLUSTER.device.v1` written for `openEHR-EHR-CLUSTER.device.v1`).
    pub fn resolve(&self, name_or_archetype: &str) -> Vec<(&str, &Arc<ModelDocument>)> {
        let key = name_or_archetype.trim();
        let mut found: Vec<(&str, &Arc<ModelDocument>)> = Vec::new();
        if let Some((k, m)) = self.by_model.get_key_value(key) {
            found.push((k.as_str(), m));
        }
        let archetype = self.by_archetype.get(key).or_else(|| {
            found
                .is_empty()
                .then(|| self.by_archetype.get(&format!("openEHR-EHR-{key}")))
                .flatten()
        });
        for name in archetype.into_iter().flatten() {
            if let Some((k, m)) = self.by_model.get_key_value(name) {
                if !found.iter().any(|(f, _)| *f == k.as_str()) {
                    found.push((k.as_str(), m));
                }
            }
        }
        found
    }

    /// A JSON summary: `models` (name -> `{archetype, mappings}` with the mapping count),
    /// `by_archetype` (archetype -> model names), `merged_extensions`, `warnings`, `start` and
    /// the `template_id`.
    pub fn summary(&self) -> Value {
        let models: serde_json::Map<String, Value> = self
            .by_model
            .iter()
            .map(|(name, m)| {
                (
                    name.clone(),
                    json!({ "archetype": m.archetype(), "mappings": m.mappings().len() }),
                )
            })
            .collect();
        json!({
            "template_id": self.template_id,
            "models": models,
            "by_archetype": self.by_archetype,
            "merged_extensions": self.merged_extensions,
            "warnings": self.warnings,
            "start": self.start,
        })
    }
}

/// Compiles the mapper index of `context` from the uploaded `models` (models and extensions,
/// keyed by `metadata.name`), as openFHIR's engine does.
///
/// * Core models: the documents named in `context.archetypes` (repeats once). Names nobody
///   uploaded are left out with a warning; none found at all fails.
/// * Extensions: the documents named in `context.extensions`, merged into a clone of every core
///   model whose name their `spec.extends` gives, in `context.extensions` order, each mapping by
///   its `extension` kind:
///   - `add`: appended to the model's mappings;
///   - `append`: the mapping `appendTo` names (`a`, or `a.b` for mapping `b` in `a`'s
///     `followedBy`) takes the extension mapping's `fhirCondition` and `openehrCondition` when it
///     has them, and its `followedBy.mappings` at the end of its own (`with` is not appended);
///   - `overwrite`: the model's mapping of the same name (at any depth of `followedBy`) is
///     replaced by the extension mapping.
///
///   A target not found is skipped with a warning, as is an extension of a model the context
///   does not use; names not uploaded are left out with a warning, none found at all fails. The
///   last merged extension with a `terminology` gives the model its terminology.
/// * Index: every core model by name and by archetype (several models per archetype are normal).
///
/// Fails, with every problem found, only where the engine cannot go on: the template not
/// uploaded (`template_uploaded == false`), no core model found, a core model without
/// `spec.openEhrConfig` or `spec.fhirConfig`, an extension without `spec.extends`, an extension
/// mapping without an `extension` kind, an `append` without `appendTo`. `models` is never
/// modified.
pub fn compile(
    context: &ContextDocument,
    models: &BTreeMap<String, ModelDocument>,
    template_uploaded: bool,
) -> Result<MapperIndex, CompileError> {
    let mut missing = Vec::new();
    let mut warnings = Vec::new();

    let raw_template_id = context.template_id().map(str::trim).unwrap_or_default();
    let template_id = crate::domain::normalize_template_id(raw_template_id);
    if !template_uploaded {
        missing.push(format!("template '{template_id}' is not uploaded"));
    }

    // Core models, cloned: the merge below works on these copies only.
    let mut order: Vec<String> = Vec::new();
    let mut working: BTreeMap<String, ModelDocument> = BTreeMap::new();
    let names = unique(context.archetypes());
    for name in &names {
        match models.get(*name) {
            None => warnings.push(format!(
                "model '{name}' named in context.archetypes is not uploaded; left out"
            )),
            Some(model) => {
                let spec = model.spec.as_ref();
                if spec.and_then(|s| s.open_ehr_config.as_ref()).is_none() {
                    missing.push(format!("model '{name}' has no spec.openEhrConfig"));
                }
                if spec.and_then(|s| s.fhir_config.as_ref()).is_none() {
                    missing.push(format!("model '{name}' has no spec.fhirConfig"));
                }
                order.push(name.to_string());
                working.insert(name.to_string(), model.clone());
            }
        }
    }
    if working.is_empty() {
        missing.push(if names.is_empty() {
            "the context names no model in context.archetypes".to_string()
        } else {
            format!(
                "none of the models named in context.archetypes is uploaded ({})",
                names.join(", ")
            )
        });
    }

    // Extensions, merged in order.
    let ext_names = unique(context.extensions());
    let mut extensions = Vec::new();
    for name in &ext_names {
        match models.get(*name) {
            None => warnings.push(format!(
                "extension '{name}' named in context.extensions is not uploaded; left out"
            )),
            Some(ext) => match ext.extends().map(str::trim) {
                None => missing.push(format!("extension '{name}' has no spec.extends")),
                Some(target) => extensions.push((*name, target, ext)),
            },
        }
    }
    if !ext_names.is_empty() && extensions.is_empty() && missing.is_empty() {
        missing.push(format!(
            "none of the extensions named in context.extensions is uploaded ({})",
            ext_names.join(", ")
        ));
    }
    let mut merged_extensions = Vec::new();
    for (name, target, ext) in &extensions {
        let Some(core) = working.get_mut(*target) else {
            warnings.push(format!(
                "extension '{name}' extends '{target}', which is not among the context's models; not merged"
            ));
            continue;
        };
        for (i, m) in ext.mappings().iter().enumerate() {
            merge_mapping(name, target, i, m, core, &mut missing, &mut warnings);
        }
        if let Some(t) = &ext.terminology {
            core.terminology = Some(t.clone());
        }
        merged_extensions.push(name.to_string());
    }

    if !missing.is_empty() {
        return Err(CompileError { missing });
    }
    let mut by_archetype: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in &order {
        if let Some(a) = working[name].archetype() {
            by_archetype
                .entry(a.to_string())
                .or_default()
                .push(name.clone());
        }
    }
    let mut index = MapperIndex {
        template_id,
        context: Arc::new(context.clone()),
        by_model: working.into_iter().map(|(k, m)| (k, Arc::new(m))).collect(),
        by_archetype,
        merged_extensions,
        warnings,
        start: None,
    };
    let start = context.context.as_ref().and_then(|c| c.start.as_deref());
    index.start = start.map(|s| {
        index
            .resolve(s)
            .first()
            .and_then(|(_, m)| m.archetype())
            .unwrap_or(s)
            .to_string()
    });
    Ok(index)
}

/// The names of a list, trimmed, without blanks and repeats, in order.
fn unique(names: &[String]) -> Vec<&str> {
    let mut seen = BTreeSet::new();
    names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty() && seen.insert(*n))
        .collect()
}

/// Merges mapping `i` of extension `ext` into `core` (the clone of model `target`).
fn merge_mapping(
    ext: &str,
    target: &str,
    i: usize,
    m: &Mapping,
    core: &mut ModelDocument,
    missing: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    let label = match m.name.as_deref() {
        Some(n) => format!("extension '{ext}' mapping '{n}'"),
        None => format!("extension '{ext}' mappings[{i}]"),
    };
    let Some(kind) = m.extension_kind() else {
        missing.push(format!(
            "{label} has no extension kind (add, append or overwrite)"
        ));
        return;
    };
    match kind {
        ExtensionKind::Add => core.mappings.get_or_insert_with(Vec::new).push(m.clone()),
        ExtensionKind::Overwrite => {
            let name = m.name.as_deref().unwrap_or_default();
            match find_by_name(core.mappings.as_deref_mut().unwrap_or_default(), name) {
                Some(slot) => *slot = m.clone(),
                None => warnings.push(format!(
                    "{label} (overwrite): model '{target}' has no mapping '{name}'; not overwritten"
                )),
            }
        }
        _ => {
            let Some(append_to) = m.append_to.as_deref() else {
                missing.push(format!("{label} (append) has no appendTo"));
                return;
            };
            let Some(slot) =
                find_by_path(core.mappings.as_deref_mut().unwrap_or_default(), append_to)
            else {
                warnings.push(format!(
                    "{label} (append): appendTo '{append_to}' names no mapping of model '{target}'; not appended"
                ));
                return;
            };
            if m.fhir_condition.is_some() {
                slot.fhir_condition = m.fhir_condition.clone();
            }
            if m.openehr_condition.is_some() {
                slot.openehr_condition = m.openehr_condition.clone();
            }
            if let Some(added) = m.followed_by.as_ref().and_then(|f| f.mappings.as_ref()) {
                slot.followed_by
                    .get_or_insert_with(FollowedBy::default)
                    .mappings
                    .get_or_insert_with(Vec::new)
                    .extend(added.iter().cloned());
            }
        }
    }
}

/// The mapping `path` names: `a` at this level, `a.b` mapping `b` of `a`'s `followedBy`.
fn find_by_path<'m>(mappings: &'m mut [Mapping], path: &str) -> Option<&'m mut Mapping> {
    let (first, rest) = match path.split_once('.') {
        Some((f, r)) => (f, Some(r)),
        None => (path, None),
    };
    let found = mappings
        .iter_mut()
        .find(|m| m.name.as_deref() == Some(first))?;
    match rest {
        None => Some(found),
        Some(rest) => find_by_path(found.followed_by.as_mut()?.mappings.as_deref_mut()?, rest),
    }
}

/// The mapping named `name` at this level, else the first found depth first in `followedBy`.
fn find_by_name<'m>(mappings: &'m mut [Mapping], name: &str) -> Option<&'m mut Mapping> {
    let at = mappings
        .iter()
        .position(|m| m.name.as_deref() == Some(name));
    if let Some(i) = at {
        return mappings.get_mut(i);
    }
    mappings.iter_mut().find_map(|m| {
        let children = m.followed_by.as_mut()?.mappings.as_deref_mut()?;
        find_by_name(children, name)
    })
}

/// Fixtures shared with the helper tests.
#[cfg(test)]
pub(crate) mod fixtures;

#[cfg(test)]
mod tests;
