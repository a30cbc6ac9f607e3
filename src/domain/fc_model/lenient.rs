//! Scalars read the way openFHIR's (Jackson's) reader reads them into text fields.

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
