//! Semantic checks over a parsed [`Config`], in one collector: [`Issues`]. Each section checks
//! itself next to its type (its `validate` method); this file composes them, checks what crosses
//! sections (a route naming an upstream, the summarizer's upstream, Redis-held keys needing a
//! Redis), and reports every problem at once with its key path, and with the environment
//! variable that set the value when one did, so an operator fixes a file in one pass.

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use http::Uri;

use super::{Config, EnvSource};

/// One problem at one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub path: String,
    pub message: String,
    /// The environment variable that set the value (`CTXGATE__...`), when one did.
    pub origin: Option<String>,
}

impl Issue {
    pub fn new(path: &str, message: impl Into<String>) -> Self {
        Self { path: path.to_string(), message: message.into(), origin: None }
    }

    /// The key path as segments: `upstreams[1].base_url` → `upstreams`, `1`, `base_url`.
    fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split(['.', '[', ']']).filter(|s| !s.is_empty())
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)?;
        } else {
            write!(f, "{}: {}", self.path, self.message)?;
        }
        if let Some(origin) = &self.origin {
            write!(f, " (set by {origin})")?;
        }
        Ok(())
    }
}

/// The collector every check writes to.
#[derive(Clone, Debug, Default)]
pub struct Issues(Vec<Issue>);

impl Issues {
    pub fn push(&mut self, path: impl AsRef<str>, message: impl Into<String>) {
        self.0.push(Issue::new(path.as_ref(), message));
    }

    /// A duration that must not be zero.
    pub fn positive(&mut self, path: impl AsRef<str>, value: Duration) {
        if value.is_zero() {
            self.push(path, "must be greater than zero");
        }
    }

    /// A glob that must compile.
    pub fn glob(&mut self, path: impl AsRef<str>, pattern: &str) {
        if let Err(e) = globset::Glob::new(pattern) {
            self.push(path, format!("invalid glob: {e}"));
        }
    }

    /// A URL that must be `http(s)://host[/path]`.
    pub fn url(&mut self, path: impl AsRef<str>, url: &str) {
        if let Err(message) = check_base_url(url) {
            self.push(path, message);
        }
    }

    /// An environment variable that must be set (a secret).
    pub fn env_set(&mut self, path: impl AsRef<str>, env: &dyn EnvSource, var: &str) {
        if env.var(var).is_none_or(|v| v.is_empty()) {
            self.push(path, format!("environment variable {var} is not set"));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn first(&self) -> Option<&Issue> {
        self.0.first()
    }

    /// Names the environment variable behind each issue whose key one of `overrides` set.
    pub(super) fn attribute(&mut self, overrides: &[(Vec<String>, String)]) {
        for issue in &mut self.0 {
            let segments: Vec<&str> = issue.segments().collect();
            let by = overrides.iter().filter(|(path, _)| path.iter().zip(&segments).all(|(a, b)| a == b));
            if let Some((_, var)) = by.max_by_key(|(path, _)| path.len()) {
                issue.origin = Some(var.clone());
            }
        }
    }

    /// Drops the issues under `sections`: sections that did not parse hold defaults, and their
    /// parse error is the one to fix first.
    pub(super) fn without(&mut self, sections: &[String]) {
        self.0
            .retain(|issue| issue.segments().next().is_none_or(|first| !sections.iter().any(|s| s == first)));
    }

    pub(super) fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(self.0))
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

/// A configuration that passed [`Config::validate`]: what the gateway is built from, so it is
/// validated once, at start-up.
#[derive(Clone, Debug)]
pub struct ValidConfig(Config);

impl ValidConfig {
    pub fn into_inner(self) -> Config {
        self.0
    }
}

impl std::ops::Deref for ValidConfig {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.0
    }
}

impl Config {
    /// [`Self::validate`], keeping the proof: the gateway starts only from a [`ValidConfig`].
    pub fn validated(self, env: &dyn EnvSource) -> Result<ValidConfig, ConfigError> {
        self.validate(env)?;
        Ok(ValidConfig(self))
    }

