//! Typed FHIR Connect documents: contexts ([`ContextDocument`]) and models or extensions
//! ([`ModelDocument`]), and the upload rules, which are openFHIR's.
//!
//! # What is accepted
//! openFHIR reads an upload into its typed model and checks that against its JSON schemas
//! (`contextual-mapping.schema.json`, `model-mapping.schema.json`); nothing else refuses a file at
//! upload. [`ContextDocument::validate`] and [`ModelDocument::validate`] are those rules, written
//! out once here:
//! * scalars are read the way openFHIR's reader reads them: a number or a boolean where text is
//!   expected is that text (`version: 1.0`), `null` is absent;
//! * the enumerations openFHIR's reader knows are compared exactly as it compares them, case
//!   included: `type` (`context`, `model`, `extension`), `spec.system` (`FHIR`), `spec.version`
//!   (`R4`, `R4B`, `R5`, `STU3`) and a mapping's `extension` (`add`, `append`, `overwrite`);
//! * the schemas' required fields and patterns: `grammar` (`FHIRConnect/vX.Y.Z`), `metadata.name`
//!   and `.version`, `spec.system` and `.version`, a context's `profile`, `template`, `archetypes`
//!   and `start`, a mapping's `name`, a condition's `targetRoot` and `operator` (an openEHR
//!   condition also `targetAttribute` or `targetAttributes`), `followedBy.mappings`,
//!   `reference.resourceType` and `.mappings`, `openEhrConfig.archetype` and
//!   `fhirConfig.structureDefinition` (a URI) when those objects are given.
//!
//! Everything else is accepted: `with` may be absent (an extension's `append` has none), an
//! `overwrite` needs no `appendTo` (openFHIR overwrites the mapping of the same name), and
//! `unidirectional` is any text (the engine compares it case-insensitively, see
//! [`Direction::parse`]). Unlike openFHIR's YAML reader, unknown fields are not refused: every
//! struct keeps them in `extra`, so a document read and written back loses nothing.

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

/// Scalars read the way openFHIR's (Jackson's) reader reads them into text fields.
mod lenient {
    use serde::de::{Deserialize, Deserializer, Error};
    use serde_json::Value;

    fn what(v: &Value) -> &'static str {
        match v {
            Value::Array(_) => "a list",
            Value::Object(_) => "a mapping",
            _ => "a scalar",
        }
    }

    fn text(v: Value) -> Result<Option<String>, String> {
        match v {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            Value::Number(n) => Ok(Some(n.to_string())),
            Value::Bool(b) => Ok(Some(b.to_string())),
            other => Err(format!("expected text, found {}", what(&other))),
        }
    }

    /// Text; a number or boolean is its text, `null` is absent.
    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        text(Value::deserialize(d)?).map_err(D::Error::custom)
    }

    /// A list of text values (each read as [`string`]); `null` is absent.
    pub fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match text(v) {
                    Ok(Some(s)) => Ok(s),
                    // openFHIR keeps a null list item; it names nothing, so it reads as empty.
                    Ok(None) => Ok(String::new()),
                    Err(e) => Err(D::Error::custom(format!("item {i}: {e}"))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            other => Err(D::Error::custom(format!(
                "expected a list of text values, found {}",
                what(&other)
            ))),
        }
    }
}

