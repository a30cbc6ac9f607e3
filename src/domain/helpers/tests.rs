//! Unit tests of the helper tree: the growth chart, slots, cycles, limits and path substitution.

use super::*;
use crate::domain::mapper::compile;
use crate::domain::mapper::fixtures::*;
use serde_json::Value;
use std::sync::Arc;

const SLOTS: &str = include_str!("../../../tests/fixtures/slots.context.yml");
const DEVICE: &str = include_str!("../../../tests/fixtures/device_details.model.yml");
const LOOP_CTX: &str = include_str!("../../../tests/fixtures/loop.context.yml");
const LOOP: &str = include_str!("../../../tests/fixtures/loop.model.yml");

fn template() -> TemplateTree {
    TemplateTree::parse(OPT).unwrap()
}

fn find<'a>(t: &'a HelperTree, model: &str, mapping: &str) -> &'a Helper {
    t.iter()
        .find(|h| h.model() == model && h.mapping() == mapping)
        .unwrap_or_else(|| panic!("no helper {model}/{mapping}"))
}

const H: &str = "/content[openEHR-EHR-OBSERVATION.height.v2]";
const W: &str = "/content[openEHR-EHR-OBSERVATION.body_weight.v2]";

#[test]
fn growth_chart_helpers() {
    let idx = compile(&context(CONTEXT), &growth_models(), true).unwrap();
    let t = build(&idx, &template());
    assert_eq!(t.template_id(), "growth_chart");
    // start is the COMPOSITION: every model of context.archetypes is a root, in order.
    let roots: Vec<_> = t
        .roots()
        .iter()
        .map(|h| format!("{}/{}", h.model(), h.mapping()))
        .collect();
    assert_eq!(roots.len(), 7 + 5);
    assert_eq!(roots[0], "OBSERVATION.height.v2/height");
    assert_eq!(roots[7], "OBSERVATION.body_weight.v2/weight");

    let path = |m: &str, n: &str| {
        let h = find(&t, m, n);
        (
            h.openehr_path().unwrap_or_default().to_string(),
            h.resolved(),
        )
    };
    let hm = "OBSERVATION.height.v2";
    let wm = "OBSERVATION.body_weight.v2";
    let expect = [
        (
            hm,
            "height",
            format!("{H}/data[at0001]/events[at0002]/data[at0003]/items[at0004]"),
            true,
        ),
        (hm, "code", H.to_string(), true),
        (
            hm,
            "device",
            format!("{H}/protocol[at0007]/items[at0011]"),
            true,
        ),
        (
            hm,
            "deviceName",
            format!("{H}/protocol[at0007]/items[at0011]/items[at0012]"),
            true,
        ),
        (
            hm,
            "deviceDetails",
            format!("{H}/protocol[at0007]/items[at0011]/items[at0013]"),
            true,
        ),
        (
            hm,
            "bodySite",
            format!("{H}/protocol[at0007]/items[at0011]/items[at0012]"),
            true,
        ),
        (
            hm,
            "positionCode",
            format!("{H}/data[at0001]/events[at0002]/state[at0013]/items[at0014]"),
            false,
        ),
        (
            wm,
            "time",
            format!("{W}/data[at0002]/events[at0003]/time"),
            true,
        ),
        (
            wm,
            "clothingCode",
            format!("{W}/data[at0002]/events[at0003]/state[at0008]/items[at0025]/value"),
            true,
        ),
        (wm, "subject", "/context".to_string(), true),
    ];
    for (m, n, p, ok) in expect {
        assert_eq!(path(m, n), (p, ok), "{m}/{n}");
    }
    // No openEHR side: no path, nothing to resolve, not reported.
    let status = find(&t, hm, "status");
    assert_eq!((status.openehr_path(), status.resolved()), (None, false));
    assert_eq!(status.fhir_path(), Some("$resource.status"));
    // The appended followedBy mapping hangs under `height`.
    assert_eq!(t.roots()[0].children()[0].mapping(), "unitSystem");
    // The overwritten `code` mapping is the extension's.
    assert!(t.iter().all(|h| h.state().is_empty()));

    assert_eq!(
        t.unresolved(),
        [
            format!("slot: {hm}/deviceDetails: 'CLUSTER.device_details.v1' names no model of the context"),
            format!("{hm}/positionCode: {H}/data[at0001]/events[at0002]/state[at0013]/items[at0014]"),
        ]
    );
}

