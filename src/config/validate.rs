//! Semantic checks over a parsed [`Config`]: every problem is collected with its key path and
//! reported at once, so an operator fixes a file in one pass.

use std::collections::HashSet;
use std::fmt;

use http::{HeaderName, HeaderValue, Uri};

use super::{Config, EnvSource};

/// One problem at one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
}

impl Issue {
    pub fn new(path: &str, message: impl Into<String>) -> Self {
        Self { path: path.to_string(), message: message.into() }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigError(pub Vec<Issue>);

impl ConfigError {
    pub fn single(path: &str, message: impl Into<String>) -> Self {
        Self(vec![Issue::new(path, message)])
    }

    pub(super) fn from_issues(issues: Vec<Issue>) -> Result<(), Self> {
        if issues.is_empty() {
            Ok(())
        } else {
            Err(Self(issues))
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Checks what serde cannot: references, URLs, header syntax, secrets present.
    pub fn validate(&self, env: &dyn EnvSource) -> Result<(), ConfigError> {
        let mut issues = Vec::new();
        let mut push = |path: String, message: String| issues.push(Issue { path, message });

        if self.upstreams.is_empty() {
            push("upstreams".into(), "at least one upstream is required".into());
        }
        let mut names = HashSet::new();
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let at = |key: &str| format!("upstreams[{i}].{key}");
            if upstream.name.is_empty() {
                push(at("name"), "must not be empty".into());
            } else if !names.insert(upstream.name.as_str()) {
                push(at("name"), format!("duplicate upstream name `{}`", upstream.name));
            }
            if let Err(message) = check_base_url(&upstream.base_url) {
                push(at("base_url"), message);
            }
            if let Some(var) = &upstream.api_key_env {
                if env.var(var).is_none_or(|v| v.is_empty()) {
                    push(at("api_key_env"), format!("environment variable {var} is not set"));
                }
            }
            for (name, value) in &upstream.headers {
                if HeaderName::try_from(name.as_str()).is_err() {
                    push(at("headers"), format!("`{name}` is not a valid header name"));
                }
                if HeaderValue::try_from(value.as_str()).is_err() {
                    push(at("headers"), format!("the value of `{name}` is not a valid header value"));
                }
            }
            for (key, value) in [
                ("connect_timeout", upstream.connect_timeout),
                ("first_byte_timeout", upstream.first_byte_timeout),
                ("idle_timeout", upstream.idle_timeout),
            ] {
                if value.is_zero() {
                    push(at(key), "must be greater than zero".into());
                }
            }
        }

        super::pool::validate_pools(&self.upstreams).into_iter().for_each(|i| push(i.path, i.message));

        for (i, route) in self.routes.iter().enumerate() {
            if route.models.is_empty() {
                push(format!("routes[{i}].models"), "must name at least one model or glob".into());
            }
            for (j, pattern) in route.models.iter().enumerate() {
                if let Err(e) = globset::Glob::new(pattern) {
                    push(format!("routes[{i}].models[{j}]"), format!("invalid glob: {e}"));
                }
            }
            if route.upstreams.is_empty() {
                push(format!("routes[{i}].upstreams"), "must name at least one upstream".into());
            }
            for (j, name) in route.upstreams.iter().enumerate() {
                if !self.upstreams.iter().any(|u| &u.name == name) {
                    push(format!("routes[{i}].upstreams[{j}]"), format!("no upstream is named `{name}`"));
                }
            }
        }

        let store = &self.sessions.store;
        if store.starts_with("rediss+cluster://") {
            push(
                "sessions.store".into(),
                "TLS to a Redis Cluster (`rediss+cluster://`) is not supported; use `redis+cluster://`"
                    .into(),
            );
        } else if !(store.starts_with("embedded:") && store.len() > "embedded:".len()
            || crate::redis_conn::is_redis_url(store))
        {
            push(
                "sessions.store".into(),
                "must be `embedded:PATH`, `redis://...`, `rediss://...` or `redis+cluster://HOST:PORT,HOST:PORT`"
                    .into(),
            );
        }
        // A brace in the prefix would move (or empty) the hash tag that keeps a session's keys
        // on one Cluster slot.
        if store.starts_with("redis+cluster://") && self.sessions.key_prefix.contains(['{', '}']) {
            push("sessions.key_prefix".into(), "must not contain `{` or `}` on a Redis Cluster".into());
        }
        if HeaderName::try_from(self.sessions.header.as_str()).is_err() {
            push("sessions.header".into(), format!("`{}` is not a valid header name", self.sessions.header));
        }
        for (key, value) in [
            ("sessions.ttl", self.sessions.ttl),
            ("sessions.lease", self.sessions.lease),
            ("sessions.store_timeout", self.sessions.store_timeout),
        ] {
            if value.is_zero() {
                push(key.into(), "must be greater than zero".into());
            }
        }
        self.validate_compression(&mut push);
        self.validate_tools(env, &mut push);
        let mut auth_issues = Vec::new();
        self.validate_auth(&mut auth_issues);
        for issue in auth_issues {
            push(issue.path, issue.message);
        }
        if self.server.request_timeout.is_zero() {
            push("server.request_timeout".into(), "must be greater than zero".into());
        }
        if self.retry.base_delay > self.retry.max_delay {
            push("retry.base_delay".into(), "must not exceed retry.max_delay".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.telemetry.log_level) {
            push("telemetry.log_level".into(), format!("invalid filter: {e}"));
        }
        ConfigError::from_issues(issues)
    }
}

impl Config {
    fn validate_tools(&self, env: &dyn EnvSource, push: &mut impl FnMut(String, String)) {
        let mut names = HashSet::new();
        for (i, tool) in self.tools.iter().enumerate() {
            let at = |key: &str| format!("tools[{i}].{key}");
            let valid_name = !tool.name.is_empty()
                && tool.name.len() <= 64
                && tool.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name {
                push(at("name"), "must be 1 to 64 letters, digits, `_` or `-`".into());
            } else if !names.insert(tool.name.as_str()) {
                push(at("name"), format!("duplicate tool name `{}`", tool.name));
            }
            if !tool.parameters.is_object() {
                push(at("parameters"), "must be a JSON Schema object".into());
            } else if let Err(e) = jsonschema::validator_for(&tool.parameters) {
                push(at("parameters"), format!("invalid JSON Schema: {e}"));
            }
            if tool.timeout.is_zero() {
                push(at("timeout"), "must be greater than zero".into());
            }
            if tool.max_concurrency == 0 {
                push(at("max_concurrency"), "must be at least 1".into());
            }
            match (&tool.http, &tool.mcp) {
                (Some(http), None) => {
                    if let Err(message) = check_base_url(&http.url) {
                        push(at("http.url"), message);
                    }
                    if !["GET", "POST", "PUT"].contains(&http.method.as_str()) {
                        push(at("http.method"), "must be GET, POST or PUT".into());
                    }
                    for (name, value) in &http.headers {
                        if HeaderName::try_from(name.as_str()).is_err()
                            || HeaderValue::try_from(value.as_str()).is_err()
                        {
                            push(at("http.headers"), format!("`{name}` is not a valid header"));
                        }
                    }
                    for (name, var) in &http.headers_env {
                        if HeaderName::try_from(name.as_str()).is_err() {
                            push(at("http.headers_env"), format!("`{name}` is not a valid header name"));
                        }
                        if env.var(var).is_none_or(|v| v.is_empty()) {
                            push(at("http.headers_env"), format!("environment variable {var} is not set"));
                        }
                    }
                }
                (None, Some(mcp)) => {
                    if let Err(message) = check_base_url(&mcp.url) {
                        push(at("mcp.url"), message);
                    }
                    if let Some(var) = &mcp.bearer_env {
                        if env.var(var).is_none_or(|v| v.is_empty()) {
                            push(at("mcp.bearer_env"), format!("environment variable {var} is not set"));
                        }
                    }
                }
                _ => push(format!("tools[{i}]"), "needs exactly one backend: `http` or `mcp`".into()),
            }
        }
        let limits = &self.tool_loop;
        if limits.max_concurrency == 0 {
            push("tool_loop.max_concurrency".into(), "must be at least 1".into());
        }
        for (key, value) in [
            ("tool_loop.keepalive_interval", limits.keepalive_interval),
            ("tool_loop.task_poll_interval", limits.task_poll_interval),
        ] {
            if value.is_zero() {
                push(key.into(), "must be greater than zero".into());
            }
        }
    }

    fn validate_compression(&self, push: &mut impl FnMut(String, String)) {
        let compression = &self.compression;
        let mut policies = vec![("compression".to_string(), compression.policy.clone())];
        for (i, model) in compression.models.iter().enumerate() {
            let at = format!("compression.models[{i}]");
            if model.matches.is_empty() {
                push(format!("{at}.match"), "must name at least one model or glob".into());
            }
            for (j, pattern) in model.matches.iter().enumerate() {
                if let Err(e) = globset::Glob::new(pattern) {
                    push(format!("{at}.match[{j}]"), format!("invalid glob: {e}"));
                }
            }
            policies.push((at, model.apply(&compression.policy)));
        }
        for (at, policy) in &policies {
            if policy.context_window == 0 {
                push(format!("{at}.context_window"), "must be greater than zero".into());
            }
            let marks = [policy.low_water, policy.pre_compaction, policy.high_water];
            if !marks.iter().all(|m| *m > 0.0 && *m <= 1.0)
                || policy.low_water >= policy.high_water
                || policy.pre_compaction > policy.high_water
            {
                push(
                    at.clone(),
                    "marks must satisfy 0 < low_water < high_water <= 1 and pre_compaction <= high_water"
                        .into(),
                );
            }
        }
        for (j, pattern) in compression.policy.rules.read_functions.iter().enumerate() {
            if let Err(e) = globset::Glob::new(pattern) {
                push(format!("compression.rules.read_functions[{j}]"), format!("invalid glob: {e}"));
            }
        }
        let summarizer = &compression.summarizer;
        if let Some(name) = &summarizer.upstream {
            if !self.upstreams.iter().any(|u| &u.name == name) {
                push("compression.summarizer.upstream".into(), format!("no upstream is named `{name}`"));
            }
        }
        if !matches!(summarizer.role.as_str(), "system" | "user") {
            push("compression.summarizer.role".into(), "must be `system` or `user`".into());
        }
        if summarizer.timeout.is_zero() {
            push("compression.summarizer.timeout".into(), "must be greater than zero".into());
        }
    }
}

fn check_base_url(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    if uri.authority().is_none() {
        return Err("has no host".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query string".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn reports_every_problem_at_once() {
        let text = r#"
[retry]
base_delay = "5s"
max_delay = "1s"

[[upstreams]]
name = "a"
base_url = "ftp://x"
api_key_env = "CTXGATE_TEST_MISSING_KEY"

[[upstreams]]
name = "a"
base_url = "http://ok/v1"
headers = { "bad header" = "v" }

[[routes]]
models = ["gpt-[", "gpt-4o"]
upstreams = ["nope"]
"#;
        let env = BTreeMap::new();
        let config = Config::parse(text, &env).unwrap();
        let err = config.validate(&env).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "upstreams[0].base_url",
                "upstreams[0].api_key_env",
                "upstreams[1].name",
                "upstreams[1].headers",
                "routes[0].models[0]",
                "routes[0].upstreams[0]",
                "retry.base_delay",
            ],
            "{err}"
        );
    }

    #[test]
    fn a_valid_config_passes() {
        let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"https://api.example.test/v1\"\n";
        let env = BTreeMap::new();
        Config::parse(text, &env).unwrap().validate(&env).unwrap();
    }

    #[test]
    fn session_stores_are_checked() {
        let env = BTreeMap::new();
        let issues = |store: &str, prefix: &str| {
            let text = format!(
                "[sessions]\nstore = {store:?}\nkey_prefix = {prefix:?}\n[[upstreams]]\nname = \"a\"\nbase_url = \"http://ok/v1\"\n"
            );
            match Config::parse(&text, &env).unwrap().validate(&env) {
                Ok(()) => Vec::new(),
                Err(e) => e.0.iter().map(ToString::to_string).collect(),
            }
        };
        for ok in [
            "embedded:data/s.redb",
            "redis://127.0.0.1:6379/",
            "rediss://cache:6380",
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000",
            "redis+cluster://user:secret@10.0.0.1:7000",
        ] {
            assert_eq!(issues(ok, "ctxgate:"), Vec::<String>::new(), "{ok}");
        }
        let wrong = issues("memcached://x:1", "ctxgate:");
        assert_eq!(wrong.len(), 1);
        assert!(wrong[0].starts_with("sessions.store: must be") && wrong[0].contains("redis+cluster://"));
        assert_eq!(
            issues("rediss+cluster://10.0.0.1:7000", "ctxgate:"),
            ["sessions.store: TLS to a Redis Cluster (`rediss+cluster://`) is not supported; use `redis+cluster://`"]
        );
        assert_eq!(
            issues("redis+cluster://10.0.0.1:7000", "{ctxgate}:"),
            ["sessions.key_prefix: must not contain `{` or `}` on a Redis Cluster"]
        );
        assert!(issues("redis://10.0.0.1:7000", "{ctxgate}:").is_empty(), "one server has no slots");
    }

    #[test]
    fn no_upstream_is_an_issue() {
        let env = BTreeMap::new();
        let err = Config::parse("", &env).unwrap().validate(&env).unwrap_err();
        assert_eq!(err.0[0].path, "upstreams");
    }

    #[test]
    fn tools_are_checked() {
        let text = r#"
[[upstreams]]
name = "a"
base_url = "http://ok/v1"

[[tools]]
name = "look"
parameters = { type = "object", properties = { q = { type = "nonsense" } } }
timeout = "0s"
http = { url = "not a url", method = "DELETE", headers_env = { "x-key" = "CTXGATE_TEST_NO_SUCH_KEY" } }

[[tools]]
name = "look"
mcp = { url = "http://mcp.local/mcp" }

[[tools]]
name = "has space"
http = { url = "http://ok/tool" }
mcp = { url = "http://mcp.local/mcp" }

[tool_loop]
max_concurrency = 0
"#;
        let env = BTreeMap::new();
        let config = Config::parse(text, &env).unwrap();
        let err = config.validate(&env).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "tools[0].parameters",
                "tools[0].timeout",
                "tools[0].http.url",
                "tools[0].http.method",
                "tools[0].http.headers_env",
                "tools[1].name",
                "tools[2].name",
                "tools[2]",
                "tool_loop.max_concurrency",
            ],
            "{err}"
        );
    }

    #[test]
    fn compression_marks_and_references_are_checked() {
        let text = r#"
[[upstreams]]
name = "a"
base_url = "http://ok/v1"

[compression]
mode = "hybrid"
low_water = 0.9
summarizer = { upstream = "nope", role = "tool" }

[[compression.models]]
match = ["small-*"]
context_window = 0
"#;
        let env = BTreeMap::new();
        let config = Config::parse(text, &env).unwrap();
        let err = config.validate(&env).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "compression",
                "compression.models[0].context_window",
                "compression.models[0]",
                "compression.summarizer.upstream",
                "compression.summarizer.role",
            ],
            "{err}"
        );
    }
}
