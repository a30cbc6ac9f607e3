//! FHIR Connect context and model documents (YAML or JSON).

use std::sync::Arc;

use serde::Serialize;
use time::OffsetDateTime;

use crate::domain::yaml_scan::{scan_flow_depth, ScanError, MAX_FLOW_DEPTH};
use crate::error::{Error, Result};
use crate::rendered::Rendered;

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

/// Parses and validates a FHIR Connect document uploaded to `/fc/context` (`expect` = Context)
/// or `/fc/model` (`expect` = Model; extensions are accepted there too), by openFHIR's rules
/// ([`crate::domain::fc_model`]).
pub fn parse_fc(body: &[u8], format: FcFormat, expect: FcKind) -> Result<ParsedFc> {
    use crate::domain::fc_model::{read_value, typed, ContextDocument, ModelDocument};
    let text = std::str::from_utf8(body).map_err(|e| {
        Error::invalid(
            "document is not UTF-8",
            format!("document is not UTF-8: {e}"),
        )
    })?;
    if text.contains('\0') {
        return Err(Error::invalid(
            "invalid document",
            "the document contains a NUL byte",
        ));
    }
    let json = read_value(text, format)?;
    crate::domain::reject_nul("document", &json)?;
    let invalid = |what: &str, errors: Vec<crate::domain::fc_model::FieldError>| Error::Invalid {
        message: format!("invalid FHIR Connect {what}"),
        details: errors.iter().map(ToString::to_string).collect(),
    };
    if expect == FcKind::Context {
        let doc: ContextDocument = typed(&json, "context")?;
        doc.validate().map_err(|e| invalid("context", e))?;
        // openFHIR does not require context.template.id; without one the key is empty.
        let raw = doc.template_id().unwrap_or_default().to_string();
        return Ok(ParsedFc {
            kind: FcKind::Context,
            key: crate::domain::normalize_template_id(&raw),
            display_id: raw,
            archetype: None,
            extends: None,
            json,
        });
    }
    let doc: ModelDocument = typed(&json, "model")?;
    let kind = if doc.is_extension() {
        FcKind::Extension
    } else {
        FcKind::Model
    };
    doc.validate().map_err(|e| invalid(kind.as_str(), e))?;
    let name = doc.name().unwrap_or_default().to_string();
    Ok(ParsedFc {
        kind,
        key: name.clone(),
        display_id: name,
        archetype: doc.archetype().map(str::to_string),
        extends: doc.extends().map(str::to_string),
        json,
    })
}

/// Reads YAML text as a JSON value, like `serde_norway::from_str::<serde_json::Value>`, but refuses
/// a document whose aliases expand it to more than twice its size.
///
/// serde_norway expands an alias (`*a`) by replaying its anchor's events, and its own limit (100
/// alias uses per event of the document) stops only exponential "billion laughs" nesting: a list of
/// `n` aliases of an `n`-element anchor is `n * n` values, and 10 KB of YAML expanded to 250 MB
/// (4 GB from 40 KB). Here every value counts one unit and every string byte one unit, and reading
/// stops with an error after `2 * text.len() + 1024` units: a document without aliases never
/// reaches that (each unit takes at least a byte of text), so only alias expansion is refused,
/// and memory and time stay proportional to the text.
///
/// Before that, [`scan_flow_depth`] refuses flow collections nested deeper than
/// [`MAX_FLOW_DEPTH`]: the scanner's time grows with tokens x flow depth, and serde_norway applies
/// its recursion limit (128) only after scanning the whole document.
pub(crate) fn read_yaml(text: &str) -> std::result::Result<serde_json::Value, YamlError> {
    use serde::de::DeserializeSeed;
    scan_flow_depth(text, MAX_FLOW_DEPTH)?;
    let budget = std::cell::Cell::new(text.len().saturating_mul(2).saturating_add(1024));
    Ok(yaml::Bounded(&budget).deserialize(serde_norway::Deserializer::from_str(text))?)
}

/// Why YAML text could not be read (see `read_yaml`).
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    /// Refused by the linear pre-scan before parsing (flow collections nested too deeply).
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// Malformed YAML, or aliases expanding it beyond the budget.
    #[error(transparent)]
    Syntax(#[from] serde_norway::Error),
}

