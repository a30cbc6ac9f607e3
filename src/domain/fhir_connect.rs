//! FHIR Connect context and model documents (YAML or JSON).

use std::sync::Arc;

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{Error, Result};

/// The format a FHIR Connect document was uploaded in; the text is kept byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FcFormat {
    /// YAML (`application/yaml`, `application/x-yaml`, `text/yaml`).
    Yaml,
    /// JSON (`application/json`).
    Json,
}

impl FcFormat {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            FcFormat::Yaml => "yaml",
            FcFormat::Json => "json",
        }
    }
    /// Reads the stored name.
    pub fn from_db(s: &str) -> Option<Self> {
        match s {
            "yaml" => Some(FcFormat::Yaml),
            "json" => Some(FcFormat::Json),
            _ => None,
        }
    }
}

/// Which kind of FHIR Connect document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FcKind {
    /// `type: context`, one per template.
    Context,
    /// `type: model`.
    Model,
    /// `type: extension`.
    Extension,
}

impl FcKind {
    /// The `type:` value.
    pub fn as_str(self) -> &'static str {
        match self {
            FcKind::Context => "context",
            FcKind::Model => "model",
            FcKind::Extension => "extension",
        }
    }
}

/// A validated FHIR Connect document, with the fields the store indexes.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedFc {
    /// Context, model or extension.
    pub kind: FcKind,
    /// The key: the normalized template id for a context, `metadata.name` for a model.
    pub key: String,
    /// Context: `context.template.id` as written. Model: `metadata.name`.
    pub display_id: String,
    /// Model: `spec.openEhrConfig.archetype`.
    pub archetype: Option<String>,
    /// Extension: `spec.extends`.
    pub extends: Option<String>,
    /// The whole document as JSON (unknown fields kept).
    pub json: serde_json::Value,
}

/// Describes a required string field that is absent or not a non-empty string.
fn missing(v: &serde_json::Value, path: &[&str], why: &str) -> String {
    let dotted = path.join(".");
    let mut node = v;
    for p in path {
        match node.get(p) {
            Some(n) => node = n,
            None => return format!("{dotted} is missing: {why}"),
        }
    }
    match node {
        serde_json::Value::String(_) => format!("{dotted} is empty: {why}"),
        other => format!("{dotted} must be a string, not {other}: {why}"),
    }
}

fn str_at<'a>(v: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    let mut node = v;
    for p in path {
        node = node.get(p)?;
    }
    node.as_str().map(str::trim).filter(|s| !s.is_empty())
}

/// Parses and validates a FHIR Connect document uploaded to `/fc/context` (`expect` = Context)
/// or `/fc/model` (`expect` = Model; extensions are accepted there too).
pub fn parse_fc(body: &[u8], format: FcFormat, expect: FcKind) -> Result<ParsedFc> {
    let text = std::str::from_utf8(body)
        .map_err(|e| Error::invalid("document is not UTF-8", e.to_string()))?;
    let json: serde_json::Value = match format {
        FcFormat::Json => serde_json::from_str(text)
            .map_err(|e| Error::invalid("malformed JSON", e.to_string()))?,
        FcFormat::Yaml => serde_norway::from_str(text)
            .map_err(|e| Error::invalid("malformed YAML", e.to_string()))?,
    };
    if text.contains('\0') {
        return Err(Error::invalid(
            "invalid document",
            "the document contains a NUL byte",
        ));
    }
    crate::domain::reject_nul("document", &json)?;
    if !json.is_object() {
        return Err(Error::invalid(
            "not a FHIR Connect document",
            "the document must be a mapping with grammar, type, metadata and spec",
        ));
    }
    let declared = json
        .get("type")
        .map(|t| t.as_str().unwrap_or("").trim().to_string());
    let kind = match (expect, declared.as_deref()) {
        (FcKind::Context, None | Some("context")) => FcKind::Context,
        (FcKind::Model | FcKind::Extension, None | Some("model")) => FcKind::Model,
        (FcKind::Model | FcKind::Extension, Some("extension")) => FcKind::Extension,
        (_, Some(other)) => {
            let allowed = if expect == FcKind::Context {
                "context"
            } else {
                "model or extension"
            };
            return Err(Error::invalid(
                "wrong document type",
                format!("type: {other:?} cannot be uploaded here; expected {allowed}"),
            ));
        }
    };
    let mut details = Vec::new();
    let (key, display_id) = match kind {
        FcKind::Context => match str_at(&json, &["context", "template", "id"]) {
            Some(id) => (crate::domain::normalize_template_id(id), id.to_string()),
            None => {
                details.push(missing(
                    &json,
                    &["context", "template", "id"],
                    "name the OPT this context maps",
                ));
                (String::new(), String::new())
            }
        },
        FcKind::Model | FcKind::Extension => match str_at(&json, &["metadata", "name"]) {
            Some(name) => (name.to_string(), name.to_string()),
            None => {
                details.push(missing(
                    &json,
                    &["metadata", "name"],
                    "every model needs a name",
                ));
                (String::new(), String::new())
            }
        },
    };
    let extends = str_at(&json, &["spec", "extends"]).map(str::to_string);
    if kind == FcKind::Extension && extends.is_none() {
        details
            .push("spec.extends is missing: an extension names the model it extends".to_string());
    }
    if !details.is_empty() {
        return Err(Error::Invalid {
            message: format!("invalid FHIR Connect {}", kind.as_str()),
            details,
        });
    }
    let what = if kind == FcKind::Context {
        "template id"
    } else {
        "model name"
    };
    crate::domain::validate_artifact_id(what, &key)?;
    Ok(ParsedFc {
        kind,
        key,
        display_id,
        archetype: str_at(&json, &["spec", "openEhrConfig", "archetype"]).map(str::to_string),
        extends,
        json,
    })
}

