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
//!
//! # Layout
//! * this module: the parts every document has ([`Metadata`], [`Spec`]), and parsing
//!   ([`parse_context`], [`parse_model`], [`typed`]).
//! * `context`: [`ContextDocument`] and its parts.
//! * `model`: [`ModelDocument`], its [`Mapping`]s and their parts.
//! * `rules`: the upload rules, [`ContextDocument::validate`] and [`ModelDocument::validate`].
//! * `lenient`: the scalar readers that take a number or boolean as text.

mod context;
mod lenient;
mod model;
mod rules;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::fhir_connect::FcFormat;
use crate::error::{Error, Result};

pub use context::{Context, ContextDocument, Profile, TemplateRef};
pub use model::{
    Condition, Direction, ExtensionKind, FollowedBy, Hierarchy, Manual, ManualEntry, Mapping,
    ModelDocument, Preprocessor, Reference, With,
};
pub use rules::{FieldError, FHIR_VERSIONS, MAX_FIELD_ERRORS};

/// Unknown fields of a struct, kept for the round trip.
pub type Extra = Map<String, Value>;

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

    pub(super) fn model(rest: &str) -> Result<ModelDocument> {
        parse_model(&format!("{HEAD}type: model\n{rest}"), FcFormat::Yaml)
    }

    pub(super) fn details(e: Error) -> Vec<String> {
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
