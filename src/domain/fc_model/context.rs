//! The context document (`type: context`) and its parts.

use serde::{Deserialize, Serialize};

use super::{lenient, Extra, Metadata, Spec};

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

impl ContextDocument {
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
