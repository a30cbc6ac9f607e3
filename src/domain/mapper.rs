//! The mapper index of a (tenant, template): the context's core models with its extensions merged
//! in, indexed by model name and by archetype id.
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
    /// Archetype id (`spec.openEhrConfig.archetype`) -> model name.
    pub by_archetype: BTreeMap<String, String>,
    /// The extensions merged, in the order they were merged (`context.extensions` order).
    pub merged_extensions: Vec<String>,
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
    /// The model a name or an archetype id designates: a model name first, then an archetype id,
    /// then `openEHR-EHR-<name>` as an archetype id (`CLUSTER.device.v1` written for
    /// `openEHR-EHR-CLUSTER.device.v1`).
    pub fn resolve(&self, name_or_archetype: &str) -> Option<(&str, &Arc<ModelDocument>)> {
        let key = name_or_archetype.trim();
        if let Some((k, m)) = self.by_model.get_key_value(key) {
            return Some((k.as_str(), m));
        }
        let model = self
            .by_archetype
            .get(key)
            .or_else(|| self.by_archetype.get(&format!("openEHR-EHR-{key}")))?;
        self.by_model
            .get_key_value(model)
            .map(|(k, m)| (k.as_str(), m))
    }

    /// A JSON summary: `models` (name -> `{archetype, mappings}` with the mapping count),
    /// `by_archetype`, `merged_extensions`, and the `template_id`.
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
        })
    }
}

