//! Parsing of the compiled-artifact inputs: the OPT definition tree and typed FHIR Connect files.
//! No database needed.

use std::path::PathBuf;

use openfhir_cache::domain::fc_model::{
    parse_context, parse_model, ContextDocument, Direction, ExtensionKind, FieldError,
    ModelDocument,
};
use openfhir_cache::domain::opt::{NodeKind, Occurrences, TemplateTree, MAX_DEPTH};
use openfhir_cache::domain::FcFormat;
use openfhir_cache::Error;

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn details(e: Error) -> Vec<String> {
    match e {
        Error::Invalid { details, .. } => details,
        other => panic!("expected Error::Invalid, got {other:?}"),
    }
}

const HEIGHT: &str = "/content[openEHR-EHR-OBSERVATION.height.v2]";
const WEIGHT: &str = "/content[openEHR-EHR-OBSERVATION.body_weight.v2]";
/// Nodes in tests/fixtures/growth_chart.opt: 5 in the composition, 15 in height, 13 in weight.
const FIXTURE_NODES: usize = 33;

// ---------------------------------------------------------------------------------------------
// OPT

#[test]
fn opt_header_and_root() {
    let t = TemplateTree::parse(&fixture("growth_chart.opt")).unwrap();
    let h = t.header();
    assert_eq!(h.template_id, "Growth chart");
    assert_eq!(h.normalized_id, "growth_chart");
    assert_eq!(h.concept.as_deref(), Some("Growth chart"));
    assert_eq!(h.language.as_deref(), Some("en"));
    assert_eq!(h.sem_ver.as_deref(), Some("1.0.2"));
    let root = t.root();
    assert_eq!(root.path, "/");
    assert_eq!(root.rm_type, "COMPOSITION");
    assert_eq!(root.kind, NodeKind::ArchetypeRoot);
    assert_eq!(
        root.archetype_id.as_deref(),
        Some("openEHR-EHR-COMPOSITION.encounter.v1")
    );
    assert_eq!(root.attribute, None);
    assert_eq!(root.name.as_deref(), Some("Encounter"));
    assert_eq!(t.len(), FIXTURE_NODES);
    assert_eq!(t.iter().count(), FIXTURE_NODES);
    assert!(std::ptr::eq(t.find("/").unwrap(), root));
}

#[test]
fn opt_paths_of_known_nodes() {
    let t = TemplateTree::parse(&fixture("growth_chart.opt")).unwrap();
    let obs = t.find(HEIGHT).unwrap();
    assert_eq!(
        (obs.rm_type.as_str(), obs.kind, obs.attribute.as_deref()),
        ("OBSERVATION", NodeKind::ArchetypeRoot, Some("content"))
    );
    assert_eq!(obs.node_id.as_deref(), Some("at0000"));
    assert_eq!(
        obs.occurrences,
        Occurrences {
            lower: 0,
            upper: None
        }
    );

    let p = format!("{HEIGHT}/data[at0001]/events[at0002]/data[at0003]/items[at0004]");
    let el = t.find(&p).unwrap();
    assert_eq!(el.rm_type, "ELEMENT");
    assert_eq!(el.node_id.as_deref(), Some("at0004"));
    assert_eq!(el.attribute.as_deref(), Some("items"));
    assert_eq!(
        el.occurrences,
        Occurrences {
            lower: 1,
            upper: Some(1)
        }
    );
    assert_eq!(el.path, p);

    // A leaf has no node id: it takes the path of its attribute and keeps its RM type.
    let q = t.find(&format!("{p}/value")).unwrap();
    assert_eq!(
        (q.rm_type.as_str(), q.constraint.as_str(), q.kind),
        ("DV_QUANTITY", "C_DV_QUANTITY", NodeKind::Leaf)
    );
    assert_eq!((q.node_id.as_ref(), q.name.as_ref()), (None, None));
    assert_eq!(q.attribute.as_deref(), Some("value"));

    let w = format!("{WEIGHT}/data[at0002]/events[at0003]/data[at0001]/items[at0004]/value");
    assert_eq!(t.find(&w).unwrap().rm_type, "DV_QUANTITY");

    // Nodes without node id inside the composition, and nested leaves under them.
    assert_eq!(t.find("/category").unwrap().rm_type, "DV_CODED_TEXT");
    assert_eq!(
        t.find("/category/defining_code").unwrap().constraint,
        "C_CODE_PHRASE"
    );
    assert_eq!(
        t.find("/context/other_context[at0001]").unwrap().rm_type,
        "ITEM_TREE"
    );
    let clothing = format!(
        "{WEIGHT}/data[at0002]/events[at0003]/state[at0008]/items[at0025]/value/defining_code"
    );
    assert_eq!(t.find(&clothing).unwrap().constraint, "C_CODE_REFERENCE");
    let comment =
        format!("{HEIGHT}/data[at0001]/events[at0002]/data[at0003]/items[at0018]/value/value");
    assert_eq!(t.find(&comment).unwrap().constraint, "C_STRING");

    assert!(t
        .find("/content[openEHR-EHR-OBSERVATION.nope.v1]")
        .is_none());
    assert!(t.find("").is_none());
}