    /// Checks what serde cannot: references, URLs, header syntax, secrets present. Every
    /// problem is reported, each with its key path.
    pub fn validate(&self, env: &dyn EnvSource) -> Result<(), ConfigError> {
        let mut issues = Issues::default();
        if self.upstreams.is_empty() {
            issues.push(
                "upstreams",
                "at least one upstream is required (config/ctxgate.toml is read from the working \
                 directory; `--config PATH` names another file, `--upstream URL` alone is enough)",
            );
        }
        let mut names = HashSet::new();
        for (i, upstream) in self.upstreams.iter().enumerate() {
            let at = format!("upstreams[{i}]");
            if !upstream.name.is_empty() && !names.insert(upstream.name.as_str()) {
                issues.push(format!("{at}.name"), format!("duplicate upstream name `{}`", upstream.name));
            }
            upstream.validate(&at, env, &mut issues);
        }
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            route.validate(&at, &mut issues);
            if self.parsed("upstreams") {
                for (j, name) in route.upstreams.iter().enumerate() {
                    if !names.contains(name.as_str()) {
                        issues.push(format!("{at}.upstreams[{j}]"), format!("no upstream is named `{name}`"));
                    }
                }
            }
        }
        self.sessions.validate(&mut issues);
        let upstreams_parsed = self.parsed("upstreams");
        self.compression.validate(&|name| !upstreams_parsed || names.contains(name), &mut issues);
        let mut tool_names = HashSet::new();
        for (i, tool) in self.tools.iter().enumerate() {
            let at = format!("tools[{i}]");
            tool.validate(&at, env, &mut issues);
            if tool.has_valid_name() && !tool_names.insert(tool.name.as_str()) {
                issues.push(format!("{at}.name"), format!("duplicate tool name `{}`", tool.name));
            }
        }
        self.tool_loop.validate(&mut issues);
        self.auth.validate(&mut issues);
        // With gateway keys on, the client's Authorization is its gateway key and is never
        // forwarded: an upstream without a credential of its own gets none, and its 401 would
        // reach the client looking like a rejected gateway key. An error, not a warning: such
        // a gateway cannot serve that upstream at all, and `keyless` says so when intended.
        if self.auth.enabled() {
            for (i, upstream) in self.upstreams.iter().enumerate() {
                if !upstream.holds_credential() && !upstream.keyless {
                    issues.push(
                        format!("upstreams[{i}].api_key_env"),
                        "gateway keys are on ([auth]), so clients' Authorization headers (their gateway \
                         keys) are not passed upstream and this upstream would get no credential: set \
                         api_key_env (or a credential header in `headers`), or `keyless = true` for an \
                         upstream that takes none",
                    );
                }
            }
        }
        if self.auth.redis && self.shared_redis_url().is_none() {
            issues.push("auth.redis", "needs Redis: sessions.store or rate_limits.store must be a Redis URL");
        }
        self.rate_limits.validate(&mut issues);
        self.server.validate(&mut issues);
        self.retry.validate(&mut issues);
        self.telemetry.validate(&mut issues);
        issues.without(&self.unparsed);
        issues.attribute(&self.overrides);
        let mut all = self.parse_issues.clone();
        all.0.extend(issues.0);
        all.into_result()
    }