/// `metadata`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Metadata {
    /// The document's name; a model's key (`OBSERVATION.height.v2`).
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<String>,
    /// The document's own version.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub version: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `spec.openEhrConfig`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct OpenEhrConfig {
    /// Full archetype id (`openEHR-EHR-OBSERVATION.height.v2`).
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
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
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
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
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub system: Option<String>,
    /// `R4`, `R4B`, `R5` or `STU3`.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub version: Option<String>,
    /// Model: the archetype it maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_ehr_config: Option<OpenEhrConfig>,
    /// Model: the FHIR profile it maps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_config: Option<FhirConfig>,
    /// Extension: the `metadata.name` of the model it extends.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub extends: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `context.profile`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Profile {
    /// The FHIR profile URL that selects this context.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub url: Option<String>,
    /// Profile version.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub version: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `context.template`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TemplateRef {
    /// The raw template id (`Growth chart`).
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<String>,
    /// The template's semantic version.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
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
    #[serde(
        default,
        deserialize_with = "lenient::strings",
        skip_serializing_if = "Option::is_none"
    )]
    pub archetypes: Option<Vec<String>>,
    /// Model names of extensions.
    #[serde(
        default,
        deserialize_with = "lenient::strings",
        skip_serializing_if = "Option::is_none"
    )]
    pub extensions: Option<Vec<String>>,
    /// The root model name or archetype id.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub start: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A context document (`type: context`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ContextDocument {
    /// `FHIRConnect/vX.Y.Z`.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub grammar: Option<String>,
    /// `context`.
    #[serde(
        default,
        rename = "type",
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
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
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub fhir: Option<String>,
    /// openEHR path (`$archetype/...`, `$composition/...`, `$reference/...`).
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub openehr: Option<String>,
    /// Data type hint.
    #[serde(
        default,
        rename = "type",
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub kind: Option<String>,
    /// A fixed value.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `fhirCondition` / `openehrCondition`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Where the condition is evaluated.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub target_root: Option<String>,
    /// The attribute tested.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub target_attribute: Option<String>,
    /// Several attributes tested.
    #[serde(
        default,
        deserialize_with = "lenient::strings",
        skip_serializing_if = "Option::is_none"
    )]
    pub target_attributes: Option<Vec<String>>,
    /// `one of`, `not of`, `type`, ...
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub operator: Option<String>,
    /// What the attribute is compared with.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub criteria: Option<String>,
    /// Several values compared with.
    #[serde(
        default,
        deserialize_with = "lenient::strings",
        skip_serializing_if = "Option::is_none"
    )]
    pub criterias: Option<Vec<String>>,
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
    /// Several conditions on the FHIR side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_conditions: Option<Vec<Condition>>,
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
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
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
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub path: Option<String>,
    /// The value.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A `manual[]` entry: fixed values per side.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manual {
    /// Entry name.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<String>,
    /// Values on the FHIR side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir: Option<Vec<ManualEntry>>,
    /// Values on the openEHR side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openehr: Option<Vec<ManualEntry>>,
    /// Condition on the FHIR side under which the values apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_condition: Option<Condition>,
    /// Condition on the openEHR side under which the values apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openehr_condition: Option<Condition>,
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
    /// Reads `openehr->fhir` / `fhir->openehr`, ignoring case (`openEHR->fhir`), as openFHIR's
    /// engine compares them. Any other text restricts nothing: the engine maps such a mapping in
    /// both directions, and so reads `None` here.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("openehr->fhir") {
            Some(Direction::OpenEhrToFhir)
        } else if s.eq_ignore_ascii_case("fhir->openehr") {
            Some(Direction::FhirToOpenEhr)
        } else {
            None
        }
    }
}

/// How an extension mapping is merged into the core model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtensionKind {
    /// `add`: a new mapping.
    Add,
    /// `append`: conditions and `followedBy` mappings added to the mapping `appendTo` names.
    Append,
    /// `overwrite`: replaces the core mapping of the same name.
    Overwrite,
}

impl ExtensionKind {
    /// Every kind's name, as written in a document.
    pub const NAMES: [&'static str; 3] = ["add", "append", "overwrite"];

    /// Reads `add` / `append` / `overwrite`, exactly (openFHIR's reader is case-sensitive here).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "add" => Some(ExtensionKind::Add),
            "append" => Some(ExtensionKind::Append),
            "overwrite" => Some(ExtensionKind::Overwrite),
            _ => None,
        }
    }

    /// The name as written in a document.
    pub fn as_str(self) -> &'static str {
        match self {
            ExtensionKind::Add => "add",
            ExtensionKind::Append => "append",
            ExtensionKind::Overwrite => "overwrite",
        }
    }
}

