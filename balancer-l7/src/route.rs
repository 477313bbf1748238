//! The routing table: host and path prefix to a pool, most specific first.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{L7Config, ListenerConfig, RouteConfig};
use crate::metrics::{Registry, RouteCounters};
use crate::pool::{HealthMap, Pool};

/// A compiled route.
pub(crate) struct Route {
    pub(crate) name: String,
    host: Option<String>,
    prefix: String,
    listeners: Vec<String>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) counters: Arc<RouteCounters>,
    /// The access log may carry this route's paths.
    pub(crate) log_path: bool,
}

/// Everything a request needs, swapped as one on reload.
pub(crate) struct Snapshot {
    routes: Vec<Route>,
    /// Per-listener request limits, by listener name.
    pub(crate) listeners: HashMap<String, ListenerConfig>,
}

/// Host without port, lower case, without trailing dot.
pub(crate) fn normalize_host(h: &str) -> String {
    let h = if h.starts_with('[') {
        // IPv6 literal: keep the brackets, drop the port.
        h.split_once(']')
            .map_or(h, |(a, _)| a)
            .trim_start_matches('[')
    } else {
        h.rsplit_once(':').map_or(h, |(a, _)| a)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == host,
    }
}

fn path_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        path.starts_with(prefix)
    } else {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    }
}

impl Snapshot {
    /// Compiles the configuration; reads CA files of HTTPS pools.
    pub(crate) fn build(
        cfg: &L7Config,
        health: &HealthMap,
        registry: &Registry,
    ) -> anyhow::Result<Snapshot> {
        let mut pools = HashMap::new();
        for p in &cfg.pools {
            pools.insert(p.name.clone(), Arc::new(Pool::new(p, health, registry)?));
        }
        let mut routes: Vec<(usize, &RouteConfig)> = cfg.routes.iter().enumerate().collect();
        routes.sort_by_key(|(i, r)| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len()), *i));
        let routes = routes
            .into_iter()
            .map(|(_, r)| {
                let pool = pools
                    .get(&r.pool)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("route {}: no pool {}", r.name, r.pool))?;
                Ok(Route {
                    name: r.name.clone(),
                    host: r.host.as_deref().map(|h| h.to_ascii_lowercase()),
                    prefix: r.path_prefix.clone(),
                    listeners: r.listeners.clone(),
                    counters: registry.route(&r.name, &r.pool),
                    log_path: r.log_path,
                    pool,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let listeners = cfg
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.clone()))
            .collect();
        Ok(Snapshot { routes, listeners })
    }

    /// The route for a request on `listener` to `host` (normalized) and `path`.
    pub(crate) fn find(&self, listener: &str, host: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| {
            (r.listeners.is_empty() || r.listeners.iter().any(|l| l == listener))
                && r.host.as_deref().is_none_or(|p| host_matches(p, host))
                && path_matches(&r.prefix, path)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        assert!(path_matches("/", "/anything"));
        assert!(path_matches("/ui", "/ui"));
        assert!(path_matches("/ui", "/ui/x"));
        assert!(!path_matches("/ui", "/uix"));
        assert!(path_matches("/ui/", "/ui/x"));
        assert!(host_matches("*.example.org", "a.example.org"));
        assert!(!host_matches("*.example.org", "example.org"));
        assert!(!host_matches("*.example.org", "a.b.example.org"));
        assert_eq!(normalize_host("LB.Example.org:7002"), "lb.example.org");
        assert_eq!(normalize_host("[::1]:443"), "::1");
    }

    #[test]
    fn most_specific_route_wins() {
        let cfg: L7Config = toml::from_str(
            r#"
            [[pool]]
            name = "a"
            [[pool.backend]]
            address = "127.0.0.1:1"
            [[route]]
            name = "any"
            pool = "a"
            [[route]]
            name = "api"
            path_prefix = "/api"
            pool = "a"
            [[route]]
            name = "ui-host"
            host = "ui.example.org"
            pool = "a"
            "#,
        )
        .unwrap();
        let s = Snapshot::build(&cfg, &HealthMap::default(), &Registry::default()).unwrap();
        assert_eq!(s.find("l", "x.org", "/api/v1").unwrap().name, "api");
        assert_eq!(
            s.find("l", "ui.example.org", "/api/v1").unwrap().name,
            "ui-host"
        );
        assert_eq!(s.find("l", "x.org", "/apix").unwrap().name, "any");
    }
}
