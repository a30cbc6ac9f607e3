//! The growth chart's context, models and extensions, and helpers that parse them.

use super::*;
use crate::domain::fc_model::{parse_context, parse_model};
use crate::domain::FcFormat;

pub const CONTEXT: &str = include_str!("../../../tests/fixtures/growth_chart.context.yml");
pub const HEIGHT: &str = include_str!("../../../tests/fixtures/height.model.yml");
pub const WEIGHT: &str = include_str!("../../../tests/fixtures/weight.model.yml");
pub const EXT_ADD: &str = include_str!("../../../tests/fixtures/height.ext-add.yml");
pub const EXT_APPEND: &str = include_str!("../../../tests/fixtures/height.ext-append.yml");
pub const EXT_OVERWRITE: &str = include_str!("../../../tests/fixtures/height.ext-overwrite.yml");
pub const OPT: &str = include_str!("../../../tests/fixtures/growth_chart.opt");

pub fn context(text: &str) -> ContextDocument {
    parse_context(text, FcFormat::Yaml).unwrap()
}

/// The given model/extension texts, keyed by `metadata.name`.
pub fn models(texts: &[&str]) -> BTreeMap<String, ModelDocument> {
    texts
        .iter()
        .map(|t| {
            let m = parse_model(t, FcFormat::Yaml).unwrap();
            (m.name().unwrap().to_string(), m)
        })
        .collect()
}

/// The growth chart's two models and three extensions.
pub fn growth_models() -> BTreeMap<String, ModelDocument> {
    models(&[HEIGHT, WEIGHT, EXT_ADD, EXT_APPEND, EXT_OVERWRITE])
}
