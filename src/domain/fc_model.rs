//! Typed FHIR Connect documents: contexts ([`ContextDocument`]) and models or extensions
//! ([`ModelDocument`]), with validation that reports every problem of a file at once.
//!
//! Every struct keeps the fields it does not know in `extra`, so a document read and written back
//! loses nothing (except explicit `null`s of typed fields, which read as absent). Fields that may be
//! invalid in a way the validator should report (`unidirectional`, `extension`) stay strings;
//! [`Mapping::direction`] and [`Mapping::extension_kind`] read them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::fhir_connect::FcFormat;
use crate::error::{Error, Result};

/// Unknown fields of a struct, kept for the round trip.
pub type Extra = Map<String, Value>;

/// One validation problem: the dotted field path (`mappings[3].with.fhir`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path to the field, with `[i]` list indexes.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// `metadata`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Metadata {
    /// The document's name; a model's key (`OBSERVATION.height.v2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The document's own version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `spec.openEhrConfig`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct OpenEhrConfig {
    /// Full archetype id (`openEHR-EHR-OBSERVATION.height.v2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archetype: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `spec.fhirConfig`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FhirConfig {
    /// Profile URL; the resource type is its last segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structure_definition: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

impl FhirConfig {
    /// The FHIR resource type: the last segment of `structureDefinition`.
    pub fn resource_type(&self) -> Option<&str> {
        let sd = self.structure_definition.as_deref()?.trim_end_matches('/');
        sd.rsplit('/').next().filter(|s| !s.is_empty())
    }
}

/// `spec`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// `FHIR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// `R4`, `R4B`, `R5` or `STU3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Model: the archetype it maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_ehr_config: Option<OpenEhrConfig>,
    /// Model: the FHIR profile it maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_config: Option<FhirConfig>,
    /// Extension: the `metadata.name` of the model it extends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `context.profile`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Profile {
    /// The FHIR profile URL that selects this context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Profile version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `context.template`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TemplateRef {
    /// The raw template id (`Growth chart`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The template's semantic version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sem_ver: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `context`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Context {
    /// The FHIR profile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
    /// The OPT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateRef>,
    /// Model names (`metadata.name`) of the core models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archetypes: Option<Vec<String>>,
    /// Model names of extensions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Vec<String>>,
    /// The root model name or archetype id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A context document (`type: context`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ContextDocument {
    /// `FHIRConnect/vX.Y.Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<String>,
    /// `context`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name and version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// System and version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Spec>,
    /// The context proper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Context>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `with`: the two sides a mapping connects.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct With {
    /// FHIRPath-like path (`$resource.value`, `$fhirRoot...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir: Option<String>,
    /// openEHR path (`$archetype/...`, `$composition/...`, `$reference/...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openehr: Option<String>,
    /// Data type hint.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// A fixed value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `fhirCondition` / `openehrCondition`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Where the condition is evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_root: Option<String>,
    /// The attribute tested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_attribute: Option<String>,
    /// Several attributes tested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_attributes: Option<Vec<String>>,
    /// `one of`, `not of`, `type`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// What the attribute is compared with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criteria: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `preprocessor.hierarchy`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Hierarchy {
    /// The paths the hierarchy is rooted at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<With>,
    /// How to split (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Value>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `preprocessor`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Preprocessor {
    /// Condition on the FHIR side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_condition: Option<Condition>,
    /// Condition on the openEHR side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openehr_condition: Option<Condition>,
    /// Hierarchy split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hierarchy: Option<Hierarchy>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `followedBy`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FollowedBy {
    /// Mappings relative to the parent mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mappings: Option<Vec<Mapping>>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `reference`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    /// The referenced FHIR resource type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    /// Mappings of the referenced resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mappings: Option<Vec<Mapping>>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One fixed value of a `manual` entry.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ManualEntry {
    /// Path on that side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A `manual[]` entry: fixed values per side.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Manual {
    /// Entry name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Values on the FHIR side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir: Option<Vec<ManualEntry>>,
    /// Values on the openEHR side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openehr: Option<Vec<ManualEntry>>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The direction of a `unidirectional` mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Direction {
    /// `openehr->fhir`.
    OpenEhrToFhir,
    /// `fhir->openehr`.
    FhirToOpenEhr,
}

