//! Pool settings: an upstream served by several endpoints (replicas of one model server),
//! listed in config or found in DNS, with how requests are spread over them, which endpoint a
//! conversation keeps, and when an endpoint is taken out. Types, defaults and the checks serde
//! cannot do; the runtime is `upstream::pool`.

use std::collections::HashSet;
use std::time::Duration;

use http::Uri;
use serde::Deserialize;

use super::Issues;

/// `[upstreams.pool]`: the upstream's requests go to one of these endpoints instead of its
/// `base_url`. Every other upstream setting (key, headers, timeouts, models) applies to each
/// endpoint.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Static endpoints, each a base URL like `http://10.0.0.5:8080/v1`.
    pub endpoints: Vec<String>,
    /// A base URL whose host is resolved every `dns_interval`; each address it resolves to is
    /// an endpoint with the URL's port and path (a Kubernetes headless Service).
    pub dns: Option<String>,
    #[serde(with = "humantime_serde")]
    pub dns_interval: Duration,
    /// How a request without affinity (or whose affinity endpoint is unavailable) is placed.
    pub balance: BalanceMode,
    /// Keep a session (or a stateless conversation, by its stable prefix) on one endpoint.
    pub affinity: bool,
    /// Bounded load for affinity: an endpoint with `load_factor` × the pool's average requests
    /// in flight (or more) sends the next conversation to its second choice.
    pub load_factor: f64,
    pub health: PoolHealthConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            dns: None,
            dns_interval: Duration::from_secs(5),
            balance: BalanceMode::LeastRequests,
            affinity: false,
            load_factor: 2.0,
            health: PoolHealthConfig::default(),
        }
    }
}

/// Power of two random choices over a load measure, or plain round robin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceMode {
    /// The less busy of two random endpoints, by requests in flight.
    #[default]
    LeastRequests,
    /// The cheaper of two random endpoints by peak-EWMA latency × (requests in flight + 1).
    PeakEwma,
    /// Each endpoint in turn (a baseline; it ignores load).
    RoundRobin,
}

/// Passive outlier detection and optional active checks.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolHealthConfig {
    /// Consecutive failures (connect errors, timeouts, 5xx) that eject an endpoint; 0 never
    /// ejects.
    pub eject_after: u32,
    /// First ejection; each ejection in a row without a success in between lasts twice as long.
    #[serde(with = "humantime_serde")]
    pub ejection: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// Active checks: `GET` this path (from the endpoint's root, e.g. `/health`) every
    /// `check_interval`; an endpoint whose check fails takes no requests until one passes.
    pub check_path: Option<String>,
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub check_timeout: Duration,
}

impl Default for PoolHealthConfig {
    fn default() -> Self {
        Self {
            eject_after: 3,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            check_path: None,
            check_interval: Duration::from_secs(5),
            check_timeout: Duration::from_secs(2),
        }
    }
}

impl PoolConfig {
    /// Checks the pool at `path` (`upstreams[i].pool`).
    pub fn validate(&self, path: &str, issues: &mut Issues) {
        let at = |key: &str| format!("{path}.{key}");
        match (&self.dns, self.endpoints.is_empty()) {
            (Some(_), false) => issues.push(path, "set `endpoints` or `dns`, not both"),
            (None, true) => issues.push(path, "needs `endpoints` (a list of base URLs) or `dns`"),
            _ => {}
        }
        let mut origins = HashSet::new();
        for (i, url) in self.endpoints.iter().enumerate() {
            match check_endpoint_url(url) {
                Ok(uri) => {
                    let origin = uri.authority().map(|a| a.as_str().to_ascii_lowercase());
                    if !origins.insert(origin) {
                        issues.push(at(&format!("endpoints[{i}]")), "duplicate host:port");
                    }
                }
                Err(message) => issues.push(at(&format!("endpoints[{i}]")), message),
            }
        }
        if let Some(dns) = &self.dns {
            match check_endpoint_url(dns) {
                // Endpoints found in DNS are addressed by IP, which a TLS certificate would not
                // name; in-cluster replicas speak plain HTTP.
                Ok(uri) if uri.scheme_str() != Some("http") => {
                    issues.push(at("dns"), "must start with http:// (endpoints are addressed by IP)")
                }
                Ok(_) => {}
                Err(message) => issues.push(at("dns"), message),
            }
            if self.dns_interval.is_zero() {
                issues.push(at("dns_interval"), "must be greater than zero");
            }
        }
        if !(self.load_factor.is_finite() && self.load_factor >= 1.0) {
            issues.push(at("load_factor"), "must be at least 1.0");
        }
        let health = &self.health;
        if health.eject_after > 0 && health.ejection.is_zero() {
            issues.push(at("health.ejection"), "must be greater than zero");
        }
        if health.max_ejection < health.ejection {
            issues.push(at("health.max_ejection"), "must not be less than health.ejection");
        }
        if let Some(check) = &health.check_path {
            if !check.starts_with('/') || check.parse::<http::uri::PathAndQuery>().is_err() {
                issues.push(at("health.check_path"), "must be a path starting with `/`");
            }
            for (key, value) in [
                ("health.check_interval", health.check_interval),
                ("health.check_timeout", health.check_timeout),
            ] {
                if value.is_zero() {
                    issues.push(at(key), "must be greater than zero");
                }
            }
        }
    }
}