#[test]
fn opt_names_come_from_the_nearest_archetype_root() {
    let t = TemplateTree::parse(&fixture("growth_chart.opt")).unwrap();
    let name = |p: &str| t.find(p).and_then(|n| n.name.clone());
    assert_eq!(name(HEIGHT).as_deref(), Some("Height/Length"));
    assert_eq!(name(WEIGHT).as_deref(), Some("Body weight"));
    // at0001 means different things in each archetype.
    assert_eq!(
        name(&format!("{HEIGHT}/data[at0001]")).as_deref(),
        Some("History")
    );
    assert_eq!(
        name(&format!(
            "{WEIGHT}/data[at0002]/events[at0003]/data[at0001]"
        ))
        .as_deref(),
        Some("Tree")
    );
    assert_eq!(
        name(&format!(
            "{WEIGHT}/data[at0002]/events[at0003]/data[at0001]/items[at0004]"
        ))
        .as_deref(),
        Some("Weight")
    );
    assert_eq!(
        name("/context/other_context[at0001]").as_deref(),
        Some("Tree")
    );
}

#[test]
fn opt_nested_cluster_and_slot() {
    let t = TemplateTree::parse(&fixture("growth_chart.opt")).unwrap();
    let device = t
        .find(&format!("{HEIGHT}/protocol[at0007]/items[at0011]"))
        .unwrap();
    assert_eq!(
        (device.rm_type.as_str(), device.name.as_deref()),
        ("CLUSTER", Some("Device"))
    );
    assert_eq!(device.children.len(), 2);
    let slot = &device.children[1];
    assert_eq!(slot.kind, NodeKind::Slot);
    assert_eq!(slot.constraint, "ARCHETYPE_SLOT");
    assert_eq!(slot.rm_type, "CLUSTER");
    assert_eq!(slot.attribute.as_deref(), Some("items"));
    assert_eq!(
        slot.path,
        format!("{HEIGHT}/protocol[at0007]/items[at0011]/items[at0013]")
    );
    assert_eq!(slot.name.as_deref(), Some("Device details"));
    assert_eq!(
        slot.occurrences,
        Occurrences {
            lower: 0,
            upper: None
        }
    );
    assert_eq!(slot.slot_includes.len(), 1);
    assert!(slot.slot_includes[0].contains(r"openEHR-EHR-CLUSTER\.device_details"));
    assert!(slot.children.is_empty());
    assert!(std::ptr::eq(t.find(&slot.path).unwrap(), slot));
    assert_eq!(t.iter().filter(|n| n.kind == NodeKind::Slot).count(), 1);
}

#[test]
fn opt_errors_name_what_is_missing() {
    let cases: [(&str, &str); 6] = [
        ("not xml at all", "malformed OPT XML"),
        ("<template><oops", "malformed OPT XML"),
        ("<composition/>", "<template>"),
        (
            "<template><concept>x</concept><definition/></template>",
            "template_id",
        ),
        (
            "<template><template_id><value>T</value></template_id></template>",
            "definition",
        ),
        (
            r#"<!DOCTYPE t [<!ENTITY a "x">]><template><template_id><value>&a;</value></template_id><definition/></template>"#,
            "malformed OPT XML",
        ),
    ];
    for (xml, want) in cases {
        let e = TemplateTree::parse(xml).unwrap_err();
        let summary = e.to_string();
        let all = format!("{summary} {:?}", details(e));
        assert!(all.contains(want), "{xml:?}: {all}");
    }
}

