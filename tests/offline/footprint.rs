//! The size-bounded caches charge each entry its estimated footprint
//! (`openfhir_cache::domain::footprint::charged`). Here each estimate is checked against what the
//! allocator actually handed out while the value was built and still holds: never below it (a
//! bound that undercounts lets a node outgrow its memory limit) and not far above it (one that
//! overcounts keeps needlessly few entries).

use std::collections::BTreeMap;
use std::sync::Arc;

use openfhir_cache::bench::data::{CONTEXT, MODELS, OPT};
use openfhir_cache::domain::fc_model::{parse_context, parse_model, ModelDocument};
use openfhir_cache::domain::footprint::charged;
use openfhir_cache::domain::helpers::{self, HelperTree};
use openfhir_cache::domain::mapper::{self, CompiledMapper};
use openfhir_cache::domain::opt::TemplateTree;
use openfhir_cache::domain::{parse_fc, FcDocument, FcFormat, FcKind, Tenant};

use crate::alloc::retained;

/// The estimate may exceed what is held by at most this factor.
const MAX_OVER: f64 = 4.0;

fn check(what: &str, estimate: usize, held: usize) {
    let ratio = estimate as f64 / held.max(1) as f64;
    eprintln!("{what}: estimate {estimate} B, held {held} B, ratio {ratio:.2}");
    assert!(
        estimate >= held,
        "{what}: estimated {estimate} bytes but it holds {held}: the bound would undercount"
    );
    assert!(
        ratio <= MAX_OVER,
        "{what}: estimated {estimate} bytes for {held} held ({ratio:.1}x)"
    );
}

fn models() -> BTreeMap<String, ModelDocument> {
    MODELS
        .iter()
        .map(|m| {
            let doc = parse_model(m, FcFormat::Yaml).expect("fixture model");
            (doc.name().unwrap_or_default().to_string(), doc)
        })
        .collect()
}

#[test]
fn template_trees_are_weighed_by_what_they_hold() {
    let (tree, held) = retained(|| TemplateTree::parse(OPT).expect("fixture OPT"));
    check("growth-chart template tree", charged(&tree), held);
}

#[test]
fn typed_documents_are_weighed_by_what_they_hold() {
    for (i, m) in MODELS.iter().enumerate() {
        let (doc, held) = retained(|| parse_model(m, FcFormat::Yaml).expect("fixture model"));
        check(&format!("model {i}"), charged(&doc), held);
    }
}

#[test]
fn stored_documents_are_weighed_with_their_text_and_json() {
    let (doc, held) = retained(|| {
        let p = parse_fc(CONTEXT.as_bytes(), FcFormat::Yaml, FcKind::Context).expect("context");
        FcDocument {
            uuid: uuid::Uuid::nil(),
            tenant: "default".into(),
            kind: p.kind,
            id: p.key,
            display_id: p.display_id,
            archetype: p.archetype,
            extends: p.extends,
            format: FcFormat::Yaml,
            content: Arc::from(CONTEXT),
            json: Arc::new(p.json),
            created: time::OffsetDateTime::UNIX_EPOCH,
            updated: time::OffsetDateTime::UNIX_EPOCH,
            rendered: Default::default(),
        }
    });
    check("context document", charged(&doc), held);

    let (tenant, held) = retained(|| Tenant {
        id: "tenant-1".into(),
        name: "A tenant with a name".into(),
        config: serde_json::json!({"region": "eu", "limits": [1, 2, 3], "tags": {"a": "b"}}),
        created: time::OffsetDateTime::UNIX_EPOCH,
        updated: time::OffsetDateTime::UNIX_EPOCH,
    });
    check("tenant", charged(&tenant), held);
}

#[test]
fn compiled_mappers_and_helper_trees_are_weighed_by_what_they_hold() {
    let context = parse_context(CONTEXT, FcFormat::Yaml).expect("fixture context");
    let models = models();
    let tree = TemplateTree::parse(OPT).expect("fixture OPT");
    let (compiled, held) = retained(|| CompiledMapper {
        index: mapper::compile(&context, &models, true).expect("compiles"),
        compiled_at: time::OffsetDateTime::UNIX_EPOCH,
        node: "node-1".into(),
        compile_us: 0,
    });
    check("compiled mapper", charged(&compiled), held);
    let (helpers, held): (HelperTree, usize) = retained(|| helpers::build(&compiled.index, &tree));
    check("helper tree", charged(&helpers), held);
}
