//! Discovery: a DNS pool's name resolved every `dns_interval`, each answer replacing the pool's
//! endpoints (a Kubernetes headless Service answers with one address per ready pod).
//!
//! Resolution goes through the [`Resolver`] trait so tests can script answers; the gateway uses
//! [`SystemResolver`] (the system's resolver, as `getaddrinfo` sees `/etc/hosts` and
//! `resolv.conf`). A failed resolution keeps the last endpoints: a DNS outage should not empty a
//! pool whose replicas are still serving.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use tokio::sync::watch;

use super::pool::Pool;

/// The addresses of `host` (with `port` unless the answer carries its own).
pub trait Resolver: fmt::Debug + Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The system resolver, through `tokio::net::lookup_host`.
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Which resolver DNS pools use; replaced at run time by [`super::Upstreams::set_resolver`].
pub(super) type Resolvers = watch::Receiver<Arc<dyn Resolver>>;

/// Resolves the pool's name now, then every interval, and at once whenever the resolver is
/// replaced. Ends when the pool is dropped.
pub(super) async fn run(pool: Weak<Pool>, mut resolvers: Resolvers) {
    loop {
        let resolver = resolvers.borrow_and_update().clone();
        let Some((host, port, interval)) =
            pool.upgrade().and_then(|p| p.dns.as_ref().map(|d| (d.host.clone(), d.port, d.interval)))
        else {
            return;
        };
        let answer = tokio::select! {
            answer = resolver.resolve(&host, port) => answer,
            () = replaced(&mut resolvers) => continue,
        };
        let Some(current) = pool.upgrade() else { return };
        match answer {
            Ok(addresses) => {
                current.record_resolution("ok");
                current.set_addresses(addresses);
            }
            Err(err) => {
                current.record_resolution("error");
                current.mark_known();
                tracing::warn!(upstream = %current.upstream(), host = %host, error = %err, "cannot resolve the pool's name; keeping its endpoints");
            }
        }
        drop(current);
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = replaced(&mut resolvers) => {}
        }
    }
}

/// Resolves when the resolver is replaced; never, once nobody can replace it.
async fn replaced(resolvers: &mut Resolvers) {
    if resolvers.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::config::PoolConfig;
    use crate::telemetry::Metrics;

    /// Answers from a script, one per call; the last answer repeats.
    #[derive(Debug)]
    struct Scripted(Mutex<VecDeque<io::Result<Vec<SocketAddr>>>>, Mutex<usize>);

    impl Resolver for Scripted {
        fn resolve<'a>(
            &'a self,
            _host: &'a str,
            _port: u16,
        ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
            *self.1.lock().unwrap() += 1;
            let mut answers = self.0.lock().unwrap();
            let answer = match answers.len() {
                1 => match &answers[0] {
                    Ok(a) => Ok(a.clone()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                },
                _ => answers.pop_front().unwrap(),
            };
            Box::pin(async move { answer })
        }
    }

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 2, 0, i], 8000))
    }

    fn names(pool: &Pool) -> Vec<String> {
        pool.endpoints().iter().map(|e| e.name.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_pool_follows_each_answer_and_keeps_its_endpoints_when_resolution_fails() {
        let config = PoolConfig {
            dns: Some("http://replicas.test:8000/v1".into()),
            dns_interval: Duration::from_secs(5),
            ..PoolConfig::default()
        };
        let pool = Arc::new(Pool::new("p", &config, Metrics::new().pools).unwrap());
        let script = Arc::new(Scripted(
            Mutex::new(VecDeque::from([
                Ok(vec![addr(1), addr(2)]),
                Ok(vec![addr(1), addr(2), addr(3)]),
                Err(io::Error::other("SERVFAIL")),
                Ok(vec![addr(3)]),
            ])),
            Mutex::new(0),
        ));
        let (_keep, resolvers) = watch::channel(script.clone() as Arc<dyn Resolver>);
        tokio::spawn(run(Arc::downgrade(&pool), resolvers));

        let wait_for = |calls: usize| {
            let script = script.clone();
            async move {
                while *script.1.lock().unwrap() < calls {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        wait_for(1).await;
        tokio::task::yield_now().await;
        assert_eq!(names(&pool), ["10.2.0.1:8000", "10.2.0.2:8000"]);
        tokio::time::advance(Duration::from_secs(5)).await;
        wait_for(2).await;
        tokio::task::yield_now().await;
        assert_eq!(names(&pool), ["10.2.0.1:8000", "10.2.0.2:8000", "10.2.0.3:8000"]);
        tokio::time::advance(Duration::from_secs(5)).await;
        wait_for(3).await;
        tokio::task::yield_now().await;
        assert_eq!(names(&pool).len(), 3, "a failed resolution keeps the endpoints");
        tokio::time::advance(Duration::from_secs(5)).await;
        wait_for(4).await;
        tokio::task::yield_now().await;
        assert_eq!(names(&pool), ["10.2.0.3:8000"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_ends_with_the_pool() {
        let config = PoolConfig { dns: Some("http://replicas.test:8000/v1".into()), ..PoolConfig::default() };
        let pool = Arc::new(Pool::new("p", &config, Metrics::new().pools).unwrap());
        let script = Arc::new(Scripted(Mutex::new(VecDeque::from([Ok(vec![addr(1)])])), Mutex::new(0)));
        let (_keep, resolvers) = watch::channel(script as Arc<dyn Resolver>);
        let task = tokio::spawn(run(Arc::downgrade(&pool), resolvers));
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(pool);
        tokio::time::advance(Duration::from_secs(10)).await;
        tokio::time::timeout(Duration::from_secs(1), task).await.unwrap().unwrap();
    }
}