/// One mapping of a model.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mapping {
    /// Its name (`appendTo` and an `overwrite` refer to it).
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
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
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub slot_archetype: Option<String>,
    /// Fixed values per side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual: Option<Vec<Manual>>,
    /// `openehr->fhir` or `fhir->openehr`, any case; see [`Mapping::direction`].
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub unidirectional: Option<String>,
    /// Extensions: `add`, `append` or `overwrite`; see [`Mapping::extension_kind`].
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub extension: Option<String>,
    /// Extensions: the core mapping an `append` adds to (`name`, or `name.child` for a mapping
    /// inside `followedBy`).
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub append_to: Option<String>,
    /// Unknown fields.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Mapping {
    /// The parsed `unidirectional`; `None` when absent or not a direction.
    pub fn direction(&self) -> Option<Direction> {
        self.unidirectional.as_deref().and_then(Direction::parse)
    }

    /// The parsed `extension`; `None` when absent (uploads refuse any other value).
    pub fn extension_kind(&self) -> Option<ExtensionKind> {
        self.extension.as_deref().and_then(ExtensionKind::parse)
    }
}

/// A model (`type: model`) or extension (`type: extension`) document.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ModelDocument {
    /// `FHIRConnect/vX.Y.Z`.
    #[serde(
        default,
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
    pub grammar: Option<String>,
    /// `model` or `extension`.
    #[serde(
        default,
        rename = "type",
        deserialize_with = "lenient::string",
        skip_serializing_if = "Option::is_none"
    )]
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
    /// A required field: present (any value, empty text included, as the schemas read it).
    fn require<T>(&mut self, v: &Option<T>, path: &str, why: &str) {
        if v.is_none() {
            self.push(path, format!("is missing: {why}"));
        }
    }
    /// An enumeration openFHIR's reader compares exactly.
    fn one_of(&mut self, v: &Option<String>, path: &str, allowed: &[&str]) {
        match v {
            None => self.push(
                path,
                format!("is missing: expected one of {}", list(allowed)),
            ),
            Some(s) if !allowed.contains(&s.as_str()) => self.push(
                path,
                format!(
                    "is {s:?}; expected one of {} (exactly, case included)",
                    list(allowed)
                ),
            ),
            Some(_) => {}
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

fn list(allowed: &[&str]) -> String {
    allowed
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The FHIR versions a document's `spec.version` may name.
pub const FHIR_VERSIONS: [&str; 4] = ["R4", "R4B", "R5", "STU3"];

/// `grammar`: `FHIRConnect/v` and a three-part version number.
fn grammar_ok(g: &str) -> bool {
    let Some(v) = g.strip_prefix("FHIRConnect/v") else {
        return false;
    };
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A URI reference as `java.net.URI` accepts one (the schema's `format: uri`): no whitespace,
/// control characters or `<>"{}|\^\``, and every `%` followed by two hex digits.
fn uri_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
                continue;
            }
            c if c <= b' ' || c == 0x7f => return false,
            b'<' | b'>' | b'"' | b'{' | b'}' | b'|' | b'\\' | b'^' | b'`' => return false,
            _ => {}
        }
        i += 1;
    }
    true
}

/// The fields every document has: `grammar`, `metadata`, `spec.system` and `spec.version`.
fn validate_common(
    grammar: &Option<String>,
    metadata: &Option<Metadata>,
    spec: &Option<Spec>,
    e: &mut Errors,
) {
    match grammar {
        None => e.push("grammar", "is missing: expected FHIRConnect/vX.Y.Z"),
        Some(g) if !grammar_ok(g) => e.push(
            "grammar",
            format!("is {g:?}; expected FHIRConnect/v followed by a version such as 1.0.0"),
        ),
        Some(_) => {}
    }
    match metadata {
        None => e.push(
            "metadata",
            "is missing: give metadata.name and metadata.version",
        ),
        Some(m) => {
            e.require(&m.name, "metadata.name", "every document needs a name");
            e.require(
                &m.version,
                "metadata.version",
                "every document needs a version",
            );
        }
    }
    match spec {
        None => e.push(
            "spec",
            "is missing: give spec.system (FHIR) and spec.version",
        ),
        Some(s) => {
            e.one_of(&s.system, "spec.system", &["FHIR"]);
            e.one_of(&s.version, "spec.version", &FHIR_VERSIONS);
        }
    }
}

impl ContextDocument {
    /// Checks the context against openFHIR's rules (see the [module docs](self)); returns every
    /// problem found.
    pub fn validate(&self) -> std::result::Result<(), Vec<FieldError>> {
        let mut e = Errors::new();
        validate_common(&self.grammar, &self.metadata, &self.spec, &mut e);
        e.one_of(&self.kind, "type", &["context"]);
        match &self.context {
            None => e.push("context", "is missing: a context document needs a context"),
            Some(c) => {
                e.require(&c.profile, "context.profile", "name the FHIR profile");
                e.require(
                    &c.template,
                    "context.template",
                    "name the OPT this context maps",
                );
                e.require(
                    &c.archetypes,
                    "context.archetypes",
                    "list the models it uses",
                );
                e.require(
                    &c.start,
                    "context.start",
                    "name the root model or archetype id",
                );
            }
        }
        e.finish()
    }

    /// `context.template.id` as written.
    pub fn template_id(&self) -> Option<&str> {
        self.context.as_ref()?.template.as_ref()?.id.as_deref()
    }

    /// `context.archetypes` (empty when absent).
    pub fn archetypes(&self) -> &[String] {
        self.context
            .as_ref()
            .and_then(|c| c.archetypes.as_deref())
            .unwrap_or_default()
    }

    /// `context.extensions` (empty when absent).
    pub fn extensions(&self) -> &[String] {
        self.context
            .as_ref()
            .and_then(|c| c.extensions.as_deref())
            .unwrap_or_default()
    }
}

impl ModelDocument {
    /// True for `type: extension`.
    pub fn is_extension(&self) -> bool {
        self.kind.as_deref() == Some("extension")
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

    /// Checks the model or extension against openFHIR's rules (see the [module docs](self));
    /// returns every problem found.
    pub fn validate(&self) -> std::result::Result<(), Vec<FieldError>> {
        let mut e = Errors::new();
        validate_common(&self.grammar, &self.metadata, &self.spec, &mut e);
        e.one_of(&self.kind, "type", &["model", "extension"]);
        if let Some(spec) = &self.spec {
            if let Some(o) = &spec.open_ehr_config {
                e.require(
                    &o.archetype,
                    "spec.openEhrConfig.archetype",
                    "name the archetype the model maps",
                );
            }
            if let Some(f) = &spec.fhir_config {
                match &f.structure_definition {
                    None => e.push(
                        "spec.fhirConfig.structureDefinition",
                        "is missing: name the FHIR profile the model maps",
                    ),
                    Some(sd) if !uri_ok(sd) => e.push(
                        "spec.fhirConfig.structureDefinition",
                        format!("is {sd:?}, not a URI"),
                    ),
                    Some(_) => {}
                }
            }
        }
        if let Some(p) = &self.preprocessor {
            if let Some(c) = &p.fhir_condition {
                validate_condition(c, "preprocessor.fhirCondition", false, &mut e);
            }
            if let Some(c) = &p.openehr_condition {
                validate_condition(c, "preprocessor.openehrCondition", true, &mut e);
            }
        }
        for (i, m) in self.mappings().iter().enumerate() {
            validate_mapping(m, &format!("mappings[{i}]"), &mut e);
        }
        e.finish()
    }
}

fn validate_condition(c: &Condition, at: &str, openehr: bool, e: &mut Errors) {
    e.require(
        &c.target_root,
        &format!("{at}.targetRoot"),
        "say where it is evaluated",
    );
    e.require(
        &c.operator,
        &format!("{at}.operator"),
        "say how it compares",
    );
    if openehr && c.target_attribute.is_none() && c.target_attributes.is_none() {
        e.push(
            format!("{at}.targetAttribute"),
            "is missing: give targetAttribute or targetAttributes",
        );
    }
}

fn validate_mapping(m: &Mapping, at: &str, e: &mut Errors) {
    e.require(&m.name, &format!("{at}.name"), "every mapping needs a name");
    if let Some(x) = &m.extension {
        if ExtensionKind::parse(x).is_none() {
            e.push(
                format!("{at}.extension"),
                format!(
                    "is {x:?}; expected one of {} (exactly, case included)",
                    list(&ExtensionKind::NAMES)
                ),
            );
        }
    }
    if let Some(c) = &m.fhir_condition {
        validate_condition(c, &format!("{at}.fhirCondition"), false, e);
    }
    if let Some(c) = &m.openehr_condition {
        validate_condition(c, &format!("{at}.openehrCondition"), true, e);
    }
    if let Some(f) = &m.followed_by {
        let at = format!("{at}.followedBy");
        match &f.mappings {
            None => e.push(
                format!("{at}.mappings"),
                "is missing: list the child mappings",
            ),
            Some(list) => validate_list(list, &at, e),
        }
    }
    if let Some(r) = &m.reference {
        let at = format!("{at}.reference");
        e.require(
            &r.resource_type,
            &format!("{at}.resourceType"),
            "name the referenced resource type",
        );
        match &r.mappings {
            None => e.push(
                format!("{at}.mappings"),
                "is missing: list the mappings of the reference",
            ),
            Some(list) => validate_list(list, &at, e),
        }
    }
}

fn validate_list(list: &[Mapping], at: &str, e: &mut Errors) {
    for (i, m) in list.iter().enumerate() {
        validate_mapping(m, &format!("{at}.mappings[{i}]"), e);
    }
}

/// Reads a document's text as a JSON value (YAML through [`read_yaml`]).
///
/// [`read_yaml`]: crate::domain::fhir_connect::read_yaml
pub(crate) fn read_value(text: &str, format: FcFormat) -> Result<Value> {
    let v: Value = match format {
        FcFormat::Json => serde_json::from_str(text)
            .map_err(|e| Error::invalid("malformed JSON", format!("malformed JSON: {e}")))?,
        FcFormat::Yaml => crate::domain::fhir_connect::read_yaml(text)
            .map_err(|e| Error::invalid("malformed YAML", format!("malformed YAML: {e}")))?,
    };
    if !v.is_object() {
        return Err(Error::invalid(
            "not a FHIR Connect document",
            "the document must be a mapping with grammar, type, metadata and spec",
        ));
    }
    Ok(v)
}

/// The typed document of a JSON value, without the upload rules (stored documents were checked
/// when they were uploaded).
pub fn typed<T: serde::de::DeserializeOwned>(v: &Value, what: &str) -> Result<T> {
    // serde_path_to_error names the field that has the wrong shape (`mappings[2].with`).
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        Error::invalid(
            format!("invalid FHIR Connect {what}"),
            format!("{path}: {}", e.into_inner()),
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
    let doc: ContextDocument = typed(&read_value(text, format)?, "context")?;
    doc.validate().map_err(|e| invalid("context", e))?;
    Ok(doc)
}

/// Parses and validates a model or extension. Every validation problem is one `path: message`
/// detail of the [`Error::Invalid`].
pub fn parse_model(text: &str, format: FcFormat) -> Result<ModelDocument> {
    let doc: ModelDocument = typed(&read_value(text, format)?, "model")?;
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

    const HEAD: &str = "grammar: FHIRConnect/v1.0.0\nmetadata: {name: m, version: 0.0.1}\nspec: {system: FHIR, version: R4}\n";

    fn model(rest: &str) -> Result<ModelDocument> {
        parse_model(&format!("{HEAD}type: model\n{rest}"), FcFormat::Yaml)
    }

    fn details(e: Error) -> Vec<String> {
        match e {
            Error::Invalid { details, .. } => details,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_field_of_the_wrong_shape_is_named() {
        let e = model("mappings: 5\n").unwrap_err();
        assert!(format!("{e:?}").contains("mappings"), "{e:?}");
        let e = model("mappings:\n  - name: a\n    with: x\n").unwrap_err();
        assert!(format!("{e:?}").contains("mappings[0].with"), "{e:?}");
    }

    #[test]
    fn nested_errors_are_all_reported() {
        let yaml = "spec: {system: FHIR, version: R4, openEhrConfig: {archetype: a}}\nmappings:\n  - name: x\n    with: {fhir: f}\n    followedBy:\n      mappings:\n        - with: {}\n          extension: Add\n          fhirCondition: {targetRoot: r}\n";
        let d = details(
            parse_model(
                &format!("grammar: FHIRConnect/v1.0.0\ntype: model\nmetadata: {{name: m, version: '1'}}\n{yaml}"),
                FcFormat::Yaml,
            )
            .unwrap_err(),
        );
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("mappings[0].followedBy.mappings[0].name:"));
        assert!(d[1].starts_with("mappings[0].followedBy.mappings[0].extension:"));
        assert!(d[2].starts_with("mappings[0].followedBy.mappings[0].fhirCondition.operator:"));
    }

    #[test]
    fn what_openfhir_accepts_is_accepted() {
        // Directions in any case, and text that is no direction at all.
        for u in ["openEHR->fhir", "fhir->openEHR", "OPENEHR->FHIR", "both"] {
            model(&format!(
                "mappings:\n  - name: a\n    with: {{fhir: f}}\n    unidirectional: {u}\n"
            ))
            .unwrap();
        }
        // An overwrite without appendTo; an append and a followedBy mapping without `with`.
        let ext = "grammar: FHIRConnect/v1.0.0\ntype: extension\nmetadata: {name: e, version: 1}\nspec: {system: FHIR, version: R4, extends: m}\nmappings:\n  - name: code\n    extension: overwrite\n    with: {fhir: f}\n  - name: more\n    extension: append\n    appendTo: code\n    followedBy:\n      mappings:\n        - name: child\n          manual: []\n";
        parse_model(ext, FcFormat::Yaml).unwrap();
        // Numbers where text is expected, empty names, no mappings at all.
        parse_model(
            "grammar: FHIRConnect/v0.0.1\ntype: model\nmetadata: {name: '', version: 1.0}\nspec: {system: FHIR, version: STU3}\n",
            FcFormat::Yaml,
        )
        .unwrap();
    }

    #[test]
    fn what_openfhir_refuses_is_refused() {
        let d = details(parse_model("type: Model\n", FcFormat::Yaml).unwrap_err());
        let joined = d.join("\n");
        for field in ["grammar:", "metadata:", "spec:", "type:"] {
            assert!(joined.contains(field), "{field} in {joined}");
        }
        let d = details(
            parse_model(
                "grammar: FHIRConnect/1.0\ntype: model\nmetadata: {name: m}\nspec: {system: fhir, version: r4, fhirConfig: {structureDefinition: 'not a uri'}}\n",
                FcFormat::Yaml,
            )
            .unwrap_err(),
        );
        assert_eq!(d.len(), 5, "{d:?}");
        let d = details(
            model("mappings:\n  - name: a\n    openehrCondition: {targetRoot: r, operator: one of}\n    reference: {mappings: []}\n    followedBy: {}\n")
                .unwrap_err(),
        );
        assert_eq!(
            d,
            [
                "mappings[0].openehrCondition.targetAttribute: is missing: give targetAttribute or targetAttributes",
                "mappings[0].followedBy.mappings: is missing: list the child mappings",
                "mappings[0].reference.resourceType: is missing: name the referenced resource type",
            ]
        );
    }

    #[test]
    fn directions_and_kinds() {
        assert_eq!(
            Direction::parse("openEHR->FHIR"),
            Some(Direction::OpenEhrToFhir)
        );
        assert_eq!(
            Direction::parse(" fhir->openehr "),
            Some(Direction::FhirToOpenEhr)
        );
        assert_eq!(Direction::parse("both"), None);
        assert_eq!(
            ExtensionKind::parse("overwrite"),
            Some(ExtensionKind::Overwrite)
        );
        assert_eq!(ExtensionKind::parse("Overwrite"), None);
    }

    #[test]
    fn grammar_and_uri_rules() {
        assert!(grammar_ok("FHIRConnect/v1.0.0"));
        assert!(grammar_ok("FHIRConnect/v10.20.300"));
        for bad in [
            "FHIRConnect/1.0.0",
            "FHIRConnect/v1.0",
            "fhirconnect/v1.0.0",
            "FHIRConnect/v1.0.0a",
        ] {
            assert!(!grammar_ok(bad), "{bad}");
        }
        assert!(uri_ok(
            "http://hl7.org/fhir/StructureDefinition/Observation"
        ));
        assert!(uri_ok("urn:oid:1.2.3"));
        assert!(uri_ok("a%20b"));
        for bad in ["a b", "a%2", "a%zz", "<x>", "a\"b"] {
            assert!(!uri_ok(bad), "{bad}");
        }
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
