//! The model and extension documents (`type: model`, `type: extension`), their mappings and the
//! mappings' parts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{lenient, Extra, Metadata, Spec};

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