/// A stored FHIR Connect document. Shared and immutable.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FcDocument {
    /// Tenant id.
    pub tenant: String,
    /// Context, model or extension.
    pub kind: FcKind,
    /// The key (normalized template id, or model name).
    pub id: String,
    /// Context: the template id as written; model: its name.
    pub display_id: String,
    /// Model: its archetype.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archetype: Option<String>,
    /// Extension: the model it extends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// Upload format.
    pub format: FcFormat,
    /// The text exactly as uploaded.
    #[serde(skip)]
    pub content: Arc<str>,
    /// The document as JSON.
    #[serde(skip)]
    pub json: Arc<serde_json::Value>,
    /// Created.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// Last replaced.
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTEXT: &str = "grammar: FHIRConnect/v1.0.0\ntype: context\nmetadata:\n  name: growth\n  version: 0.0.1\nspec:\n  system: FHIR\n  version: R4\ncontext:\n  profile:\n    url: http://hl7.org/fhir/StructureDefinition/Observation\n  template:\n    id: Growth chart\n  archetypes:\n    - OBSERVATION.height.v2\n  start: OBSERVATION.height.v2\n  x-custom: kept\n";

    #[test]
    fn context_is_keyed_by_normalized_template_id() {
        let p = parse_fc(CONTEXT.as_bytes(), FcFormat::Yaml, FcKind::Context).unwrap();
        assert_eq!(
            (p.kind, p.key.as_str(), p.display_id.as_str()),
            (FcKind::Context, "growth_chart", "Growth chart")
        );
        assert_eq!(p.json["context"]["x-custom"], "kept");
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse_fc(
            b"type: context\ncontext: {}\n",
            FcFormat::Yaml,
            FcKind::Context,
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::Invalid { details, .. } if details[0].contains("context.template.id"))
        );
        let e = parse_fc(
            b"type: model\nmetadata: {}\n",
            FcFormat::Yaml,
            FcKind::Model,
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::Invalid { details, .. } if details[0].contains("metadata.name"))
        );
        let e = parse_fc(b"type: context\n", FcFormat::Yaml, FcKind::Model).unwrap_err();
        assert!(e.to_string().contains("wrong document type"));
        assert!(parse_fc(b"a: [", FcFormat::Yaml, FcKind::Model).is_err());
        assert!(parse_fc(b"{", FcFormat::Json, FcKind::Model).is_err());
        assert!(parse_fc(b"- 1\n- 2\n", FcFormat::Yaml, FcKind::Model).is_err());
        let ext = parse_fc(
            b"type: extension\nmetadata: {name: x}\n",
            FcFormat::Yaml,
            FcKind::Model,
        )
        .unwrap_err();
        assert!(ext.to_string().contains("invalid FHIR Connect extension"));
    }
}
