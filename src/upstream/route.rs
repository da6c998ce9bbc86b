//! Model routing: which upstreams, in failover order, serve a model. Exact names win over globs;
//! globs are tried in config order; anything else goes to the default (first) upstream.

use std::collections::HashMap;
use std::sync::Arc;

use globset::{Glob, GlobMatcher};

use super::Upstream;
use crate::config::RouteConfig;

#[derive(Debug)]
pub struct ModelRouter {
    exact: HashMap<String, usize>,
    globs: Vec<(GlobMatcher, usize)>,
    routes: Vec<Vec<Arc<Upstream>>>,
    default: Vec<Arc<Upstream>>,
    all: Vec<Arc<Upstream>>,
}

impl ModelRouter {
    /// `upstreams` are in config order; routes were validated to name existing ones.
    pub fn new(routes: &[RouteConfig], upstreams: &[Arc<Upstream>]) -> Result<Self, globset::Error> {
        let mut exact = HashMap::new();
        let mut globs = Vec::new();
        let mut targets = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            for pattern in &route.models {
                if is_literal(pattern) {
                    exact.entry(pattern.clone()).or_insert(i);
                } else {
                    globs.push((Glob::new(pattern)?.compile_matcher(), i));
                }
            }
            targets.push(
                route
                    .upstreams
                    .iter()
                    .filter_map(|name| upstreams.iter().find(|u| &u.name == name).cloned())
                    .collect(),
            );
        }
        Ok(Self {
            exact,
            globs,
            routes: targets,
            default: upstreams.iter().take(1).cloned().collect(),
            all: upstreams.to_vec(),
        })
    }

    pub fn route(&self, model: Option<&str>) -> &[Arc<Upstream>] {
        let Some(model) = model else {
            return &self.default;
        };
        let index = self
            .exact
            .get(model)
            .copied()
            .or_else(|| self.globs.iter().find(|(g, _)| g.is_match(model)).map(|(_, i)| *i));
        match index {
            Some(i) => &self.routes[i],
            None => &self.default,
        }
    }

    /// The upstream with this name alone, as a route.
    pub fn named(&self, name: &str) -> Option<&[Arc<Upstream>]> {
        let i = self.all.iter().position(|u| u.name == name)?;
        Some(&self.all[i..=i])
    }

    pub fn default_upstream(&self) -> Option<&Arc<Upstream>> {
        self.default.first()
    }
}

fn is_literal(pattern: &str) -> bool {
    !pattern.contains(['*', '?', '[', '{'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;

    fn upstream(name: &str) -> Arc<Upstream> {
        let config = UpstreamConfig {
            name: name.into(),
            base_url: format!("http://{name}.test/v1"),
            ..UpstreamConfig::default()
        };
        Arc::new(Upstream::new(&config, None, crate::telemetry::Metrics::new().for_upstream(name)).unwrap())
    }

    fn names(route: &[Arc<Upstream>]) -> Vec<&str> {
        route.iter().map(|u| u.name.as_str()).collect()
    }

    #[test]
    fn exact_beats_glob_and_default_catches_the_rest() {
        let ups = vec![upstream("a"), upstream("b"), upstream("c")];
        let routes = vec![
            RouteConfig { models: vec!["gpt-*".into()], upstreams: vec!["b".into(), "c".into()] },
            RouteConfig { models: vec!["gpt-4o".into()], upstreams: vec!["c".into()] },
        ];
        let router = ModelRouter::new(&routes, &ups).unwrap();
        assert_eq!(names(router.route(Some("gpt-4o"))), ["c"]);
        assert_eq!(names(router.route(Some("gpt-4.1"))), ["b", "c"]);
        assert_eq!(names(router.route(Some("llama"))), ["a"]);
        assert_eq!(names(router.route(None)), ["a"]);
    }
}
