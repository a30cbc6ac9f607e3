//! FHIR Connect documents: `parse_fc` (YAML and JSON, uploaded as a context and as a model) and
//! the typed `parse_context` / `parse_model`. A model that parses is compiled with the growth
//! chart fixtures (its name replacing theirs) and its helper tree built against the fixture OPT.
#![no_main]

use std::collections::BTreeMap;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use openfhir_cache::domain::fc_model::{
    parse_context, parse_model, ContextDocument, ModelDocument,
};
use openfhir_cache::domain::opt::TemplateTree;
use openfhir_cache::domain::{helpers, mapper, parse_fc, FcFormat, FcKind};

struct Fixtures {
    context: ContextDocument,
    models: BTreeMap<String, ModelDocument>,
    template: TemplateTree,
}

static FIXTURES: LazyLock<Fixtures> = LazyLock::new(|| {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/");
    let read = |name: &str| std::fs::read_to_string(format!("{dir}{name}")).unwrap();
    let mut models = BTreeMap::new();
    for name in [
        "height.model.yml",
        "weight.model.yml",
        "height.ext-add.yml",
        "height.ext-append.yml",
        "height.ext-overwrite.yml",
    ] {
        let m = parse_model(&read(name), FcFormat::Yaml).unwrap();
        models.insert(m.name().unwrap().to_string(), m);
    }
    Fixtures {
        context: parse_context(&read("growth_chart.context.yml"), FcFormat::Yaml).unwrap(),
        models,
        template: TemplateTree::parse(&read("growth_chart.opt")).unwrap(),
    }
});

fuzz_target!(|data: &[u8]| {
    for format in [FcFormat::Yaml, FcFormat::Json] {
        for kind in [FcKind::Context, FcKind::Model] {
            if let Ok(p) = parse_fc(data, format, kind) {
                assert!(p.json.is_object() && !p.key.trim().is_empty());
            }
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for format in [FcFormat::Yaml, FcFormat::Json] {
        let _ = parse_context(text, format);
        if let Ok(model) = parse_model(text, format) {
            let f = &*FIXTURES;
            let mut models = f.models.clone();
            if let Some(name) = model.name() {
                models.insert(name.to_string(), model);
            }
            if let Ok(index) = mapper::compile(&f.context, &models, true) {
                let tree = helpers::build(&index, &f.template);
                assert!(tree.iter().count() <= helpers::MAX_HELPERS + 1);
            }
        }
    }
});