impl Direction {
    /// Reads `openehr->fhir` / `fhir->openehr`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "openehr->fhir" => Some(Direction::OpenEhrToFhir),
            "fhir->openehr" => Some(Direction::FhirToOpenEhr),
            _ => None,
        }
    }
}

/// How an extension mapping is merged into the core model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtensionKind {
    /// `add`: a new mapping.
    Add,
    /// `append`: appended to the mapping named by `appendTo`.
    Append,
    /// `overwrite`: replaces the mapping named by `appendTo`.
    Overwrite,
}

impl ExtensionKind {
    /// Reads `add` / `append` / `overwrite`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "add" => Some(ExtensionKind::Add),
            "append" => Some(ExtensionKind::Append),
            "overwrite" => Some(ExtensionKind::Overwrite),
            _ => None,
        }
    }
}

/// One mapping of a model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mapping {
    /// Its name (unique within the model; `appendTo` refers to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The two sides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<With>,
    /// Applies only when the FHIR side matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_condition: Option<Condition>,
    /// Applies only when the openEHR side matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openehr_condition: Option<Condition>,
    /// Child mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub followed_by: Option<FollowedBy>,
    /// A referenced resource and its mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<Reference>,
    /// A model whose mappers are pulled in at this slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_archetype: Option<String>,
    /// Fixed values per side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<Vec<Manual>>,
    /// `openehr->fhir` or `fhir->openehr`; see [`Mapping::direction`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unidirectional: Option<String>,
    /// Extensions: `add`, `append` or `overwrite`; see [`Mapping::extension_kind`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
    /// Extensions: the core mapping appended to or overwritten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub append_to: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Mapping {
    /// The parsed `unidirectional`; `None` when absent or invalid.
    pub fn direction(&self) -> Option<Direction> {
        self.unidirectional.as_deref().and_then(Direction::parse)
    }

    /// The parsed `extension`; `None` when absent or invalid.
    pub fn extension_kind(&self) -> Option<ExtensionKind> {
        self.extension.as_deref().and_then(ExtensionKind::parse)
    }
}

/// A model (`type: model`) or extension (`type: extension`) document.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ModelDocument {
    /// `FHIRConnect/vX.Y.Z`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<String>,
    /// `model` or `extension`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name and version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// System, version, archetype, profile, `extends`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Spec>,
    /// Conditions and hierarchy applied before mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocessor: Option<Preprocessor>,
    /// Terminology settings (kept as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminology: Option<Value>,
    /// The mappings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mappings: Option<Vec<Mapping>>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

fn blank(s: &Option<String>) -> bool {
    s.as_deref().is_none_or(|s| s.trim().is_empty())
}

/// Most validation problems listed for one document; the rest are counted in one last entry.
/// Each problem is a path and a message of up to a few hundred bytes, from as little as 3 bytes
/// of text (`{},`), so listing them all made 1 MB of `{}` mappings hold 1.4 million of them; no
/// one reads past the first screenful anyway.
pub const MAX_FIELD_ERRORS: usize = 100;

/// The problems found so far: the first [`MAX_FIELD_ERRORS`] in full, and how many in all.
struct Errors(Vec<FieldError>, usize);

impl Errors {
    fn new() -> Self {
        Errors(Vec::new(), 0)
    }
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.1 += 1;
        if self.0.len() < MAX_FIELD_ERRORS {
            self.0.push(FieldError {
                path: path.into(),
                message: message.into(),
            });
        }
    }
    fn finish(mut self) -> std::result::Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            return Ok(());
        }
        let more = self.1 - self.0.len();
        if more > 0 {
            self.0.push(FieldError {
                path: "(more)".to_string(),
                message: format!("{more} more problems not listed (fix the ones above first)"),
            });
        }
        Err(self.0)
    }
}