/// Compiles the mapper index of `context` from the uploaded `models` (models and extensions,
/// keyed by `metadata.name`).
///
/// Loads the models named in `context.archetypes` and the extensions in `context.extensions`,
/// and merges every extension mapping into a clone of the model its extension `extends`:
/// - `add`: the mapping is appended to the model's mappings;
/// - `append`: the extension mapping's `followedBy.mappings` (or, when it has none, the mapping
///   itself) are appended to the `followedBy.mappings` of the model's mapping named by `appendTo`;
/// - `overwrite`: the model's mapping named by `appendTo` is replaced by the extension mapping.
///
/// Extensions are merged in `context.extensions` order, so a later one sees what an earlier one
/// added. Names listed twice are loaded once. `models` is never modified.
///
/// Fails with every problem found: the template not uploaded (`template_uploaded == false`), no
/// template id or no archetypes in the context, a model or extension not uploaded (or of the
/// wrong type), a model without archetype or two models of one archetype, an extension without
/// `extends` or extending a model not in `context.archetypes`, a mapping with a missing or
/// unknown `extension` kind, an `append`/`overwrite` without `appendTo` or whose `appendTo` names
/// no mapping of the model.
pub fn compile(
    context: &ContextDocument,
    models: &BTreeMap<String, ModelDocument>,
    template_uploaded: bool,
) -> Result<MapperIndex, CompileError> {
    let mut missing = Vec::new();
    let ctx = context.context.as_ref();

    let raw_template_id = context.template_id().map(str::trim).unwrap_or_default();
    let template_id = crate::domain::normalize_template_id(raw_template_id);
    if raw_template_id.is_empty() {
        missing.push("the context has no context.template.id".to_string());
    } else if !template_uploaded {
        missing.push(format!("template '{template_id}' is not uploaded"));
    }

    // Core models, cloned: the merge below works on these copies only.
    let archetypes = ctx
        .and_then(|c| c.archetypes.as_deref())
        .unwrap_or_default();
    if archetypes.is_empty() {
        missing.push("the context names no model in context.archetypes".to_string());
    }
    let mut working: BTreeMap<String, ModelDocument> = BTreeMap::new();
    let mut by_archetype: BTreeMap<String, String> = BTreeMap::new();
    for name in unique(archetypes) {
        let Some(model) = models.get(name) else {
            missing.push(format!(
                "model '{name}' named in context.archetypes is not uploaded"
            ));
            continue;
        };
        if model.is_extension() {
            missing.push(format!(
                "'{name}' named in context.archetypes is an extension, not a model"
            ));
            continue;
        }
        match model.archetype().map(str::trim).filter(|a| !a.is_empty()) {
            None => missing.push(format!(
                "model '{name}' has no spec.openEhrConfig.archetype"
            )),
            Some(archetype) => {
                if let Some(other) = by_archetype.get(archetype) {
                    missing.push(format!(
                        "models '{other}' and '{name}' both map archetype '{archetype}'"
                    ));
                } else {
                    by_archetype.insert(archetype.to_string(), name.to_string());
                }
            }
        }
        working.insert(name.to_string(), model.clone());
    }

    // Extensions, merged in order.
    let extensions = ctx
        .and_then(|c| c.extensions.as_deref())
        .unwrap_or_default();
    let mut merged_extensions = Vec::new();
    for name in unique(extensions) {
        let Some(ext) = models.get(name) else {
            missing.push(format!(
                "extension '{name}' named in context.extensions is not uploaded"
            ));
            continue;
        };
        if !ext.is_extension() {
            missing.push(format!(
                "'{name}' named in context.extensions is not an extension (type: extension)"
            ));
            continue;
        }
        let Some(target) = ext.extends().map(str::trim).filter(|t| !t.is_empty()) else {
            missing.push(format!("extension '{name}' has no spec.extends"));
            continue;
        };
        let Some(core) = working.get_mut(target) else {
            missing.push(format!(
                "extension '{name}' extends '{target}', which is not in context.archetypes"
            ));
            continue;
        };
        let before = missing.len();
        for (i, m) in ext.mappings().iter().enumerate() {
            merge_mapping(name, target, i, m, core, &mut missing);
        }
        if missing.len() == before {
            merged_extensions.push(name.to_string());
        }
    }

    if !missing.is_empty() {
        return Err(CompileError { missing });
    }
    Ok(MapperIndex {
        template_id,
        context: Arc::new(context.clone()),
        by_model: working.into_iter().map(|(k, m)| (k, Arc::new(m))).collect(),
        by_archetype,
        merged_extensions,
    })
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
) {
    let label = match m.name.as_deref() {
        Some(n) => format!("extension '{ext}' mapping '{n}'"),
        None => format!("extension '{ext}' mappings[{i}]"),
    };
    let Some(kind) = m.extension_kind() else {
        missing.push(match m.extension.as_deref() {
            None => format!("{label} has no extension kind (add, append or overwrite)"),
            Some(k) => format!("{label} has extension kind '{k}', not add, append or overwrite"),
        });
        return;
    };
    if kind == ExtensionKind::Add {
        let taken = m.name.as_deref().is_some_and(|n| {
            core.mappings
                .iter()
                .flatten()
                .any(|c| c.name.as_deref() == Some(n))
        });
        if taken {
            missing.push(format!(
                "{label} (add) adds mapping '{}', which the model already has: use overwrite",
                m.name.as_deref().unwrap_or_default()
            ));
            return;
        }
        core.mappings.get_or_insert_with(Vec::new).push(m.clone());
        return;
    }
    let Some(append_to) = m
        .append_to
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
    else {
        missing.push(format!("{label} ({}) has no appendTo", kind_name(kind)));
        return;
    };
    let Some(slot) = core
        .mappings
        .as_mut()
        .and_then(|ms| ms.iter_mut().find(|c| c.name.as_deref() == Some(append_to)))
    else {
        missing.push(format!(
            "{label}: appendTo '{append_to}' names no mapping of model '{target}'"
        ));
        return;
    };
    match kind {
        ExtensionKind::Overwrite => {
            // The replacement keeps the name it replaces, so later extensions still find it.
            let name = slot.name.clone();
            *slot = m.clone();
            slot.name = name;
        }
        _ => {
            let added: Vec<Mapping> = match m.followed_by.as_ref().and_then(|f| f.mappings.as_ref())
            {
                Some(children) if !children.is_empty() => children.clone(),
                _ => vec![m.clone()],
            };
            slot.followed_by
                .get_or_insert_with(FollowedBy::default)
                .mappings
                .get_or_insert_with(Vec::new)
                .extend(added);
        }
    }
}

fn kind_name(kind: ExtensionKind) -> &'static str {
    match kind {
        ExtensionKind::Add => "add",
        ExtensionKind::Append => "append",
        _ => "overwrite",
    }
}

