//! The upload rules, openFHIR's: every problem found in a document, as a field path and what is
//! wrong, the first [`MAX_FIELD_ERRORS`] listed in full.

use super::{Condition, ContextDocument, ExtensionKind, Mapping, Metadata, ModelDocument, Spec};

/// One validation problem: the dotted field path (`mappings[3].with.fhir`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path to the field, with `[i]` list indexes.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Most validation problems listed for one document; the rest are counted in one last entry.
/// Each problem is a path and a message of up to a few hundred bytes, from as little as 3 bytes
/// of text (`{},`), so listing them all made 1 MB of `{}` mappings hold 1.4 million of them; no
/// one reads past the first screenful anyway.
pub const MAX_FIELD_ERRORS: usize = 100;

/// The problems found so far: the first [`MAX_FIELD_ERRORS`] in full, and how many in all.
struct Errors(Vec<FieldError>, usize);

impl Errors {
    fn new() -> Self {
        Errors(Vec::new(), 0)
    }
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.1 += 1;
        if self.0.len() < MAX_FIELD_ERRORS {
            self.0.push(FieldError {
                path: path.into(),
                message: message.into(),
            });
        }
    }
    /// A required field: present (any value, empty text included, as the schemas read it).
    fn require<T>(&mut self, v: &Option<T>, path: &str, why: &str) {
        if v.is_none() {
            self.push(path, format!("is missing: {why}"));
        }
    }
    /// An enumeration openFHIR's reader compares exactly.
    fn one_of(&mut self, v: &Option<String>, path: &str, allowed: &[&str]) {
        match v {
            None => self.push(
                path,
                format!("is missing: expected one of {}", list(allowed)),
            ),
            Some(s) if !allowed.contains(&s.as_str()) => self.push(
                path,
                format!(
                    "is {s:?}; expected one of {} (exactly, case included)",
                    list(allowed)
                ),
            ),
            Some(_) => {}
        }
    }
    fn finish(mut self) -> std::result::Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            return Ok(());
        }
        let more = self.1 - self.0.len();
        if more > 0 {
            self.0.push(FieldError {
                path: "(more)".to_string(),
                message: format!("{more} more problems not listed (fix the ones above first)"),
            });
        }
        Err(self.0)
    }
}

fn list(allowed: &[&str]) -> String {
    allowed
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The FHIR versions a document's `spec.version` may name.
pub const FHIR_VERSIONS: [&str; 4] = ["R4", "R4B", "R5", "STU3"];

/// `grammar`: `FHIRConnect/v` and a three-part version number.
fn grammar_ok(g: &str) -> bool {
    let Some(v) = g.strip_prefix("FHIRConnect/v") else {
        return false;
    };
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A URI reference as `java.net.URI` accepts one (the schema's `format: uri`): no whitespace,
/// control characters or `<>"{}|\^\``, and every `%` followed by two hex digits.
fn uri_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
                continue;
            }
            c if c <= b' ' || c == 0x7f => return false,
            b'<' | b'>' | b'"' | b'{' | b'}' | b'|' | b'\\' | b'^' | b'`' => return false,
            _ => {}
        }
        i += 1;
    }
    true
}

/// The fields every document has: `grammar`, `metadata`, `spec.system` and `spec.version`.
fn validate_common(
    grammar: &Option<String>,
    metadata: &Option<Metadata>,
    spec: &Option<Spec>,
    e: &mut Errors,
) {
    match grammar {
        None => e.push("grammar", "is missing: expected FHIRConnect/vX.Y.Z"),
        Some(g) if !grammar_ok(g) => e.push(
            "grammar",
            format!("is {g:?}; expected FHIRConnect/v followed by a version such as 1.0.0"),
        ),
        Some(_) => {}
    }
    match metadata {
        None => e.push(
            "metadata",
            "is missing: give metadata.name and metadata.version",
        ),
        Some(m) => {
            e.require(&m.name, "metadata.name", "every document needs a name");
            e.require(
                &m.version,
                "metadata.version",
                "every document needs a version",
            );
        }
    }
    match spec {
        None => e.push(
            "spec",
            "is missing: give spec.system (FHIR) and spec.version",
        ),
        Some(s) => {
            e.one_of(&s.system, "spec.system", &["FHIR"]);
            e.one_of(&s.version, "spec.version", &FHIR_VERSIONS);
        }
    }
}