#[test]
fn opt_too_deep_is_refused() {
    let open = "<attributes><rm_attribute_name>items</rm_attribute_name><children><rm_type_name>CLUSTER</rm_type_name><node_id>at0001</node_id>";
    let close = "</children></attributes>";
    let nested = |n: usize| {
        format!(
            "<template><template_id><value>T</value></template_id><definition><rm_type_name>COMPOSITION</rm_type_name>{}{}</definition></template>",
            open.repeat(n),
            close.repeat(n)
        )
    };
    // <template><definition> + 2 levels per object + the innermost object's <rm_type_name>.
    let deepest = (MAX_DEPTH - 3) / 2;
    let t = TemplateTree::parse(&nested(deepest)).unwrap();
    assert_eq!(t.len(), deepest + 1);
    let leaf = t.iter().last().unwrap();
    assert_eq!(leaf.path, "/items[at0001]".repeat(deepest));
    let d = details(TemplateTree::parse(&nested(deepest + 1)).unwrap_err());
    assert!(d[0].contains("deeper than"), "{d:?}");
    // Far deeper than roxmltree's recursion survives: an error, not a stack overflow.
    let d = details(TemplateTree::parse(&nested(100_000)).unwrap_err());
    assert!(d[0].contains("deeper than"), "{d:?}");
}

/// Builds an OPT of about `target` bytes: the fixture with its two observations repeated, each
/// copy under its own archetype ids. Returns the XML and the number of copies.
fn big_opt(target: usize) -> (String, usize) {
    let base = fixture("growth_chart.opt");
    let content = base
        .find("<rm_attribute_name>content</rm_attribute_name>")
        .unwrap();
    let start = content + base[content..].find("<children").unwrap();
    // The content attribute comes last, so its cardinality is the last one in the file.
    let end = base.rfind("<cardinality>").unwrap();
    let block = &base[start..end];
    let copies = (target / block.len()).max(1);
    let mut out = String::with_capacity(base.len() + block.len() * copies);
    out.push_str(&base[..start]);
    for i in 0..copies {
        out.push_str(
            &block
                .replace(".height.v2", &format!(".height_{i}.v2"))
                .replace(".body_weight.v2", &format!(".body_weight_{i}.v2")),
        );
    }
    out.push_str(&base[end..]);
    (out, copies)
}

#[test]
fn opt_of_3_mb_parses() {
    let (xml, copies) = big_opt(3 * 1024 * 1024);
    assert!(xml.len() > 3_000_000, "{}", xml.len());
    let started = std::time::Instant::now();
    let t = TemplateTree::parse(&xml).unwrap();
    eprintln!(
        "parsed a {} byte OPT ({} nodes) in {:?}",
        xml.len(),
        t.len(),
        started.elapsed()
    );
    assert_eq!(t.len(), 5 + 28 * copies);
    assert_eq!(t.path_count(), t.len(), "every copy has its own paths");
    let last = format!(
        "/content[openEHR-EHR-OBSERVATION.body_weight_{}.v2]/data[at0002]/events[at0003]/data[at0001]/items[at0004]",
        copies - 1
    );
    assert_eq!(t.find(&last).unwrap().name.as_deref(), Some("Weight"));
}

// ---------------------------------------------------------------------------------------------
// FHIR Connect

fn yaml_value(text: &str) -> serde_json::Value {
    serde_norway::from_str(text).unwrap()
}

#[test]
fn fc_context_parses_validates_and_round_trips() {
    let text = fixture("growth_chart.context.yml");
    let c: ContextDocument = parse_context(&text, FcFormat::Yaml).unwrap();
    assert_eq!(c.template_id(), Some("Growth chart"));
    let ctx = c.context.as_ref().unwrap();
    assert_eq!(
        ctx.archetypes.as_deref().unwrap(),
        ["OBSERVATION.height.v2", "OBSERVATION.body_weight.v2"]
    );
    assert_eq!(ctx.extensions.as_ref().unwrap().len(), 3);
    assert_eq!(
        ctx.start.as_deref(),
        Some("openEHR-EHR-COMPOSITION.encounter.v1")
    );
    assert_eq!(
        ctx.template.as_ref().unwrap().sem_ver.as_deref(),
        Some("1.0.2")
    );
    assert_eq!(
        ctx.profile.as_ref().unwrap().version.as_deref(),
        Some("4.0.1")
    );
    assert_eq!(ctx.extra["x-owner"], "growth team");
    assert_eq!(c.extra["x-review"]["by"][1], "bob");
    assert_eq!(serde_json::to_value(&c).unwrap(), yaml_value(&text));

    // The same document as JSON.
    let json = serde_json::to_string(&yaml_value(&text)).unwrap();
    assert_eq!(parse_context(&json, FcFormat::Json).unwrap(), c);
}