    /// Whether `section` parsed (one that did not holds defaults).
    fn parsed(&self, section: &str) -> bool {
        !self.unparsed.iter().any(|s| s == section)
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
    fn gateway_keys_need_upstreams_that_hold_a_credential() {
        let env = BTreeMap::from([("KEY".to_string(), "sk".to_string())]);
        let config = |upstreams: &str| {
            let text = format!("[[auth.keys]]\nname = \"a\"\nsha256 = \"{}\"\n{upstreams}", "0".repeat(64));
            Config::parse(&text, &env).unwrap().validate(&env)
        };
        // Given gateway keys, an upstream without a credential of its own is an error
        let err =
            config("[[upstreams]]\nname = \"u\"\nbase_url = \"https://api.example.com/v1\"\n").unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].path, "upstreams[0].api_key_env");
        assert!(err.0[0].message.contains("keyless = true"), "{err}");
        // And a key, a credential header, or `keyless` each answer it
        for fix in ["api_key_env = \"KEY\"", "headers = { \"Api-Key\" = \"k\" }", "keyless = true"] {
            let upstream =
                format!("[[upstreams]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:1/v1\"\n{fix}\n");
            assert!(config(&upstream).is_ok(), "{fix}");
        }
        // Without gateway keys the client's Authorization goes through: nothing to say
        let plain = "[[upstreams]]\nname = \"u\"\nbase_url = \"https://api.example.com/v1\"\n";
        assert!(Config::parse(plain, &env).unwrap().validate(&env).is_ok());
    }

    #[test]
    fn reports_every_problem_at_once() {
        let text = r#"
[retry]
base_delay = "5s"
max_delay = "1s"
budget_ratio = -0.5
budget_window = "2m"
inference_paths = ["/v1/embeddings", "chat/completions"]

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
                "retry.budget_ratio",
                "retry.budget_window",
                "retry.inference_paths[1]",
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
    fn the_session_header_is_one_name_or_a_list_and_each_name_is_checked() {
        use crate::config::SessionHeaders;
        let env = BTreeMap::new();
        let read = |sessions: &str, env: &BTreeMap<String, String>| {
            let text =
                format!("[sessions]\n{sessions}\n[[upstreams]]\nname = \"a\"\nbase_url = \"http://ok/v1\"\n");
            let config = Config::read_text(&text, env).unwrap();
            let issues = match config.validate(env) {
                Ok(()) => Vec::new(),
                Err(e) => e.0.iter().map(ToString::to_string).collect(),
            };
            (config.sessions, issues)
        };
        let (sessions, issues) = read("", &env);
        assert_eq!(sessions.header, SessionHeaders::new(["x-session-id", "thread-id"]));
        assert!(!sessions.prompt_cache_key && issues.is_empty(), "{issues:?}");
        // A single name, as configs written before the list still say
        let (sessions, issues) = read("header = \"x-conv\"", &env);
        assert_eq!((sessions.header, issues), (SessionHeaders::new(["x-conv"]), Vec::new()));
        let (sessions, issues) = read("header = [\"x-conv\", \"session-id\"]\nprompt_cache_key = true", &env);
        assert_eq!(sessions.header.primary(), "x-conv");
        assert!(sessions.prompt_cache_key && issues.is_empty(), "{issues:?}");
        let (_, issues) = read("header = [\"ok\", \"bad name\", \"OK\"]", &env);
        assert_eq!(
            issues,
            [
                "sessions.header[1]: `bad name` is not a valid header name",
                "sessions.header[2]: `OK` is listed twice"
            ]
        );
        assert_eq!(read("header = []", &env).1, ["sessions.header: needs at least one header name"]);
        let (_, issues) = read("header = 5", &env);
        assert!(issues[0].contains("a header name or a list of header names"), "{issues:?}");
        // The list from the environment, as a TOML array
        let env: BTreeMap<String, String> =
            [("CTXGATE__SESSIONS__HEADER".to_string(), r#"["x-a","x-b"]"#.to_string())].into();
        assert_eq!(read("", &env).0.header, SessionHeaders::new(["x-a", "x-b"]));
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

    #[test]
    fn parse_errors_of_every_section_come_with_the_other_problems() {
        // Given two sections that do not parse, an unknown one, and a semantic problem elsewhere
        let text = r#"
[server]
max_concurrent_requests = 0

[[upstreams]]
name = "a"
base_url = "ftp://x"

[sessions]
lease = "soon"

[telemetri]
log_level = "debug"
"#;
        let env = BTreeMap::new();
        // When the file is read and checked in one pass
        let err = Config::read_text(text, &env).unwrap().validate(&env).unwrap_err();
        // Then every problem is listed once, with its key path
        let paths: Vec<&str> = err.0.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            ["telemetri", "server.max_concurrent_requests", "sessions.lease", "upstreams[0].base_url"],
            "{err}"
        );
        // And `parse` alone still refuses the file
        assert!(Config::parse(text, &env).is_err());
    }

    #[test]
    fn the_upstream_api_defaults_by_base_url_and_an_unknown_one_is_an_issue() {
        use crate::config::UpstreamApi;
        // Given upstreams without `api`: OpenAI's, a local server, and one that says `responses`
        let text = r#"
[[upstreams]]
name = "openai"
base_url = "https://api.openai.com/v1"

[[upstreams]]
name = "llama"
base_url = "http://127.0.0.1:8081/v1"

[[upstreams]]
name = "proxy"
base_url = "http://127.0.0.1:9000/v1"
api = "responses"
"#;
        let env = BTreeMap::new();
        let config = Config::parse(text, &env).unwrap();
        // Then OpenAI speaks Responses, any other base URL Chat Completions, unless configured
        let apis: Vec<UpstreamApi> = config.upstreams.iter().map(|u| u.api()).collect();
        assert_eq!(apis, [UpstreamApi::Responses, UpstreamApi::Chat, UpstreamApi::Responses]);

        // And an API ctxgate does not speak is reported with its key path
        let bad = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://ok/v1\"\napi = \"soap\"\n";
        let err = Config::read_text(bad, &env).unwrap().validate(&env).unwrap_err();
        assert_eq!(err.0[0].path, "upstreams[0].api", "{err}");
        assert!(err.to_string().contains("responses"), "{err}");
    }

    #[test]
    fn a_problem_set_by_an_environment_variable_names_it() {
        let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://ok/v1\"\n";
        let env: BTreeMap<String, String> = [
            ("CTXGATE__UPSTREAMS__0__BASE_URL".to_string(), "ftp://nope".to_string()),
            ("CTXGATE__SERVER__MAX_BODY_BYTES".to_string(), "0".to_string()),
        ]
        .into();
        let err = Config::read_text(text, &env).unwrap().validate(&env).unwrap_err();
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("server.max_body_bytes")
                && lines[0].ends_with("(set by CTXGATE__SERVER__MAX_BODY_BYTES)"),
            "{lines:?}"
        );
        assert_eq!(lines[1], "upstreams[0].base_url: must start with http:// or https:// (set by CTXGATE__UPSTREAMS__0__BASE_URL)");
    }

    #[test]
    fn connection_limits_out_of_range_are_issues() {
        let text = "[server]\nheader_read_timeout = \"0s\"\nidle_timeout = \"0s\"\nbody_read_timeout = \"0s\"\nmax_header_bytes = 4096\nmax_connections = 10\n\n[[upstreams]]\nname = \"a\"\nbase_url = \"http://ok/v1\"\n";
        let env = BTreeMap::new();
        let err = Config::parse(text, &env).unwrap().validate(&env).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.header_read_timeout",
                "server.idle_timeout",
                "server.body_read_timeout",
                "server.max_header_bytes"
            ],
            "{err}"
        );
        assert!(
            Config::parse("[server]\nmax_connections = 0\n", &env).is_err(),
            "zero connections does not parse"
        );
    }

    #[test]
    fn a_tokenizer_that_does_not_load_and_a_margin_out_of_range_are_issues() {
        let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://ok/v1\"\n\n[compression]\nmode = \"rules\"\ntokenizer = \"/nonexistent/tokenizer.json\"\ntoken_margin = 1.5\n";
        let env = BTreeMap::new();
        let err = Config::parse(text, &env).unwrap().validate(&env).unwrap_err();
        let paths: Vec<&str> = err.0.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["compression.token_margin", "compression.tokenizer"], "{err}");
        let mut policy =
            super::super::Policy { context_window: 10_000, token_margin: 0.25, ..Default::default() };
        assert_eq!(policy.high_tokens(), 6_400, "0.8 of the window, counted 25% short");
        policy.token_margin = 0.0;
        assert_eq!(policy.high_tokens(), 8_000);
    }

    #[test]
    fn a_json_depth_past_what_stays_parseable_is_an_issue() {
        let env = BTreeMap::new();
        let upstream = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://ok/v1\"\n";
        let text = format!("[server]\nmax_json_depth = 121\n{upstream}");
        let err = Config::parse(&text, &env).unwrap().validate(&env).unwrap_err();
        assert_eq!(err.0[0].path, "server.max_json_depth", "{err}");
        let text = format!("[server]\nmax_json_depth = 120\n{upstream}");
        assert!(Config::parse(&text, &env).unwrap().validate(&env).is_ok());
        assert!(Config::parse(&format!("[server]\nmax_json_depth = 0\n{upstream}"), &env).is_err());
    }
}