impl ContextDocument {
    /// Checks the context; returns every problem found.
    pub fn validate(&self) -> std::result::Result<(), Vec<FieldError>> {
        let mut e = Errors::new();
        if let Some(k) = &self.kind {
            if k.trim() != "context" {
                e.push("type", format!("is {k:?}; a context has type: context"));
            }
        }
        let Some(c) = &self.context else {
            e.push("context", "is missing: a context document needs a context");
            return e.finish();
        };
        if blank(&c.template.as_ref().and_then(|t| t.id.clone())) {
            e.push(
                "context.template.id",
                "is missing: name the OPT this context maps",
            );
        }
        match &c.archetypes {
            None => e.push("context.archetypes", "is missing: list the models it uses"),
            Some(a) if a.is_empty() => {
                e.push("context.archetypes", "is empty: list the models it uses")
            }
            Some(a) => {
                for (i, name) in a.iter().enumerate() {
                    if name.trim().is_empty() {
                        e.push(format!("context.archetypes[{i}]"), "is empty");
                    }
                }
            }
        }
        if let Some(x) = &c.extensions {
            for (i, name) in x.iter().enumerate() {
                if name.trim().is_empty() {
                    e.push(format!("context.extensions[{i}]"), "is empty");
                }
            }
        }
        if blank(&c.start) {
            e.push(
                "context.start",
                "is missing: name the root model or archetype id",
            );
        }
        e.finish()
    }

    /// `context.template.id` as written.
    pub fn template_id(&self) -> Option<&str> {
        self.context.as_ref()?.template.as_ref()?.id.as_deref()
    }
}

impl ModelDocument {
    /// True for `type: extension`.
    pub fn is_extension(&self) -> bool {
        self.kind.as_deref().map(str::trim) == Some("extension")
    }

    /// `metadata.name`.
    pub fn name(&self) -> Option<&str> {
        self.metadata.as_ref()?.name.as_deref()
    }

    /// `spec.openEhrConfig.archetype`.
    pub fn archetype(&self) -> Option<&str> {
        self.spec
            .as_ref()?
            .open_ehr_config
            .as_ref()?
            .archetype
            .as_deref()
    }

    /// `spec.extends`.
    pub fn extends(&self) -> Option<&str> {
        self.spec.as_ref()?.extends.as_deref()
    }

    /// The mappings (empty when there are none).
    pub fn mappings(&self) -> &[Mapping] {
        self.mappings.as_deref().unwrap_or_default()
    }

    /// Checks the model or extension; returns every problem found.
    pub fn validate(&self) -> std::result::Result<(), Vec<FieldError>> {
        let mut e = Errors::new();
        let ext = self.is_extension();
        if let Some(k) = &self.kind {
            if !matches!(k.trim(), "model" | "extension") {
                e.push("type", format!("is {k:?}; expected model or extension"));
            }
        }
        if blank(&self.metadata.as_ref().and_then(|m| m.name.clone())) {
            e.push("metadata.name", "is missing: every model needs a name");
        }
        let spec = self.spec.as_ref();
        if ext {
            if blank(&spec.and_then(|s| s.extends.clone())) {
                e.push(
                    "spec.extends",
                    "is missing: an extension names the model it extends",
                );
            }
        } else if blank(&self.archetype().map(str::to_string)) {
            e.push(
                "spec.openEhrConfig.archetype",
                "is missing: a model names the archetype it maps",
            );
        }
        for (i, m) in self.mappings().iter().enumerate() {
            validate_mapping(m, &format!("mappings[{i}]"), ext, &mut e);
        }
        e.finish()
    }
}

fn validate_list(list: &Option<Vec<Mapping>>, at: &str, e: &mut Errors) {
    for (i, m) in list.iter().flatten().enumerate() {
        validate_mapping(m, &format!("{at}.mappings[{i}]"), false, e);
    }
}

fn validate_mapping(m: &Mapping, at: &str, top_level_extension: bool, e: &mut Errors) {
    if blank(&m.name) {
        e.push(
            format!("{at}.name"),
            "is missing: every mapping needs a name",
        );
    }
    match &m.with {
        None => e.push(
            format!("{at}.with"),
            "is missing: give with.fhir and/or with.openehr",
        ),
        Some(w) if blank(&w.fhir) && blank(&w.openehr) => e.push(
            format!("{at}.with"),
            "has neither fhir nor openehr: give at least one of them",
        ),
        Some(_) => {}
    }
    if let Some(u) = &m.unidirectional {
        if Direction::parse(u.trim()).is_none() {
            e.push(
                format!("{at}.unidirectional"),
                format!("is {u:?}; expected \"openehr->fhir\" or \"fhir->openehr\""),
            );
        }
    }
    if top_level_extension {
        match m.extension.as_deref().map(str::trim) {
            None | Some("") => e.push(
                format!("{at}.extension"),
                "is missing: an extension's mapping says add, append or overwrite",
            ),
            Some(x) => match ExtensionKind::parse(x) {
                None => e.push(
                    format!("{at}.extension"),
                    format!("is {x:?}; expected add, append or overwrite"),
                ),
                Some(ExtensionKind::Append | ExtensionKind::Overwrite) if blank(&m.append_to) => e
                    .push(
                        format!("{at}.appendTo"),
                        format!("is missing: extension: {x} names the core mapping it changes"),
                    ),
                Some(_) => {}
            },
        }
    }
    if let Some(f) = &m.followed_by {
        validate_list(&f.mappings, &format!("{at}.followedBy"), e);
    }
    if let Some(r) = &m.reference {
        validate_list(&r.mappings, &format!("{at}.reference"), e);
    }
}