#[test]
fn slot_pulls_another_model() {
    let models = models(&[HEIGHT, DEVICE]);
    let idx = compile(&context(SLOTS), &models, true).unwrap();
    let t = build(&idx, &template());
    // start names the height model: only its mappings are roots.
    assert!(t
        .roots()
        .iter()
        .all(|h| h.model() == "OBSERVATION.height.v2"));
    assert_eq!(t.roots().len(), 6);
    let slot = find(&t, "OBSERVATION.height.v2", "deviceDetails");
    let pulled: Vec<_> = slot
        .children()
        .iter()
        .map(|h| (h.model(), h.mapping(), h.resolved()))
        .collect();
    assert_eq!(
        pulled,
        [
            ("CLUSTER.device_details.v1", "details", true),
            ("CLUSTER.device_details.v1", "serial", false)
        ]
    );
    // `$archetype` of the slotted model is the slot (the template has no node of its own).
    let slot_path = format!("{H}/protocol[at0007]/items[at0011]/items[at0013]");
    assert_eq!(slot.children()[0].openehr_path(), Some(&*slot_path));
    assert_eq!(
        t.unresolved(),
        [
            format!("CLUSTER.device_details.v1/serial: {slot_path}/items[at0001]/value"),
            format!("OBSERVATION.height.v2/positionCode: {H}/data[at0001]/events[at0002]/state[at0013]/items[at0014]"),
        ]
    );
}

#[test]
fn a_model_slotting_itself_is_not_expanded_again() {
    let idx = compile(&context(LOOP_CTX), &models(&[LOOP]), true).unwrap();
    let t = build(&idx, &template());
    assert_eq!(t.roots().len(), 1);
    let again = &t.roots()[0];
    assert_eq!(again.openehr_path(), Some("/context/other_context[at0001]"));
    assert!(again.resolved());
    assert!(again.children().is_empty());
    assert_eq!(
        t.unresolved(),
        [
            "archetype: model 'CLUSTER.loop.v1': archetype 'openEHR-EHR-CLUSTER.loop.v1' is not in the template",
            "cycle: CLUSTER.loop.v1/again: CLUSTER.loop.v1 -> CLUSTER.loop.v1 is not expanded again",
        ]
    );
}

#[test]
fn depth_is_bounded() {
    let mut idx = compile(&context(CONTEXT), &growth_models(), true).unwrap();
    // A followedBy chain 40 deep under `comment`.
    let mut m = Mapping {
        name: Some("leaf".into()),
        ..Mapping::default()
    };
    for i in 0..40 {
        m = Mapping {
            name: Some(format!("n{i}")),
            followed_by: Some(crate::domain::fc_model::FollowedBy {
                mappings: Some(vec![m]),
                ..Default::default()
            }),
            ..Mapping::default()
        };
    }
    let mut height = (*idx.by_model["OBSERVATION.height.v2"]).clone();
    height.mappings.as_mut().unwrap()[1].followed_by = m.followed_by;
    idx.by_model
        .insert("OBSERVATION.height.v2".into(), Arc::new(height));
    let t = build(&idx, &template());
    let mut h: &Helper = &t.roots()[1];
    let mut levels = 1;
    while let Some(c) = h.children().first() {
        h = c;
        levels += 1;
    }
    assert_eq!(levels, MAX_DEPTH);
    assert!(t.unresolved().iter().any(|u| u.starts_with("depth: ")));
}

#[test]
fn clones_are_isolated() {
    let idx = compile(&context(CONTEXT), &growth_models(), true).unwrap();
    let original = build(&idx, &template());
    let snapshot = build(&idx, &template());
    let mut copy = original.clone();
    copy.get_mut(&[0])
        .unwrap()
        .state_mut()
        .insert("value".into(), Value::from(1.8));
    copy.get_mut(&[0, 0])
        .unwrap()
        .state_mut()
        .insert("seen".into(), Value::Bool(true));
    copy.get_mut(&[0])
        .unwrap()
        .set_openehr_path(Some("/changed"));
    copy.unresolved_mut().clear();
    assert_eq!(original, snapshot);
    assert!(original.roots()[0].state().is_empty());
    assert!(original.roots()[0].children()[0].state().is_empty());
    assert_eq!(copy.get(&[0]).unwrap().openehr_path(), Some("/changed"));
    assert_eq!(
        copy.get(&[0, 0]).unwrap().state()["seen"],
        Value::Bool(true)
    );
    assert!(copy.unresolved().is_empty() && !original.unresolved().is_empty());
    assert_ne!(copy, original);
    // Building again gives the same tree: nothing was written into the index.
    assert_eq!(build(&idx, &template()), original);
}