/// The pool checks of every upstream. A pooled upstream's requests never use its `base_url`,
/// so one set beside a pool is a mistake worth reporting.
fn check_endpoint_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err("must start with http:// or https://".into());
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err("has no host".into());
    }
    if uri.query().is_some() {
        return Err("must not have a query string".into());
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::Config;

    fn issues(pool: &str) -> Vec<String> {
        let text = format!("[[upstreams]]\nname = \"p\"\n[upstreams.pool]\n{pool}");
        let env = BTreeMap::new();
        match Config::parse(&text, &env).unwrap().validate(&env) {
            Ok(()) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn a_static_pool_and_a_dns_pool_pass() {
        assert_eq!(
            issues(
                "endpoints = [\"http://127.0.0.1:8081/v1\", \"http://127.0.0.1:8082/v1\"]\naffinity = true\nhealth = { check_path = \"/health\" }"
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            issues("dns = \"http://llama.models.svc.cluster.local:8080/v1\"\ndns_interval = \"2s\"\nbalance = \"peak_ewma\""),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_pool_problem_is_reported_with_its_path() {
        assert_eq!(issues(""), ["upstreams[0].pool: needs `endpoints` (a list of base URLs) or `dns`"]);
        assert_eq!(
            issues("endpoints = [\"http://a:1/v1\", \"ftp://b/v1\", \"http://A:1/x\", \"http://c/v1?x=1\"]\ndns = \"https://svc:443/v1\"\nload_factor = 0.5\nhealth = { ejection = \"0s\", check_path = \"health\", check_timeout = \"0s\" }"),
            [
                "upstreams[0].pool: set `endpoints` or `dns`, not both",
                "upstreams[0].pool.endpoints[1]: must start with http:// or https://",
                "upstreams[0].pool.endpoints[2]: duplicate host:port",
                "upstreams[0].pool.endpoints[3]: must not have a query string",
                "upstreams[0].pool.dns: must start with http:// (endpoints are addressed by IP)",
                "upstreams[0].pool.load_factor: must be at least 1.0",
                "upstreams[0].pool.health.ejection: must be greater than zero",
                "upstreams[0].pool.health.check_path: must be a path starting with `/`",
                "upstreams[0].pool.health.check_timeout: must be greater than zero",
            ]
        );
    }

    #[test]
    fn a_base_url_beside_a_pool_is_refused() {
        let text = "[[upstreams]]\nname = \"p\"\nbase_url = \"http://x/v1\"\npool = { endpoints = [\"http://a/v1\"] }";
        let env = BTreeMap::new();
        let err = Config::parse(text, &env).unwrap().validate(&env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "upstreams[0].base_url: a pooled upstream takes its URLs from `pool`; remove base_url"
        );
    }

    #[test]
    fn unknown_pool_keys_fail_to_parse_with_their_path() {
        let text = "[[upstreams]]\nname = \"p\"\n[upstreams.pool]\nendpoint = [\"http://a/v1\"]";
        let err = Config::parse(text, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("upstreams[0].pool"), "{err}");
        let text = "[[upstreams]]\nname = \"p\"\n[upstreams.pool]\nbalance = \"random\"";
        let err = Config::parse(text, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("upstreams[0].pool.balance"), "{err}");
    }
}
