//! Unit tests of the mapper compile: the growth chart, extension kinds, warnings and failures.

use super::fixtures::*;
use super::*;

fn names(ms: &[Mapping]) -> Vec<&str> {
    ms.iter().filter_map(|m| m.name.as_deref()).collect()
}

fn model_named(name: &str, archetype: &str) -> String {
    format!("grammar: FHIRConnect/v1.0.0\ntype: model\nmetadata: {{name: {name}, version: 1}}\nspec:\n  system: FHIR\n  version: R4\n  openEhrConfig: {{archetype: {archetype}}}\n  fhirConfig: {{structureDefinition: http://hl7.org/fhir/StructureDefinition/Observation}}\nmappings:\n  - name: a\n    with: {{fhir: x, openehr: $archetype}}\n")
}

fn extension(name: &str, extends: &str, mappings: &str) -> String {
    format!("grammar: FHIRConnect/v1.0.0\ntype: extension\nmetadata: {{name: {name}, version: 1}}\nspec: {{system: FHIR, version: R4, extends: {extends}}}\nmappings:\n{mappings}")
}

#[test]
fn compiles_the_growth_chart_and_merges_extensions() {
    let ctx = context(CONTEXT);
    let models = growth_models();
    let idx = compile(&ctx, &models, true).unwrap();
    assert_eq!(idx.template_id, "growth_chart");
    assert_eq!(
        idx.by_model.keys().collect::<Vec<_>>(),
        ["OBSERVATION.body_weight.v2", "OBSERVATION.height.v2"]
    );
    assert_eq!(
        idx.by_archetype["openEHR-EHR-OBSERVATION.height.v2"],
        ["OBSERVATION.height.v2"]
    );
    assert_eq!(
        idx.merged_extensions,
        [
            "height-ext-add",
            "height-ext-append",
            "height-ext-overwrite"
        ]
    );
    assert!(idx.warnings.is_empty(), "{:?}", idx.warnings);

    let height = &idx.by_model["OBSERVATION.height.v2"];
    // add: a new mapping at the end.
    assert_eq!(
        names(height.mappings()),
        ["height", "comment", "code", "device", "status", "position", "bodySite"]
    );
    // append: the extension's followedBy mappings join the `height` mapping's.
    let h = &height.mappings()[0];
    let children = h.followed_by.as_ref().unwrap().mappings.as_ref().unwrap();
    assert_eq!(names(children), ["unitSystem"]);
    // overwrite: `code` replaced in place (SNOMED instead of LOINC).
    let code = &height.mappings()[2];
    assert_eq!(code.extension.as_deref(), Some("overwrite"));
    let manual = code.manual.as_ref().unwrap();
    assert_eq!(manual[0].name.as_deref(), Some("snomed"));
    // The weight model is untouched.
    assert_eq!(
        **idx.by_model.get("OBSERVATION.body_weight.v2").unwrap(),
        models["OBSERVATION.body_weight.v2"]
    );

    let s = idx.summary();
    assert_eq!(s["models"]["OBSERVATION.height.v2"]["mappings"], 7);
    assert_eq!(
        s["models"]["OBSERVATION.height.v2"]["archetype"],
        "openEHR-EHR-OBSERVATION.height.v2"
    );
    assert_eq!(
        s["by_archetype"]["openEHR-EHR-OBSERVATION.body_weight.v2"][0],
        "OBSERVATION.body_weight.v2"
    );
    assert_eq!(s["merged_extensions"][2], "height-ext-overwrite");
    assert_eq!(s["template_id"], "growth_chart");
    assert_eq!(s["start"], "openEHR-EHR-COMPOSITION.encounter.v1");
}

#[test]
fn inputs_are_not_mutated() {
    let ctx = context(CONTEXT);
    let models = growth_models();
    let (ctx_before, models_before) = (ctx.clone(), models.clone());
    let idx = compile(&ctx, &models, true).unwrap();
    assert_eq!(ctx, ctx_before);
    assert_eq!(models, models_before);
    assert_eq!(models["OBSERVATION.height.v2"].mappings().len(), 6);
    assert!(models["OBSERVATION.height.v2"].mappings()[0]
        .followed_by
        .is_none());
    // Compiling twice gives the same result (nothing accumulated in shared state).
    let again = compile(&ctx, &models, true).unwrap();
    assert_eq!(again.summary(), idx.summary());
    assert_eq!(again.by_model, idx.by_model);
}

