//! OPT (openEHR Operational Template) documents.
//!
//! # Layout
//! * this module: the header ([`Template`], [`parse_opt`], [`xml_start`]) and the stored
//!   [`OptDocument`].
//! * `tree`: the definition tree, [`TemplateTree`].
//! * `limits`: the nesting and size limits checked on the text before it is parsed
//!   ([`check_xml_depth`]).
//!

mod limits;
mod tree;

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{Error, Result};

pub use limits::{check_xml_depth, MAX_ATTRIBUTES, MAX_DEPTH, MAX_NAMESPACES};
pub use tree::{parse_template, Node, NodeKind, Occurrences, TemplateTree};

/// The openEHR XML namespace.
pub const OPENEHR_NS: &str = "http://schemas.openehr.org/v1";

/// What the node reads out of an OPT's header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Template {
    /// The template id as written in `template_id/value` (e.g. `Growth chart`).
    #[serde(rename = "originalTemplateId")]
    pub template_id: String,
    /// The normalized id (lowercase, spaces as `_`): the key.
    #[serde(rename = "templateId")]
    pub normalized_id: String,
    /// `concept`, if present.
    pub concept: Option<String>,
    /// `language/code_string`, if present.
    pub language: Option<String>,
    /// `description/other_details[@id='sem_ver']`, if present.
    #[serde(rename = "semVer")]
    pub sem_ver: Option<String>,
}

/// Where the XML of an uploaded OPT starts, as openFHIR reads it: surrounding whitespace and
/// control characters trimmed, then any run of non-word characters right before the first `<`
/// (a byte-order mark, a stray quote) skipped. The stored text stays exactly as uploaded; every
/// parse of it goes through here, so a node reading it back agrees with the upload.
pub fn xml_start(text: &str) -> &str {
    // Java's String.trim(): every char <= U+0020 at both ends.
    let t = text.trim_matches(|c: char| c <= ' ');
    match t.find('<') {
        Some(i)
            if i > 0
                && !t[..i]
                    .chars()
                    .any(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            &t[i..]
        }
        _ => t,
    }
}

/// Reads the header of an OPT (`<template>` root element): the one header parse of every path
/// that stores or reads an OPT ([`parse_opt`] and [`TemplateTree::parse`]).
///
/// [`TemplateTree::parse`]: crate::domain::opt::TemplateTree::parse
pub(crate) fn read_header(root: roxmltree::Node<'_, '_>) -> Result<Template> {
    if root.tag_name().name() != "template" {
        return Err(Error::invalid(
            "not an OPT",
            format!(
                "not an OPT: the root element is <{}>; an OPT's root element is <template> in namespace {OPENEHR_NS}",
                root.tag_name().name()
            ),
        ));
    }
    fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
        node.children()
            .find(|c| c.is_element() && c.tag_name().name() == name)
    }
    fn text(node: Option<roxmltree::Node<'_, '_>>) -> Option<String> {
        node.and_then(|n| n.text())
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
    }
    let template_id =
        text(child(root, "template_id").and_then(|t| child(t, "value"))).ok_or_else(|| {
            Error::invalid(
                "OPT has no template id",
                "the OPT has no template id: <template_id><value>...</value></template_id> under <template> is missing or empty",
            )
        })?;
    crate::domain::validate_artifact_id("template id", &template_id)?;
    let sem_ver = child(root, "description").and_then(|d| {
        d.children()
            .find(|c| {
                c.is_element()
                    && c.tag_name().name() == "other_details"
                    && c.attribute("id") == Some("sem_ver")
            })
            .and_then(|n| text(Some(n)))
    });
    Ok(Template {
        normalized_id: crate::domain::normalize_template_id(&template_id),
        template_id,
        concept: text(child(root, "concept")),
        language: text(child(root, "language").and_then(|l| child(l, "code_string"))),
        sem_ver,
    })
}

/// Parses an OPT far enough to identify it (the XML from [`xml_start`] on).
///
/// DTDs are refused outright (roxmltree's default), so external entities and entity expansion
/// (XXE, "billion laughs") are never processed.
pub fn parse_opt(xml: &str) -> Result<Template> {
    let xml = xml_start(xml);
    // roxmltree recurses once per nesting level: refuse absurd nesting before it can overflow
    // the stack (a crash of the node, not an error).
    crate::domain::opt::check_xml_depth(xml, crate::domain::opt::MAX_DEPTH)?;
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| Error::invalid("malformed OPT XML", format!("malformed OPT XML: {e}")))?;
    read_header(doc.root_element())
}

/// A stored OPT: metadata, the XML as uploaded, and what was parsed from it. Shared and immutable.
#[derive(Debug, Clone, Serialize)]
pub struct OptDocument {
    /// The server-assigned id.
    pub id: uuid::Uuid,
    /// Tenant id.
    pub tenant: String,
    /// Parsed header.
    #[serde(flatten)]
    pub template: Template,
    /// Size of the XML in bytes.
    pub size: usize,
    /// The XML exactly as uploaded (shared: handing it out copies nothing).
    #[serde(skip)]
    pub content: bytes::Bytes,
    /// The parsed definition tree (immutable, shared by every reader).
    #[serde(skip)]
    pub tree: std::sync::Arc<crate::domain::opt::TemplateTree>,
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

    /// An OPT with the given `definition` element (for the tree and limits tests).
    pub(super) fn opt(definition: &str) -> String {
        format!(
            r#"<template xmlns="http://schemas.openehr.org/v1" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><template_id><value>T</value></template_id>{definition}</template>"#
        )
    }

    const OPT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<template xmlns="http://schemas.openehr.org/v1" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <language><terminology_id><value>ISO_639-1</value></terminology_id><code_string>en</code_string></language>
  <description><other_details id="sem_ver">1.0.2</other_details></description>
  <template_id><value>Growth chart</value></template_id>
  <concept>Growth chart</concept>
</template>"#;

    #[test]
    fn reads_the_header() {
        let t = parse_opt(OPT).unwrap();
        assert_eq!(t.template_id, "Growth chart");
        assert_eq!(t.normalized_id, "growth_chart");
        assert_eq!(t.language.as_deref(), Some("en"));
        assert_eq!(t.sem_ver.as_deref(), Some("1.0.2"));
        assert_eq!(t.concept.as_deref(), Some("Growth chart"));
    }

    #[test]
    fn rejects_what_is_not_an_opt() {
        let e = parse_opt("<template><concept>x</concept></template>").unwrap_err();
        assert!(e.to_string().contains("template id"), "{e}");
        assert!(parse_opt("<composition/>").is_err());
        assert!(parse_opt("<template><oops").is_err());
        let xxe = r#"<?xml version="1.0"?><!DOCTYPE t [<!ENTITY x SYSTEM "file:///etc/passwd">]><template><template_id><value>&x;</value></template_id></template>"#;
        assert!(parse_opt(xxe).is_err());
        let laughs = r#"<!DOCTYPE t [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]><template><template_id><value>&b;</value></template_id></template>"#;
        assert!(parse_opt(laughs).is_err());
        let deep = format!(
            "<template>{}{}</template>",
            "<a>".repeat(100_000),
            "</a>".repeat(100_000)
        );
        let e = parse_opt(&deep).unwrap_err();
        assert!(
            e.to_string().contains("nest") || format!("{e:?}").contains("nest"),
            "{e:?}"
        );
    }
}
