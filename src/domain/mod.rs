//! The artifacts: tenants, OPT templates and FHIR Connect documents, and their parsing.

pub mod fc_model;
pub mod fhir_connect;
pub mod footprint;
pub mod helpers;
pub mod mapper;
pub mod opt;
pub mod yaml_scan;

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{Error, Result};

pub use fhir_connect::{parse_fc, FcDocument, FcFormat, FcKind, FcList, ParsedFc};
pub use opt::{parse_opt, OptDocument, Template};

/// The tenant every zero-config node serves (created by the migrations).
pub const DEFAULT_TENANT: &str = "default";

/// Normalizes a template id the way openFHIR does: lowercase, spaces replaced by `_`.
pub fn normalize_template_id(raw: &str) -> String {
    raw.trim().to_lowercase().replace(' ', "_")
}

/// Checks a tenant id: 1-64 characters of `A-Z a-z 0-9 . _ -`.
///
/// Tenant ids appear in cache keys (`tenant:templateId`) and headers, so `:` and anything that
/// could be read as a path or a command are refused.
pub fn validate_tenant_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "invalid tenant id",
            format!("tenant id {id:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'"),
        ))
    }
}

/// Checks an artifact id (template id or model name) taken from a path or a document.
pub fn validate_artifact_id(what: &str, id: &str) -> Result<()> {
    if id.trim().is_empty() || id.len() > 512 || id.chars().any(char::is_control) {
        return Err(Error::invalid(
            format!("invalid {what}"),
            format!("{what} {id:?} must be 1-512 characters without control characters"),
        ));
    }
    Ok(())
}

/// Refuses a JSON value holding a NUL character anywhere: PostgreSQL text and jsonb cannot
/// store it, and the client should hear that as a 400 naming the field.
pub fn reject_nul(what: &str, v: &serde_json::Value) -> Result<()> {
    let has_nul = match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => return a.iter().try_for_each(|x| reject_nul(what, x)),
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                if k.contains('\0') {
                    return Err(nul_error(what));
                }
                reject_nul(what, x)?;
            }
            false
        }
        _ => false,
    };
    if has_nul {
        return Err(nul_error(what));
    }
    Ok(())
}

fn nul_error(what: &str) -> Error {
    Error::invalid(
        format!("invalid {what}"),
        format!("{what} contains a NUL character (\\u0000), which cannot be stored"),
    )
}

/// A tenant configuration record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tenant {
    /// Tenant id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Free-form configuration.
    pub config: serde_json::Value,
    /// When it was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// When it was last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_matches_openfhir() {
        assert_eq!(normalize_template_id("Growth chart"), "growth_chart");
        assert_eq!(normalize_template_id("KDS_Vitalstatus"), "kds_vitalstatus");
    }

    #[test]
    fn tenant_ids() {
        assert!(validate_tenant_id("acme-1.eu_west").is_ok());
        for bad in [
            "",
            "a:b",
            "../x",
            "a b",
            "x'; drop table tenant; --",
            &"x".repeat(65),
        ] {
            assert!(validate_tenant_id(bad).is_err(), "{bad}");
        }
    }
}
