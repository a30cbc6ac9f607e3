//! The layered sources (defaults < file < environment) as a figment, read one key at a time so
//! every error names the variable or file key it came from; and [`describe`], the effective
//! settings for the startup log.

use std::collections::BTreeMap;
use std::path::Path;

use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::secret::mask_url;
use super::vars::{Var, VARS};
use super::{Config, ConfigError};

fn var_by_key(key: &str) -> &'static Var {
    VARS.iter()
        .find(|v| v.key == key)
        .unwrap_or_else(|| panic!("config key {key} missing from VARS"))
}

pub(super) fn defaults() -> Dict {
    let mut root = Dict::new();
    for v in VARS {
        insert_nested(&mut root, v.key, Value::from(v.default.to_string()));
    }
    root
}

fn insert_nested(root: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            root.insert(key.to_string(), value);
        }
        Some((head, rest)) => {
            let entry = root
                .entry(head.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, dict) = entry {
                insert_nested(dict, rest, value);
            }
        }
    }
}

/// The environment as a figment provider: only the variables in [`VARS`], as raw strings
/// (figment's own `Env` would read `[::1][7800]` as an array).
pub(super) struct EnvVars(Dict);

impl EnvVars {
    pub(super) fn read(env: impl Fn(&str) -> Option<String>) -> Self {
        let mut root = Dict::new();
        for v in VARS {
            if let Some(value) = env(v.env) {
                insert_nested(&mut root, v.key, Value::from(value));
            }
        }
        EnvVars(root)
    }
}

const ENV_SOURCE: &str = "environment";

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE)
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Map::from([(Profile::Default, self.0.clone())]))
    }
}

/// The merged sources, read one key at a time so errors can name their origin.
pub(super) struct Raw<'a> {
    pub(super) figment: Figment,
    pub(super) file: Option<&'a Path>,
}

impl Raw<'_> {
    pub(super) fn parse<T>(
        &self,
        key: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let var = var_by_key(key);
        let value = self
            .figment
            .find_value(key)
            .map_err(|e| self.file_error(e))?;
        let (text, source_name) = (self.text(&value, var)?, self.source_name(&value, var));
        f(&text).map_err(|reason| ConfigError::Invalid {
            source_name,
            // Never echo a secret in an error message.
            value: match key {
                "database.url" => mask_url(&text),
                "http.api_token" | "cluster.secret" => "***".to_string(),
                _ => text,
            },
            reason,
        })
    }

    /// True when `key` was given (in the environment or the file), false when it has its
    /// built-in default: for the defaults that depend on another setting.
    pub(super) fn is_set(&self, key: &str) -> bool {
        self.figment.find_value(key).is_ok_and(|value| {
            self.figment.get_metadata(value.tag()).is_some_and(|m| {
                m.name == ENV_SOURCE || matches!(m.source, Some(figment::Source::File(_)))
            })
        })
    }

    fn source_name(&self, value: &Value, var: &Var) -> String {
        let from_env = self
            .figment
            .get_metadata(value.tag())
            .is_some_and(|m| m.name == ENV_SOURCE);
        match (from_env, self.file) {
            (false, Some(file))
                if self
                    .figment
                    .get_metadata(value.tag())
                    .is_some_and(|m| m.source.is_some()) =>
            {
                format!("{} (in {})", var.key, file.display())
            }
            _ => var.env.to_string(),
        }
    }

    /// A scalar as text; a list of strings (TOML `initial_hosts = [...]`) joined with commas.
    fn text(&self, value: &Value, var: &Var) -> Result<String, ConfigError> {
        match value {
            Value::String(_, s) => Ok(s.clone()),
            Value::Char(_, c) => Ok(c.to_string()),
            Value::Bool(_, b) => Ok(b.to_string()),
            Value::Num(_, n) => Ok(num_text(n)),
            Value::Array(_, items) => items
                .iter()
                .map(|i| self.text(i, var))
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.join(",")),
            other => Err(ConfigError::Invalid {
                source_name: self.source_name(value, var),
                value: format!("{other:?}"),
                reason: "expected a single value".into(),
            }),
        }
    }

    fn file_error(&self, e: figment::Error) -> ConfigError {
        ConfigError::File {
            path: self.file.map(Path::to_path_buf).unwrap_or_default(),
            reason: e.to_string(),
        }
    }
}

fn num_text(n: &figment::value::Num) -> String {
    use figment::value::Num;
    match *n {
        Num::U8(v) => v.to_string(),
        Num::U16(v) => v.to_string(),
        Num::U32(v) => v.to_string(),
        Num::U64(v) => v.to_string(),
        Num::U128(v) => v.to_string(),
        Num::USize(v) => v.to_string(),
        Num::I8(v) => v.to_string(),
        Num::I16(v) => v.to_string(),
        Num::I32(v) => v.to_string(),
        Num::I64(v) => v.to_string(),
        Num::I128(v) => v.to_string(),
        Num::ISize(v) => v.to_string(),
        Num::F32(v) => v.to_string(),
        Num::F64(v) => v.to_string(),
    }
}

/// The effective settings as `(env var, shown value)` pairs, secrets masked, for startup logs.
pub fn describe(config: &Config) -> BTreeMap<&'static str, String> {
    let json = config.to_json();
    VARS.iter()
        .map(|v| {
            let mut node = &json;
            for part in v.key.split('.') {
                node = &node[part];
            }
            let shown = match node {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                serde_json::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                other => other.to_string(),
            };
            (v.env, shown)
        })
        .collect()
}