#[test]
fn fc_models_and_extensions_parse_validate_and_round_trip() {
    for (file, name, ext) in [
        ("height.model.yml", "OBSERVATION.height.v2", None),
        ("weight.model.yml", "OBSERVATION.body_weight.v2", None),
        (
            "height.ext-add.yml",
            "height-ext-add",
            Some(ExtensionKind::Add),
        ),
        (
            "height.ext-append.yml",
            "height-ext-append",
            Some(ExtensionKind::Append),
        ),
        (
            "height.ext-overwrite.yml",
            "height-ext-overwrite",
            Some(ExtensionKind::Overwrite),
        ),
    ] {
        let text = fixture(file);
        let m: ModelDocument =
            parse_model(&text, FcFormat::Yaml).unwrap_or_else(|e| panic!("{file}: {e:?}"));
        assert_eq!(m.name(), Some(name), "{file}");
        assert_eq!(m.is_extension(), ext.is_some(), "{file}");
        if let Some(kind) = ext {
            assert_eq!(m.extends(), Some("OBSERVATION.height.v2"));
            assert_eq!(m.mappings()[0].extension_kind(), Some(kind), "{file}");
        } else {
            assert!(m
                .archetype()
                .unwrap()
                .starts_with("openEHR-EHR-OBSERVATION."));
        }
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            yaml_value(&text),
            "{file}: typed round trip lost or changed something"
        );
    }
}

#[test]
fn fc_model_fields_are_typed() {
    let m = parse_model(&fixture("height.model.yml"), FcFormat::Yaml).unwrap();
    let spec = m.spec.as_ref().unwrap();
    assert_eq!(
        spec.fhir_config.as_ref().unwrap().resource_type(),
        Some("Observation")
    );
    assert_eq!(
        spec.fhir_config.as_ref().unwrap().extra["x-profile-note"],
        "core profile"
    );
    let pre = m.preprocessor.as_ref().unwrap();
    assert_eq!(
        pre.hierarchy
            .as_ref()
            .unwrap()
            .with
            .as_ref()
            .unwrap()
            .openehr
            .as_deref(),
        Some("$archetype/data[at0001]/events[at0002]")
    );
    assert_eq!(
        pre.fhir_condition.as_ref().unwrap().operator.as_deref(),
        Some("one of")
    );
    let by_name = |n: &str| {
        m.mappings()
            .iter()
            .find(|x| x.name.as_deref() == Some(n))
            .unwrap()
    };
    assert_eq!(by_name("code").direction(), Some(Direction::OpenEhrToFhir));
    let manual = &by_name("code").manual.as_ref().unwrap()[0];
    assert_eq!(
        manual.fhir.as_ref().unwrap()[1].value.as_ref().unwrap(),
        "8302-2"
    );
    let device = by_name("device").reference.as_ref().unwrap();
    assert_eq!(device.resource_type.as_deref(), Some("Device"));
    assert_eq!(
        device.mappings.as_ref().unwrap()[1]
            .slot_archetype
            .as_deref(),
        Some("CLUSTER.device_details.v1")
    );
    let status = by_name("status");
    assert_eq!(
        status.with.as_ref().unwrap().value.as_ref().unwrap(),
        "final"
    );
    assert!(status.extra.contains_key("x-comment"));
    let position = by_name("position");
    let cond = position.openehr_condition.as_ref().unwrap();
    assert_eq!(cond.operator.as_deref(), Some("not of"));
    assert_eq!(cond.target_attributes.as_ref().unwrap().len(), 1);
    let child = &position
        .followed_by
        .as_ref()
        .unwrap()
        .mappings
        .as_ref()
        .unwrap()[0];
    assert_eq!(child.with.as_ref().unwrap().kind.as_deref(), Some("CODING"));

    let w = parse_model(&fixture("weight.model.yml"), FcFormat::Yaml).unwrap();
    assert_eq!(
        w.terminology.as_ref().unwrap()["system"],
        "http://snomed.info/sct"
    );
    assert_eq!(w.mappings()[4].direction(), Some(Direction::FhirToOpenEhr));
}