fn read_value(text: &str, format: FcFormat) -> Result<Value> {
    let v: Value = match format {
        FcFormat::Json => serde_json::from_str(text)
            .map_err(|e| Error::invalid("malformed JSON", e.to_string()))?,
        FcFormat::Yaml => crate::domain::fhir_connect::read_yaml(text)
            .map_err(|e| Error::invalid("malformed YAML", e.to_string()))?,
    };
    if !v.is_object() {
        return Err(Error::invalid(
            "not a FHIR Connect document",
            "the document must be a mapping with grammar, type, metadata and spec",
        ));
    }
    Ok(v)
}

fn typed<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<T> {
    // serde_path_to_error names the field that has the wrong shape (`mappings[2].with`).
    serde_path_to_error::deserialize(v).map_err(|e| {
        Error::invalid(
            format!("invalid FHIR Connect {what}"),
            format!("the document does not match the FHIR Connect {what} schema: {e}"),
        )
    })
}

fn invalid(what: &str, errors: Vec<FieldError>) -> Error {
    Error::Invalid {
        message: format!("invalid FHIR Connect {what}"),
        details: errors.iter().map(FieldError::to_string).collect(),
    }
}

/// Parses and validates a context. Every validation problem is one `path: message` detail of
/// the [`Error::Invalid`].
pub fn parse_context(text: &str, format: FcFormat) -> Result<ContextDocument> {
    let doc: ContextDocument = typed(read_value(text, format)?, "context")?;
    doc.validate().map_err(|e| invalid("context", e))?;
    Ok(doc)
}

/// Parses and validates a model or extension. Every validation problem is one `path: message`
/// detail of the [`Error::Invalid`].
pub fn parse_model(text: &str, format: FcFormat) -> Result<ModelDocument> {
    let doc: ModelDocument = typed(read_value(text, format)?, "model")?;
    let what = if doc.is_extension() {
        "extension"
    } else {
        "model"
    };
    doc.validate().map_err(|e| invalid(what, e))?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_of_the_wrong_shape_is_named() {
        let e = parse_model(
            "type: model\nmetadata: {name: m}\nmappings: 5\n",
            FcFormat::Yaml,
        )
        .unwrap_err();
        assert!(format!("{e:?}").contains("mappings"), "{e:?}");
        let e = parse_model(
            "type: model\nmetadata: {name: m}\nmappings:\n  - name: a\n    with: x\n",
            FcFormat::Yaml,
        )
        .unwrap_err();
        assert!(format!("{e:?}").contains("mappings[0].with"), "{e:?}");
    }

    #[test]
    fn nested_errors_are_all_reported() {
        let yaml = "type: model\nmetadata: {name: m}\nspec: {openEhrConfig: {archetype: a}}\nmappings:\n  - name: x\n    with: {fhir: f}\n    followedBy:\n      mappings:\n        - with: {}\n          unidirectional: both\n";
        let e = parse_model(yaml, FcFormat::Yaml).unwrap_err();
        let Error::Invalid { details, .. } = e else {
            panic!()
        };
        assert_eq!(details.len(), 3, "{details:?}");
        assert!(details[0].starts_with("mappings[0].followedBy.mappings[0].name:"));
        assert!(details[1].starts_with("mappings[0].followedBy.mappings[0].with:"));
        assert!(details[2].starts_with("mappings[0].followedBy.mappings[0].unidirectional:"));
    }

    #[test]
    fn resource_type_is_the_last_segment() {
        let f = FhirConfig {
            structure_definition: Some(
                "http://hl7.org/fhir/StructureDefinition/Observation".into(),
            ),
            ..Default::default()
        };
        assert_eq!(f.resource_type(), Some("Observation"));
    }
}