/// Fixtures shared with the helper tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use crate::domain::fc_model::{parse_context, parse_model};
    use crate::domain::FcFormat;

    pub const CONTEXT: &str = include_str!("../../tests/fixtures/growth_chart.context.yml");
    pub const HEIGHT: &str = include_str!("../../tests/fixtures/height.model.yml");
    pub const WEIGHT: &str = include_str!("../../tests/fixtures/weight.model.yml");
    pub const EXT_ADD: &str = include_str!("../../tests/fixtures/height.ext-add.yml");
    pub const EXT_APPEND: &str = include_str!("../../tests/fixtures/height.ext-append.yml");
    pub const EXT_OVERWRITE: &str = include_str!("../../tests/fixtures/height.ext-overwrite.yml");
    pub const OPT: &str = include_str!("../../tests/fixtures/growth_chart.opt");

    pub fn context(text: &str) -> ContextDocument {
        parse_context(text, FcFormat::Yaml).unwrap()
    }

    /// The given model/extension texts, keyed by `metadata.name`.
    pub fn models(texts: &[&str]) -> BTreeMap<String, ModelDocument> {
        texts
            .iter()
            .map(|t| {
                let m = parse_model(t, FcFormat::Yaml).unwrap();
                (m.name().unwrap().to_string(), m)
            })
            .collect()
    }

    /// The growth chart's two models and three extensions.
    pub fn growth_models() -> BTreeMap<String, ModelDocument> {
        models(&[HEIGHT, WEIGHT, EXT_ADD, EXT_APPEND, EXT_OVERWRITE])
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    fn names(ms: &[Mapping]) -> Vec<&str> {
        ms.iter().filter_map(|m| m.name.as_deref()).collect()
    }

    #[test]
    fn compiles_the_growth_chart_and_merges_extensions() {
        let ctx = context(CONTEXT);
        let models = growth_models();
        let idx = compile(&ctx, &models, true).unwrap();
        assert_eq!(idx.template_id, "growth_chart");
        assert_eq!(
            idx.by_model.keys().collect::<Vec<_>>(),
            ["OBSERVATION.body_weight.v2", "OBSERVATION.height.v2"]
        );
        assert_eq!(
            idx.by_archetype
                .get("openEHR-EHR-OBSERVATION.height.v2")
                .map(String::as_str),
            Some("OBSERVATION.height.v2")
        );
        assert_eq!(
            idx.merged_extensions,
            [
                "height-ext-add",
                "height-ext-append",
                "height-ext-overwrite"
            ]
        );

        let height = &idx.by_model["OBSERVATION.height.v2"];
        // add: a new mapping at the end.
        assert_eq!(
            names(height.mappings()),
            ["height", "comment", "code", "device", "status", "position", "bodySite"]
        );
        // append: the extension's followedBy mappings join the `height` mapping's.
        let h = &height.mappings()[0];
        let children = h.followed_by.as_ref().unwrap().mappings.as_ref().unwrap();
        assert_eq!(names(children), ["unitSystem"]);
        // overwrite: `code` replaced in place (SNOMED instead of LOINC).
        let code = &height.mappings()[2];
        assert_eq!(code.extension.as_deref(), Some("overwrite"));
        let manual = code.manual.as_ref().unwrap();
        assert_eq!(manual[0].name.as_deref(), Some("snomed"));
        // The weight model is untouched.
        assert_eq!(
            **idx.by_model.get("OBSERVATION.body_weight.v2").unwrap(),
            models["OBSERVATION.body_weight.v2"]
        );

        let s = idx.summary();
        assert_eq!(s["models"]["OBSERVATION.height.v2"]["mappings"], 7);
        assert_eq!(
            s["models"]["OBSERVATION.height.v2"]["archetype"],
            "openEHR-EHR-OBSERVATION.height.v2"
        );
        assert_eq!(
            s["by_archetype"]["openEHR-EHR-OBSERVATION.body_weight.v2"],
            "OBSERVATION.body_weight.v2"
        );
        assert_eq!(s["merged_extensions"][2], "height-ext-overwrite");
        assert_eq!(s["template_id"], "growth_chart");
    }

    #[test]
    fn inputs_are_not_mutated() {
        let ctx = context(CONTEXT);
        let models = growth_models();
        let (ctx_before, models_before) = (ctx.clone(), models.clone());
        let idx = compile(&ctx, &models, true).unwrap();
        assert_eq!(ctx, ctx_before);
        assert_eq!(models, models_before);
        assert_eq!(models["OBSERVATION.height.v2"].mappings().len(), 6);
        assert!(models["OBSERVATION.height.v2"].mappings()[0]
            .followed_by
            .is_none());
        // Compiling twice gives the same result (nothing accumulated in shared state).
        let again = compile(&ctx, &models, true).unwrap();
        assert_eq!(again.summary(), idx.summary());
        assert_eq!(again.by_model, idx.by_model);
    }

    #[test]
    fn add_refuses_a_taken_name_and_overwrite_keeps_the_name() {
        // add: the name the extension adds already exists in the model.
        let ext = EXT_ADD.replace("name: bodySite", "name: height");
        let mut models = growth_models();
        models.extend(super::fixtures::models(&[&ext]));
        let e = compile(&context(CONTEXT), &models, true).unwrap_err();
        assert!(e.missing.iter().any(|m| m.contains("already has")), "{e:?}");
        // overwrite: the replaced mapping keeps its name even if the extension's differs.
        let ext = EXT_OVERWRITE.replace("  - name: code\n", "  - name: codeV2\n");
        assert_ne!(ext, EXT_OVERWRITE);
        let mut models = growth_models();
        models.extend(super::fixtures::models(&[&ext]));
        let idx = compile(&context(CONTEXT), &models, true).unwrap();
        let names: Vec<String> = idx.by_model["OBSERVATION.height.v2"]
            .mappings()
            .iter()
            .filter_map(|m| m.name.clone())
            .collect();
        assert!(
            names.iter().any(|n| n == "code") && !names.iter().any(|n| n == "codeV2"),
            "{names:?}"
        );
    }

    #[test]
    fn append_without_followed_by_appends_the_mapping_itself() {
        let ext = EXT_APPEND.replace("    followedBy:\n", "    x-followedBy:\n");
        let mut models = growth_models();
        models.extend(super::fixtures::models(&[&ext]));
        let idx = compile(&context(CONTEXT), &models, true).unwrap();
        let h = &idx.by_model["OBSERVATION.height.v2"].mappings()[0];
        let children = h.followed_by.as_ref().unwrap().mappings.as_ref().unwrap();
        assert_eq!(names(children), ["heightUnit"]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let ctx = context(
            &CONTEXT
                .replace("- OBSERVATION.body_weight.v2", "- OBSERVATION.missing.v1")
                .replace(
                    "- height-ext-add",
                    "- height-ext-add\n    - ghost-ext\n    - weight-ext",
                ),
        );
        let weight_ext = "grammar: FHIRConnect/v1.0.0\ntype: extension\nmetadata:\n  name: weight-ext\nspec:\n  system: FHIR\n  version: R4\n  extends: OBSERVATION.body_weight.v2\nmappings:\n  - name: x\n    extension: add\n    with:\n      fhir: \"$resource.x\"\n      openehr: \"$archetype\"\n";
        let bad_append = EXT_APPEND.replace("appendTo: height", "appendTo: nope");
        let bad_overwrite = EXT_OVERWRITE.replace("appendTo: code", "appendTo: gone");
        let models =
            super::fixtures::models(&[HEIGHT, EXT_ADD, &bad_append, &bad_overwrite, weight_ext]);
        let e = compile(&ctx, &models, false).unwrap_err();
        assert_eq!(
            e.missing,
            [
                "template 'growth_chart' is not uploaded",
                "model 'OBSERVATION.missing.v1' named in context.archetypes is not uploaded",
                "extension 'ghost-ext' named in context.extensions is not uploaded",
                "extension 'weight-ext' extends 'OBSERVATION.body_weight.v2', which is not in context.archetypes",
                "extension 'height-ext-append' mapping 'heightUnit': appendTo 'nope' names no mapping of model 'OBSERVATION.height.v2'",
                "extension 'height-ext-overwrite' mapping 'code': appendTo 'gone' names no mapping of model 'OBSERVATION.height.v2'",
            ]
        );
        assert!(e.to_string().starts_with(
            "cannot compile the mapper: template 'growth_chart' is not uploaded; model"
        ));
    }

    #[test]
    fn empty_context_is_refused() {
        let e = compile(&ContextDocument::default(), &BTreeMap::new(), true).unwrap_err();
        assert_eq!(
            e.missing,
            [
                "the context has no context.template.id",
                "the context names no model in context.archetypes",
            ]
        );
    }

    #[test]
    fn resolve_by_name_or_archetype() {
        let idx = compile(&context(CONTEXT), &growth_models(), true).unwrap();
        for key in ["OBSERVATION.height.v2", "openEHR-EHR-OBSERVATION.height.v2"] {
            assert_eq!(idx.resolve(key).unwrap().0, "OBSERVATION.height.v2");
        }
        assert!(idx
            .resolve("openEHR-EHR-COMPOSITION.encounter.v1")
            .is_none());
    }
}