/// Each broken fixture (a file openFHIR refuses too), whether it is a context, and the field
/// paths it must report, in order.
const BROKEN: &[(&str, bool, &[&str])] = &[
    (
        "context-missing-fields.yml",
        true,
        &["context.profile", "context.archetypes", "context.start"],
    ),
    ("mapping-without-name.yml", false, &["mappings[1].name"]),
    (
        "ext-mapping-without-extension.yml",
        false,
        &["mappings[1].extension"],
    ),
    (
        "wrong-enumerations.yml",
        false,
        &["spec.system", "spec.version", "type"],
    ),
    (
        "many-errors.yml",
        false,
        &[
            "grammar",
            "metadata.name",
            "spec.version",
            "mappings[0].name",
            "mappings[0].extension",
            "mappings[1].fhirCondition.operator",
            "mappings[1].openehrCondition.targetAttribute",
            "mappings[1].followedBy.mappings[0].name",
            "mappings[1].reference.resourceType",
        ],
    ),
];

/// Files an earlier version refused and openFHIR accepts: every one parses and validates.
#[test]
fn fc_files_openfhir_accepts_are_accepted() {
    let dir = format!("{}/tests/fixtures/accepted", env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let r = if text.contains("type: context") {
            parse_context(&text, FcFormat::Yaml).map(|_| ())
        } else {
            parse_model(&text, FcFormat::Yaml).map(|_| ())
        };
        assert!(r.is_ok(), "{}: {r:?}", path.display());
        n += 1;
    }
    assert_eq!(n, 6, "every accepted fixture was read");
}

#[test]
fn fc_broken_fixtures_report_every_error_at_once() {
    for &(file, is_context, want) in BROKEN {
        let text = fixture(&format!("broken/{file}"));
        // validate() on the typed document ...
        let errors: Vec<FieldError> = if is_context {
            serde_norway::from_str::<ContextDocument>(&text)
                .unwrap()
                .validate()
                .unwrap_err()
        } else {
            serde_norway::from_str::<ModelDocument>(&text)
                .unwrap()
                .validate()
                .unwrap_err()
        };
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, want, "{file}: {errors:?}");
        assert!(errors.iter().all(|e| !e.message.is_empty()), "{file}");
        // ... and the parse entry points: one "path: message" detail per error.
        let e = if is_context {
            parse_context(&text, FcFormat::Yaml)
                .map(|_| ())
                .unwrap_err()
        } else {
            parse_model(&text, FcFormat::Yaml).map(|_| ()).unwrap_err()
        };
        assert!(
            e.to_string().starts_with("invalid FHIR Connect"),
            "{file}: {e}"
        );
        let d = details(e);
        assert_eq!(d.len(), want.len(), "{file}: {d:?}");
        for (detail, path) in d.iter().zip(want) {
            assert!(detail.starts_with(&format!("{path}: ")), "{file}: {detail}");
        }
    }
}

#[test]
fn fc_malformed_documents() {
    for (text, format, want) in [
        ("a: [", FcFormat::Yaml, "malformed YAML"),
        ("{", FcFormat::Json, "malformed JSON"),
        ("- 1\n- 2\n", FcFormat::Yaml, "not a FHIR Connect document"),
        // A field of the wrong shape cannot be typed.
        (
            "type: model\nmetadata: {name: m}\nmappings: {name: x}\n",
            FcFormat::Yaml,
            "invalid FHIR Connect model",
        ),
    ] {
        let e = parse_model(text, format).unwrap_err();
        assert!(e.to_string().contains(want), "{text:?}: {e}");
    }
    let e = parse_context("type: model\ncontext: {}\n", FcFormat::Yaml).unwrap_err();
    let d = details(e);
    assert!(
        d.iter().any(|x| x.starts_with("type: is \"model\"")),
        "{d:?}"
    );
    assert_eq!(d.len(), 8, "{d:?}");
}