mod yaml {
    use std::cell::Cell;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Number, Value};

    /// A [`Value`] seed that spends units of a shared budget (see [`super::read_yaml`]).
    #[derive(Clone, Copy)]
    pub(super) struct Bounded<'b>(pub(super) &'b Cell<usize>);

    impl Bounded<'_> {
        fn spend<E: de::Error>(self, units: usize) -> Result<(), E> {
            match self.0.get().checked_sub(units) {
                Some(left) => {
                    self.0.set(left);
                    Ok(())
                }
                None => {
                    self.0.set(0);
                    Err(E::custom(
                        "the document's aliases expand it to more than twice its size",
                    ))
                }
            }
        }
    }

    impl<'de> DeserializeSeed<'de> for Bounded<'_> {
        type Value = Value;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    /// A mapping key: a string, as serde_json reads keys.
    struct Key<'b>(Bounded<'b>);

    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = String;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl Visitor<'_> for Key<'_> {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string key")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            self.0.spend(1 + v.len())?;
            Ok(v.to_string())
        }
    }

    // Leaves mirror serde_json's own `Value` visitor.
    impl<'de> Visitor<'de> for Bounded<'_> {
        type Value = Value;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any valid JSON value")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
            self.spend(1)?;
            Ok(Value::Bool(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
            self.spend(1)?;
            Ok(Value::Number(v.into()))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
            self.spend(1)?;
            Ok(Value::Number(v.into()))
        }
        fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
            self.spend(1)?;
            <Number as de::Deserialize>::deserialize(de::value::I128Deserializer::<E>::new(v))
                .map(Value::Number)
        }
        fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
            self.spend(1)?;
            <Number as de::Deserialize>::deserialize(de::value::U128Deserializer::<E>::new(v))
                .map(Value::Number)
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
            self.spend(1)?;
            Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
            self.spend(1 + v.len())?;
            Ok(Value::String(v.to_string()))
        }
        fn visit_none<E: de::Error>(self) -> Result<Value, E> {
            self.spend(1)?;
            Ok(Value::Null)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
            self.spend(1)?;
            Ok(Value::Null)
        }
        fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            self.deserialize(d)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            self.spend(1)?;
            let mut items = Vec::new();
            while let Some(v) = seq.next_element_seed(self)? {
                items.push(v);
            }
            Ok(Value::Array(items))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            self.spend(1)?;
            let mut object = Map::new();
            while let Some(k) = map.next_key_seed(Key(self))? {
                let v = map.next_value_seed(self)?;
                object.insert(k, v);
            }
            Ok(Value::Object(object))
        }
    }
}

/// A stored FHIR Connect document. Shared and immutable.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FcDocument {
    /// The server-assigned id.
    #[serde(rename = "uuid")]
    pub uuid: uuid::Uuid,
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
    /// Response bodies rendered from this document (see `api::artifacts`).
    #[serde(skip)]
    pub rendered: Rendered,
}

/// Every context of a tenant: the value of the `all_contexts` cache.
#[derive(Debug, Default)]
pub struct FcList {
    /// The documents, ordered by key.
    pub docs: Vec<Arc<FcDocument>>,
    /// Response bodies rendered from the whole list.
    pub rendered: Rendered,
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
            matches!(&e, Error::Invalid { details, .. } if details.iter().any(|d| d.contains("context.template"))),
            "{e:?}"
        );
        let e = parse_fc(
            b"type: model\nmetadata: {}\n",
            FcFormat::Yaml,
            FcKind::Model,
        )
        .unwrap_err();
        assert!(
            matches!(&e, Error::Invalid { details, .. } if details.iter().any(|d| d.contains("metadata.name"))),
            "{e:?}"
        );
        let e = parse_fc(b"type: context\n", FcFormat::Yaml, FcKind::Model).unwrap_err();
        assert!(
            matches!(&e, Error::Invalid { details, .. } if details.iter().any(|d| d.starts_with("type: is \"context\""))),
            "{e:?}"
        );
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

    use proptest::prelude::*;

    fn plain(text: &str) -> std::result::Result<serde_json::Value, serde_norway::Error> {
        serde_norway::from_str(text)
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
            "[-?:&*!|>#'\" \\[\\]{},0-9a-z]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("\\PC{0,8}", inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Without aliases, `read_yaml` reads exactly what serde_norway reads: any document a
        /// serializer writes ...
        #[test]
        fn read_yaml_matches_serde_norway_on_written_documents(v in json_value()) {
            let text = serde_norway::to_string(&v).unwrap();
            prop_assert_eq!(read_yaml(&text).unwrap(), plain(&text).unwrap());
        }

        /// ... and any text at all: the same value, or an error for both (or, only when the text
        /// has aliases, a budget error).
        #[test]
        fn read_yaml_matches_serde_norway_on_any_text(text in "([a-z]{1,3}: |- |  |\n|\\{|\\}|\\[|\\]|, |&a |\\*a|!!str |[0-9]{1,3}|'[^']{0,3}'|\"[a-z\\\\]{0,3}\"|\\? |~|\\PC){0,40}") {
            match (read_yaml(&text), plain(&text)) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (Err(e), Ok(_)) => prop_assert!(text.contains('*') && e.to_string().contains("aliases"), "{e}"),
                (Ok(a), Err(e)) => prop_assert!(false, "read {a:?} where serde_norway failed: {e}"),
            }
        }
    }

    #[test]
    fn read_yaml_budgets_alias_expansion() {
        // n aliases of an n-element anchor: n * n values from about 5 n bytes.
        let n = 1000;
        let square = format!("a: &a [{}]\nb: [{}]\n", "1,".repeat(n), "*a,".repeat(n));
        let e = read_yaml(&square).unwrap_err();
        assert!(e.to_string().contains("aliases expand"), "{e}");
        // serde_norway alone reads it: its own limit does not catch this shape.
        assert_eq!(plain(&square).unwrap()["b"].as_array().unwrap().len(), n);
        // A long string aliased many times.
        let long = format!(
            "a: &a '{}'\nb: [{}]\n",
            "x".repeat(10_000),
            "*a,".repeat(100)
        );
        assert!(read_yaml(&long).is_err());
        // Moderate reuse is fine.
        let ok = "a: &a {x: 1, y: [1, 2]}\nb: *a\nc: *a\n";
        let v = read_yaml(ok).unwrap();
        assert_eq!(v["c"], v["a"]);
        assert_eq!(v, plain(ok).unwrap());
    }
}