#[test]
fn overwrite_replaces_the_mapping_of_the_same_name_without_append_to() {
    // No appendTo at all: openFHIR overwrites by name, at any depth of followedBy.
    let ext = EXT_OVERWRITE.replace("    appendTo: code\n", "");
    assert_ne!(ext, EXT_OVERWRITE);
    let nested = extension(
        "height-ext-nested",
        "OBSERVATION.height.v2",
        "  - name: unitSystem\n    extension: overwrite\n    with: {fhir: \"$resource.value.system\"}\n",
    );
    let mut models = growth_models();
    models.extend(super::fixtures::models(&[&ext, &nested]));
    let ctx = context(&CONTEXT.replace(
        "- height-ext-overwrite",
        "- height-ext-overwrite\n    - height-ext-nested",
    ));
    let idx = compile(&ctx, &models, true).unwrap();
    assert!(idx.warnings.is_empty(), "{:?}", idx.warnings);
    let height = &idx.by_model["OBSERVATION.height.v2"];
    let code = &height.mappings()[2];
    assert_eq!(
        code.manual.as_ref().unwrap()[0].name.as_deref(),
        Some("snomed")
    );
    // `unitSystem` came in by the append, inside height's followedBy; the nested overwrite
    // found it there.
    let unit = &height.mappings()[0]
        .followed_by
        .as_ref()
        .unwrap()
        .mappings
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        unit.with.as_ref().unwrap().fhir.as_deref(),
        Some("$resource.value.system")
    );

    // A name the model does not have: skipped with a warning, the rest compiles.
    let ghost = EXT_OVERWRITE.replace("  - name: code\n", "  - name: ghost\n");
    let mut models = growth_models();
    models.extend(super::fixtures::models(&[&ghost]));
    let idx = compile(&context(CONTEXT), &models, true).unwrap();
    assert_eq!(
        idx.warnings,
        ["extension 'height-ext-overwrite' mapping 'ghost' (overwrite): model 'OBSERVATION.height.v2' has no mapping 'ghost'; not overwritten"]
    );
}

#[test]
fn add_appends_even_a_taken_name() {
    let ext = EXT_ADD.replace("name: bodySite", "name: height");
    let mut models = growth_models();
    models.extend(super::fixtures::models(&[&ext]));
    let idx = compile(&context(CONTEXT), &models, true).unwrap();
    let height = &idx.by_model["OBSERVATION.height.v2"];
    assert_eq!(
        names(height.mappings())
            .iter()
            .filter(|n| **n == "height")
            .count(),
        2
    );
}

#[test]
fn append_adds_conditions_and_followed_by_but_not_with() {
    let ext = extension(
        "height-ext-cond",
        "OBSERVATION.height.v2",
        "  - name: more\n    extension: append\n    appendTo: height\n    with: {fhir: ignored}\n    fhirCondition: {targetRoot: $resource, targetAttribute: status, operator: one of, criteria: final}\n  - name: deeper\n    extension: append\n    appendTo: height.unitSystem\n    followedBy:\n      mappings:\n        - name: grandchild\n  - name: lost\n    extension: append\n    appendTo: nowhere\n",
    );
    let mut models = growth_models();
    models.extend(super::fixtures::models(&[&ext]));
    let ctx = context(&CONTEXT.replace(
        "- height-ext-overwrite",
        "- height-ext-overwrite\n    - height-ext-cond",
    ));
    let idx = compile(&ctx, &models, true).unwrap();
    let h = &idx.by_model["OBSERVATION.height.v2"].mappings()[0];
    assert_eq!(
        h.fhir_condition.as_ref().unwrap().criteria.as_deref(),
        Some("final")
    );
    assert_ne!(h.with.as_ref().unwrap().fhir.as_deref(), Some("ignored"));
    let unit = &h.followed_by.as_ref().unwrap().mappings.as_ref().unwrap()[0];
    assert_eq!(
        names(
            unit.followed_by
                .as_ref()
                .unwrap()
                .mappings
                .as_ref()
                .unwrap()
        ),
        ["grandchild"]
    );
    assert_eq!(
        idx.warnings,
        ["extension 'height-ext-cond' mapping 'lost' (append): appendTo 'nowhere' names no mapping of model 'OBSERVATION.height.v2'; not appended"]
    );
}