impl ContextDocument {
    /// Checks the context against openFHIR's rules (see the [module docs](super)); returns every
    /// problem found.
    pub fn validate(&self) -> std::result::Result<(), Vec<FieldError>> {
        let mut e = Errors::new();
        validate_common(&self.grammar, &self.metadata, &self.spec, &mut e);
        e.one_of(&self.kind, "type", &["context"]);
        match &self.context {
            None => e.push("context", "is missing: a context document needs a context"),
            Some(c) => {
                e.require(&c.profile, "context.profile", "name the FHIR profile");
                e.require(
                    &c.template,
                    "context.template",
                    "name the OPT this context maps",
                );
                e.require(
                    &c.archetypes,
                    "context.archetypes",
                    "list the models it uses",
                );
                e.require(
                    &c.start,
                    "context.start",
                    "name the root model or archetype id",
                );
            }
        }
        e.finish()
    }
}

impl ModelDocument {
    /// Checks the model or extension against openFHIR's rules (see the [module docs](super));
    /// returns every problem found.
    pub fn validate(&self) -> std::result::Result<(), Vec<FieldError>> {
        let mut e = Errors::new();
        validate_common(&self.grammar, &self.metadata, &self.spec, &mut e);
        e.one_of(&self.kind, "type", &["model", "extension"]);
        if let Some(spec) = &self.spec {
            if let Some(o) = &spec.open_ehr_config {
                e.require(
                    &o.archetype,
                    "spec.openEhrConfig.archetype",
                    "name the archetype the model maps",
                );
            }
            if let Some(f) = &spec.fhir_config {
                match &f.structure_definition {
                    None => e.push(
                        "spec.fhirConfig.structureDefinition",
                        "is missing: name the FHIR profile the model maps",
                    ),
                    Some(sd) if !uri_ok(sd) => e.push(
                        "spec.fhirConfig.structureDefinition",
                        format!("is {sd:?}, not a URI"),
                    ),
                    Some(_) => {}
                }
            }
        }
        if let Some(p) = &self.preprocessor {
            if let Some(c) = &p.fhir_condition {
                validate_condition(c, "preprocessor.fhirCondition", false, &mut e);
            }
            if let Some(c) = &p.openehr_condition {
                validate_condition(c, "preprocessor.openehrCondition", true, &mut e);
            }
        }
        for (i, m) in self.mappings().iter().enumerate() {
            validate_mapping(m, &format!("mappings[{i}]"), &mut e);
        }
        e.finish()
    }
}

fn validate_condition(c: &Condition, at: &str, openehr: bool, e: &mut Errors) {
    e.require(
        &c.target_root,
        &format!("{at}.targetRoot"),
        "say where it is evaluated",
    );
    e.require(
        &c.operator,
        &format!("{at}.operator"),
        "say how it compares",
    );
    if openehr && c.target_attribute.is_none() && c.target_attributes.is_none() {
        e.push(
            format!("{at}.targetAttribute"),
            "is missing: give targetAttribute or targetAttributes",
        );
    }
}

fn validate_mapping(m: &Mapping, at: &str, e: &mut Errors) {
    e.require(&m.name, &format!("{at}.name"), "every mapping needs a name");
    if let Some(x) = &m.extension {
        if ExtensionKind::parse(x).is_none() {
            e.push(
                format!("{at}.extension"),
                format!(
                    "is {x:?}; expected one of {} (exactly, case included)",
                    list(&ExtensionKind::NAMES)
                ),
            );
        }
    }
    if let Some(c) = &m.fhir_condition {
        validate_condition(c, &format!("{at}.fhirCondition"), false, e);
    }
    if let Some(c) = &m.openehr_condition {
        validate_condition(c, &format!("{at}.openehrCondition"), true, e);
    }
    if let Some(f) = &m.followed_by {
        let at = format!("{at}.followedBy");
        match &f.mappings {
            None => e.push(
                format!("{at}.mappings"),
                "is missing: list the child mappings",
            ),
            Some(list) => validate_list(list, &at, e),
        }
    }
    if let Some(r) = &m.reference {
        let at = format!("{at}.reference");
        e.require(
            &r.resource_type,
            &format!("{at}.resourceType"),
            "name the referenced resource type",
        );
        match &r.mappings {
            None => e.push(
                format!("{at}.mappings"),
                "is missing: list the mappings of the reference",
            ),
            Some(list) => validate_list(list, &at, e),
        }
    }
}

