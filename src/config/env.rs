//! Environment overrides: `CTXGATE__SECTION__KEY=value` sets `section.key` in the parsed TOML
//! tree before it is deserialised; array elements are addressed by index
//! (`CTXGATE__UPSTREAMS__0__BASE_URL`). The environment is injected so tests never mutate the
//! process's own.

use std::collections::BTreeMap;

use super::{Issues, ENV_PREFIX};

/// Where overrides and `api_key_env` values are read from.
pub trait EnvSource: Send + Sync {
    fn var(&self, name: &str) -> Option<String>;
    /// Every `(name, value)` whose name starts with `prefix`.
    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)>;
}

/// The process environment.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        std::env::vars().filter(|(k, _)| k.starts_with(prefix)).collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }

    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Applies every `CTXGATE__...` variable to `root`; returns the key path each one set, so a
/// later problem at that key can name its variable. A variable that cannot be applied is an
/// issue.
pub(super) fn apply_overrides(
    root: &mut toml::Value,
    env: &dyn EnvSource,
    issues: &mut Issues,
) -> Vec<(Vec<String>, String)> {
    let mut vars = env.vars_with_prefix(ENV_PREFIX);
    vars.sort();
    let mut applied = Vec::new();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
        match set_path(root, &path, parse_scalar(&raw)) {
            Ok(()) => applied.push((path, name)),
            Err(message) => issues.push(path.join("."), format!("from {name}: {message}")),
        }
    }
    applied
}

/// A TOML literal when the value is one (`5`, `true`, `["a"]`), else the raw string.
fn parse_scalar(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(node: &mut toml::Value, path: &[String], value: toml::Value) -> Result<(), String> {
    let Some((head, rest)) = path.split_first() else {
        *node = value;
        return Ok(());
    };
    if head.is_empty() {
        return Err("empty key segment".into());
    }
    match node {
        toml::Value::Table(table) => {
            let child = table.entry(head.clone()).or_insert_with(|| {
                if rest.first().is_some_and(|s| s.parse::<usize>().is_ok()) {
                    toml::Value::Array(Vec::new())
                } else {
                    toml::Value::Table(toml::Table::new())
                }
            });
            set_path(child, rest, value)
        }
        toml::Value::Array(items) => {
            let index: usize = head.parse().map_err(|_| format!("`{head}` is not an array index"))?;
            if index > items.len() {
                return Err(format!("index {index} skips past the end of a list of {}", items.len()));
            }
            if index == items.len() {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            set_path(&mut items[index], rest, value)
        }
        _ => Err(format!("`{head}` is inside a value that is not a table")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn overrides_nested_keys_and_types() {
        let e = env(&[
            ("CTXGATE__SERVER__LISTEN", "0.0.0.0:9999"),
            ("CTXGATE__SERVER__MAX_BODY_BYTES", "1024"),
            ("CTXGATE__RETRY__BASE_DELAY", "5ms"),
        ]);
        let config = Config::parse("", &e).unwrap();
        assert_eq!(config.server.listen.port(), 9999);
        assert_eq!(config.server.max_body_bytes.get(), 1024);
        assert_eq!(config.retry.base_delay.as_millis(), 5);
    }

    #[test]
    fn overrides_array_elements_by_index() {
        let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://a/v1\"\n";
        let e = env(&[("CTXGATE__UPSTREAMS__0__BASE_URL", "http://b/v1")]);
        let config = Config::parse(text, &e).unwrap();
        assert_eq!(config.upstreams[0].base_url, "http://b/v1");
    }

    #[test]
    fn other_variables_are_ignored() {
        let e = env(&[("CTXGATEX", "1"), ("PATH", "/bin")]);
        assert!(Config::parse("", &e).is_ok());
    }

    #[test]
    fn bad_index_is_reported() {
        let e = env(&[("CTXGATE__UPSTREAMS__3__NAME", "x")]);
        let err = Config::parse("", &e).unwrap_err();
        assert!(err.to_string().contains("upstreams"), "{err}");
    }
}