#[test]
fn several_models_may_map_one_archetype() {
    let a = model_named(
        "OBSERVATION.height.v2-a",
        "openEHR-EHR-OBSERVATION.height.v2",
    );
    let b = model_named(
        "OBSERVATION.height.v2-b",
        "openEHR-EHR-OBSERVATION.height.v2",
    );
    let mut models = growth_models();
    models.extend(super::fixtures::models(&[&a, &b]));
    let ctx = context(&CONTEXT.replace(
        "- OBSERVATION.body_weight.v2",
        "- OBSERVATION.body_weight.v2\n    - OBSERVATION.height.v2-b\n    - OBSERVATION.height.v2-a",
    ));
    let idx = compile(&ctx, &models, true).unwrap();
    assert_eq!(
        idx.by_archetype["openEHR-EHR-OBSERVATION.height.v2"],
        [
            "OBSERVATION.height.v2",
            "OBSERVATION.height.v2-b",
            "OBSERVATION.height.v2-a"
        ]
    );
    let by_archetype: Vec<&str> = idx
        .resolve("openEHR-EHR-OBSERVATION.height.v2")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        by_archetype,
        [
            "OBSERVATION.height.v2",
            "OBSERVATION.height.v2-b",
            "OBSERVATION.height.v2-a"
        ]
    );
    // A name designates its own model first, then the others of its archetype as a key.
    assert_eq!(
        idx.resolve("OBSERVATION.height.v2-a")[0].0,
        "OBSERVATION.height.v2-a"
    );
}

#[test]
fn what_the_engine_leaves_out_is_a_warning() {
    let ctx = context(
        &CONTEXT
            .replace("- OBSERVATION.body_weight.v2", "- OBSERVATION.missing.v1")
            .replace(
                "- height-ext-add",
                "- height-ext-add\n    - ghost-ext\n    - weight-ext",
            ),
    );
    let weight_ext = extension(
        "weight-ext",
        "OBSERVATION.body_weight.v2",
        "  - name: x\n    extension: add\n",
    );
    let models =
        super::fixtures::models(&[HEIGHT, EXT_ADD, EXT_APPEND, EXT_OVERWRITE, &weight_ext]);
    let idx = compile(&ctx, &models, true).unwrap();
    assert_eq!(
        idx.warnings,
        [
            "model 'OBSERVATION.missing.v1' named in context.archetypes is not uploaded; left out",
            "extension 'ghost-ext' named in context.extensions is not uploaded; left out",
            "extension 'weight-ext' extends 'OBSERVATION.body_weight.v2', which is not among the context's models; not merged",
        ]
    );
    assert_eq!(
        idx.by_model.keys().collect::<Vec<_>>(),
        ["OBSERVATION.height.v2"]
    );
}

#[test]
fn what_the_engine_cannot_get_past_fails_with_every_problem() {
    let no_kind = extension(
        "no-kind",
        "OBSERVATION.height.v2",
        "  - name: x\n    with: {fhir: a}\n",
    );
    let no_append_to = extension(
        "no-append-to",
        "OBSERVATION.height.v2",
        "  - name: y\n    extension: append\n",
    );
    let no_extends = EXT_ADD.replace("  extends: OBSERVATION.height.v2\n", "");
    let bare = "grammar: FHIRConnect/v1.0.0\ntype: model\nmetadata: {name: BARE, version: 1}\nspec: {system: FHIR, version: R4}\n";
    let ctx = context(
        &CONTEXT
            .replace("- OBSERVATION.body_weight.v2", "- BARE")
            .replace(
                "- height-ext-add",
                "- height-ext-add\n    - no-kind\n    - no-append-to",
            ),
    );
    let models = super::fixtures::models(&[HEIGHT, &no_extends, &no_kind, &no_append_to, bare]);
    let e = compile(&ctx, &models, false).unwrap_err();
    assert_eq!(
        e.missing,
        [
            "template 'growth_chart' is not uploaded",
            "model 'BARE' has no spec.openEhrConfig",
            "model 'BARE' has no spec.fhirConfig",
            "extension 'height-ext-add' has no spec.extends",
            "extension 'no-kind' mapping 'x' has no extension kind (add, append or overwrite)",
            "extension 'no-append-to' mapping 'y' (append) has no appendTo",
        ]
    );
    assert!(e
        .to_string()
        .starts_with("cannot compile the mapper: template 'growth_chart' is not uploaded; model"));
}

#[test]
fn a_context_whose_models_are_all_missing_is_refused() {
    let e = compile(&context(CONTEXT), &BTreeMap::new(), true).unwrap_err();
    assert_eq!(
        e.missing,
        ["none of the models named in context.archetypes is uploaded (OBSERVATION.height.v2, OBSERVATION.body_weight.v2)"]
    );
    let e = compile(&ContextDocument::default(), &BTreeMap::new(), true).unwrap_err();
    assert_eq!(
        e.missing,
        ["the context names no model in context.archetypes"]
    );
}

#[test]
fn resolve_by_name_or_archetype() {
    let idx = compile(&context(CONTEXT), &growth_models(), true).unwrap();
    for key in ["OBSERVATION.height.v2", "openEHR-EHR-OBSERVATION.height.v2"] {
        assert_eq!(idx.resolve(key)[0].0, "OBSERVATION.height.v2");
    }
    assert!(idx
        .resolve("openEHR-EHR-COMPOSITION.encounter.v1")
        .is_empty());
}