#[test]
fn a_copy_shares_every_node_until_it_writes_and_then_copies_only_the_path() {
    let idx = compile(&context(CONTEXT), &growth_models(), true).unwrap();
    let original = build(&idx, &template());
    let mut copy = original.clone();
    // A fresh copy shares the root list itself.
    assert!(std::ptr::eq(copy.roots(), original.roots()));

    let path = copy
        .find_path(|h| h.mapping() == "unitSystem")
        .expect("unitSystem hangs under height");
    assert_eq!(path, [0, 0]);
    copy.get_mut(&path)
        .unwrap()
        .state_mut()
        .insert("unit".into(), Value::from("cm"));

    // The path (root 0, its child 0) was copied; every other root and every sibling is shared.
    assert_only_the_path_is_copied(&copy, &original, &path);
    assert!(original.iter().all(|h| h.state().is_empty()));

    // A second write on the same path copies nothing more.
    let before = Arc::as_ptr(&copy.roots()[0]);
    copy.get_mut(&path)
        .unwrap()
        .set_fhir_path(Some("$resource.x"));
    assert_eq!(Arc::as_ptr(&copy.roots()[0]), before);

    // A bad path copies nothing.
    let mut other = original.clone();
    assert!(other.get_mut(&[0, 99]).is_none());
    assert!(other.get_mut(&[]).is_none());
    assert!(std::ptr::eq(other.roots(), original.roots()));
}

/// Along `path`, `copy` holds its own nodes and shares every sibling with `original`; below the
/// last node, the children are shared again.
fn assert_only_the_path_is_copied(copy: &HelperTree, original: &HelperTree, path: &[usize]) {
    let (mut a, mut b) = (copy.roots(), original.roots());
    for (depth, &step) in path.iter().enumerate() {
        assert_eq!(a.len(), b.len());
        for i in 0..a.len() {
            assert_eq!(
                Arc::ptr_eq(&a[i], &b[i]),
                i != step,
                "depth {depth}, index {i}, path {path:?}"
            );
        }
        (a, b) = (a[step].children(), b[step].children());
    }
    assert!(a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y)));
}

#[test]
fn a_write_at_the_deepest_level_copies_only_its_path() {
    let mut idx = compile(&context(CONTEXT), &growth_models(), true).unwrap();
    // A followedBy chain 40 deep under `comment`, with a sibling at every level.
    let leaf = |name: &str| Mapping {
        name: Some(name.into()),
        ..Mapping::default()
    };
    let mut m = leaf("leaf");
    for i in 0..40 {
        m = Mapping {
            name: Some(format!("n{i}")),
            followed_by: Some(crate::domain::fc_model::FollowedBy {
                mappings: Some(vec![leaf(&format!("s{i}")), m]),
                ..Default::default()
            }),
            ..Mapping::default()
        };
    }
    let mut height = (*idx.by_model["OBSERVATION.height.v2"]).clone();
    height.mappings.as_mut().unwrap()[1].followed_by = m.followed_by;
    idx.by_model
        .insert("OBSERVATION.height.v2".into(), Arc::new(height));
    let original = build(&idx, &template());
    let path = original.deepest_path();
    assert_eq!(path.len(), MAX_DEPTH);
    let mut copy = original.clone();
    copy.get_mut(&path)
        .unwrap()
        .state_mut()
        .insert("x".into(), Value::from(1));
    assert_only_the_path_is_copied(&copy, &original, &path);
    assert!(original.iter().all(|h| h.state().is_empty()));
    assert_eq!(copy.iter().filter(|h| !h.state().is_empty()).count(), 1);
    // Two copies written at the same node stay apart.
    let mut other = original.clone();
    other
        .get_mut(&path)
        .unwrap()
        .state_mut()
        .insert("x".into(), Value::from(2));
    assert_eq!(copy.get(&path).unwrap().state()["x"], 1);
    assert_eq!(other.get(&path).unwrap().state()["x"], 2);
}

#[test]
fn the_json_is_what_the_owned_tree_serialized() {
    // Written by the tree before its nodes were shared (plain `String`s and `Vec<Helper>`):
    // `GET /fc/helpers/{id}` must answer the same bytes.
    let golden = include_str!("../../../tests/fixtures/growth_chart.helpers.json");
    let idx = compile(&context(CONTEXT), &growth_models(), true).unwrap();
    let t = build(&idx, &template());
    assert_eq!(serde_json::to_string(&t).unwrap(), golden.trim_end());
    // A copy with state serializes it in place.
    let mut c = t.clone();
    c.get_mut(&[0, 0])
        .unwrap()
        .state_mut()
        .insert("k".into(), Value::from(1));
    let v = serde_json::to_value(&c).unwrap();
    assert_eq!(v["roots"][0]["children"][0]["state"]["k"], 1);
}

#[test]
fn path_helpers() {
    assert_eq!(parent("/a[x/y]/b"), Some("/a[x/y]"));
    assert_eq!(parent("/a"), Some("/"));
    assert_eq!(parent("/"), None);
    assert_eq!(join("/", "/context"), "/context");
    assert_eq!(join("/a", ""), "/a");
    assert!(is_under("/a/b", "/a") && !is_under("/ab", "/a") && is_under("/a", "/"));
    let s = Scope::default();
    assert_eq!(substitute("$archetype/x", &s, "/"), "$archetype/x");
    assert_eq!(substitute("$composition", &s, "/"), "/");
    assert_eq!(substitute("$fhirRoot.x", &s, "/"), "$fhirRoot.x");
}