fn validate_list(list: &[Mapping], at: &str, e: &mut Errors) {
    for (i, m) in list.iter().enumerate() {
        validate_mapping(m, &format!("{at}.mappings[{i}]"), e);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{details, model};
    use super::*;
    use crate::domain::fc_model::parse_model;
    use crate::domain::fhir_connect::FcFormat;

    #[test]
    fn nested_errors_are_all_reported() {
        let yaml = "spec: {system: FHIR, version: R4, openEhrConfig: {archetype: a}}\nmappings:\n  - name: x\n    with: {fhir: f}\n    followedBy:\n      mappings:\n        - with: {}\n          extension: Add\n          fhirCondition: {targetRoot: r}\n";
        let d = details(
            parse_model(
                &format!("grammar: FHIRConnect/v1.0.0\ntype: model\nmetadata: {{name: m, version: '1'}}\n{yaml}"),
                FcFormat::Yaml,
            )
            .unwrap_err(),
        );
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].starts_with("mappings[0].followedBy.mappings[0].name:"));
        assert!(d[1].starts_with("mappings[0].followedBy.mappings[0].extension:"));
        assert!(d[2].starts_with("mappings[0].followedBy.mappings[0].fhirCondition.operator:"));
    }

    #[test]
    fn what_openfhir_accepts_is_accepted() {
        // Directions in any case, and text that is no direction at all.
        for u in ["openEHR->fhir", "fhir->openEHR", "OPENEHR->FHIR", "both"] {
            model(&format!(
                "mappings:\n  - name: a\n    with: {{fhir: f}}\n    unidirectional: {u}\n"
            ))
            .unwrap();
        }
        // An overwrite without appendTo; an append and a followedBy mapping without `with`.
        let ext = "grammar: FHIRConnect/v1.0.0\ntype: extension\nmetadata: {name: e, version: 1}\nspec: {system: FHIR, version: R4, extends: m}\nmappings:\n  - name: code\n    extension: overwrite\n    with: {fhir: f}\n  - name: more\n    extension: append\n    appendTo: code\n    followedBy:\n      mappings:\n        - name: child\n          manual: []\n";
        parse_model(ext, FcFormat::Yaml).unwrap();
        // Numbers where text is expected, empty names, no mappings at all.
        parse_model(
            "grammar: FHIRConnect/v0.0.1\ntype: model\nmetadata: {name: '', version: 1.0}\nspec: {system: FHIR, version: STU3}\n",
            FcFormat::Yaml,
        )
        .unwrap();
    }

    #[test]
    fn what_openfhir_refuses_is_refused() {
        let d = details(parse_model("type: Model\n", FcFormat::Yaml).unwrap_err());
        let joined = d.join("\n");
        for field in ["grammar:", "metadata:", "spec:", "type:"] {
            assert!(joined.contains(field), "{field} in {joined}");
        }
        let d = details(
            parse_model(
                "grammar: FHIRConnect/1.0\ntype: model\nmetadata: {name: m}\nspec: {system: fhir, version: r4, fhirConfig: {structureDefinition: 'not a uri'}}\n",
                FcFormat::Yaml,
            )
            .unwrap_err(),
        );
        assert_eq!(d.len(), 5, "{d:?}");
        let d = details(
            model("mappings:\n  - name: a\n    openehrCondition: {targetRoot: r, operator: one of}\n    reference: {mappings: []}\n    followedBy: {}\n")
                .unwrap_err(),
        );
        assert_eq!(
            d,
            [
                "mappings[0].openehrCondition.targetAttribute: is missing: give targetAttribute or targetAttributes",
                "mappings[0].followedBy.mappings: is missing: list the child mappings",
                "mappings[0].reference.resourceType: is missing: name the referenced resource type",
            ]
        );
    }

    #[test]
    fn grammar_and_uri_rules() {
        assert!(grammar_ok("FHIRConnect/v1.0.0"));
        assert!(grammar_ok("FHIRConnect/v10.20.300"));
        for bad in [
            "FHIRConnect/1.0.0",
            "FHIRConnect/v1.0",
            "fhirconnect/v1.0.0",
            "FHIRConnect/v1.0.0a",
        ] {
            assert!(!grammar_ok(bad), "{bad}");
        }
        assert!(uri_ok(
            "http://hl7.org/fhir/StructureDefinition/Observation"
        ));
        assert!(uri_ok("urn:oid:1.2.3"));
        assert!(uri_ok("a%20b"));
        for bad in ["a b", "a%2", "a%zz", "<x>", "a\"b"] {
            assert!(!uri_ok(bad), "{bad}");
        }
    }
}
