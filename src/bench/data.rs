//! The artifacts the benchmarks read and write: the growth-chart OPT (33 KB) with its context,
//! two models and three extensions (so the mapper and helper tree compile), nine more contexts
//! (so "all contexts" is a list), and a small OPT for write-heavy scenarios.

use crate::domain::FcFormat;
use crate::node::Node;
use crate::node::Put;

use super::{BenchError, BenchResult};

/// The growth-chart OPT as uploaded.
pub const OPT: &str = include_str!("data/growth_chart.opt");
/// Its FHIR Connect context (`context.template.id: Growth chart`).
pub const CONTEXT: &str = include_str!("data/growth_chart.context.yml");
/// The models and extensions the context names.
pub const MODELS: [&str; 5] = [
    include_str!("data/height.model.yml"),
    include_str!("data/weight.model.yml"),
    include_str!("data/height.ext-add.yml"),
    include_str!("data/height.ext-append.yml"),
    include_str!("data/height.ext-overwrite.yml"),
];
/// The normalized id of the growth-chart template.
pub const TEMPLATE: &str = "growth_chart";
/// Contexts besides the growth chart's, so that `all contexts` returns a list.
pub const EXTRA_CONTEXTS: usize = 9;

/// A small well-formed OPT (about 1 KB) with template id `id`; `marker` tells versions apart.
pub fn small_opt(id: &str, marker: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<template xmlns="http://schemas.openehr.org/v1" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <language><terminology_id><value>ISO_639-1</value></terminology_id><code_string>en</code_string></language>
  <description><other_details id="sem_ver">1.0.0</other_details></description>
  <uid><value>{marker}</value></uid>
  <template_id><value>{id}</value></template_id>
  <concept>{marker}</concept>
  <definition xsi:type="C_ARCHETYPE_ROOT">
    <rm_type_name>COMPOSITION</rm_type_name>
    <occurrences><lower_included>true</lower_included><upper_included>true</upper_included><lower_unbounded>false</lower_unbounded><upper_unbounded>false</upper_unbounded><lower>1</lower><upper>1</upper></occurrences>
    <node_id/>
    <archetype_id><value>openEHR-EHR-COMPOSITION.report.v1</value></archetype_id>
  </definition>
</template>"#
    )
}

/// The growth-chart context re-targeted at template `Growth chart N`.
fn extra_context(n: usize) -> String {
    CONTEXT.replace("id: Growth chart", &format!("id: Growth chart {n}"))
}

/// Creates the tenant and uploads every artifact through `node` (idempotent).
pub async fn seed(node: &Node, tenant: &str) -> BenchResult<()> {
    let step = |what: &'static str| move |e: crate::Error| BenchError::Node { what, source: e };
    node.put_tenant(tenant, "openfhir-cache bench", &serde_json::json!({}))
        .await
        .map_err(step("create the bench tenant"))?;
    node.put_opt(tenant, OPT, Put::Upsert)
        .await
        .map_err(step("upload the growth-chart OPT"))?;
    for m in MODELS {
        node.put_model(tenant, m.as_bytes(), FcFormat::Yaml, Put::Upsert)
            .await
            .map_err(step("upload a model"))?;
    }
    node.put_context(tenant, CONTEXT.as_bytes(), FcFormat::Yaml, Put::Upsert)
        .await
        .map_err(step("upload the growth-chart context"))?;
    for n in 1..=EXTRA_CONTEXTS {
        node.put_context(
            tenant,
            extra_context(n).as_bytes(),
            FcFormat::Yaml,
            Put::Upsert,
        )
        .await
        .map_err(step("upload a context"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_parse() {
        let t = crate::domain::opt::TemplateTree::parse(OPT).unwrap();
        assert_eq!(t.header().normalized_id, TEMPLATE);
        let s = crate::domain::opt::TemplateTree::parse(&small_opt("Small 1", "v1")).unwrap();
        assert_eq!(s.header().normalized_id, "small_1");
        for n in 1..=EXTRA_CONTEXTS {
            crate::domain::fc_model::parse_context(&extra_context(n), FcFormat::Yaml).unwrap();
        }
    }
}
