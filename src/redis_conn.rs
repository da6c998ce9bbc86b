//! One Redis connection type for a single server and a Redis Cluster, so the session store
//! (and anything else sharing its Redis) is written once against [`redis::aio::ConnectionLike`].
//!
//! URLs: `redis://` and `rediss://` name one server (a [`ConnectionManager`] that reconnects on
//! its own); `redis+cluster://[user:password@]host:port,host:port[,...]` names a Cluster by its
//! seed nodes (redis-rs's cluster client, which learns the slot map and follows `MOVED`).
//! Callers keep every multi-key command inside one hash tag (`{...}`), so it lands on one slot.
//! `rediss://` is TLS with rustls, trusting the system's store (or `SSL_CERT_FILE`);
//! `rediss+cluster://` is refused: TLS to a Cluster is neither wired nor tested.
//!
//! This module owns connecting, timeouts and retries; it knows nothing about sessions.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, Value};

const SINGLE: &str = "redis://";
const SINGLE_TLS: &str = "rediss://";
const CLUSTER: &str = "redis+cluster://";
const CLUSTER_TLS: &str = "rediss+cluster://";

/// Retries of one cluster command after a connection error or a slot move, and reconnection
/// attempts of a single server's connection. Small on purpose: callers bound every operation
/// with their own timeout and decide what a failure means.
const CLUSTER_RETRIES: u32 = 2;
const SINGLE_RECONNECT_RETRIES: usize = 1;
/// Longest wait between cluster retries, in ms.
const MAX_RETRY_WAIT_MS: u64 = 100;

/// A connection to one Redis server or to a Redis Cluster. Cheap to clone: clones share the
/// underlying connections.
#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisConn {
    // Nothing from the URL: it may carry a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisConn::Single(_) => f.write_str("RedisConn::Single"),
            RedisConn::Cluster(_) => f.write_str("RedisConn::Cluster"),
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_command(cmd),
            RedisConn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(conn) => conn.get_db(),
            RedisConn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Whether `s` is a Redis URL [`connect`] accepts: `redis://`, `rediss://` or
/// `redis+cluster://`.
pub fn is_redis_url(s: &str) -> bool {
    [SINGLE, SINGLE_TLS, CLUSTER].iter().any(|scheme| s.starts_with(scheme))
}

/// Connects to `url` and checks the server (or every seed's cluster) answers. `timeout`
/// bounds connecting, each response, and this whole call; a cluster command is retried at most
/// twice (reconnecting, or following the cluster's new slot map). Later, lost connections are
/// re-established on their own.
pub async fn connect(url: &str, timeout: Duration) -> Result<RedisConn, RedisError> {
    let connecting = async {
        if url.starts_with(CLUSTER_TLS) {
            return Err(invalid("`rediss+cluster://` (TLS to a Redis Cluster) is not supported"));
        }
        if let Some(rest) = url.strip_prefix(CLUSTER) {
            let client = ClusterClientBuilder::new(cluster_seeds(rest)?)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(CLUSTER_RETRIES)
                .min_retry_wait(MAX_RETRY_WAIT_MS / 10)
                .max_retry_wait(MAX_RETRY_WAIT_MS)
                .build()?;
            return Ok(RedisConn::Cluster(client.get_async_connection().await?));
        }
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(SINGLE_RECONNECT_RETRIES);
        Ok(RedisConn::Single(ConnectionManager::new_with_config(client, config).await?))
    };
    tokio::time::timeout(timeout, connecting).await.map_err(|_| {
        RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from Redis within {timeout:?}"),
        ))
    })?
}

/// `[user:password@]host:port,host:port` → one `redis://` URL per seed, each with the
/// credentials (redis-rs wants them on every seed, and equal).
fn cluster_seeds(rest: &str) -> Result<Vec<String>, RedisError> {
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    let mut seeds = Vec::new();
    for host in hosts.split(',') {
        let valid = host.rsplit_once(':').is_some_and(|(name, port)| {
            !name.is_empty() && !name.contains(['/', '?', '#']) && port.parse::<u16>().is_ok()
        });
        if !valid {
            return Err(invalid("a `redis+cluster://` URL lists seed nodes as `host:port,host:port`"));
        }
        seeds.push(format!("{SINGLE}{userinfo}{host}"));
    }
    Ok(seeds)
}

fn invalid(message: &'static str) -> RedisError {
    RedisError::from((ErrorKind::InvalidClientConfig, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls() {
        assert!(is_redis_url("redis://127.0.0.1:6379/"));
        assert!(is_redis_url("rediss://cache.internal:6380"));
        assert!(is_redis_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000"));
        assert!(!is_redis_url("rediss+cluster://10.0.0.1:7000"));
        assert!(!is_redis_url("embedded:data/ctxgate.redb"));
        assert!(!is_redis_url("http://127.0.0.1:6379"));
    }

    #[test]
    fn cluster_seeds_carry_the_credentials() {
        assert_eq!(cluster_seeds("a:7000,b:7001/").unwrap(), ["redis://a:7000", "redis://b:7001"]);
        assert_eq!(
            cluster_seeds("user:p%40ss@a:7000,[::1]:7001").unwrap(),
            ["redis://user:p%40ss@a:7000", "redis://user:p%40ss@[::1]:7001"]
        );
        for bad in ["", "a", "a:7000,", "a:x", ":7000", "a:7000/0"] {
            assert!(cluster_seeds(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn refused_urls_say_why() {
        let err = connect("rediss+cluster://a:7000", Duration::from_secs(1)).await.unwrap_err();
        assert!(err.to_string().contains("not supported"), "{err}");
        let err = connect("redis+cluster://a", Duration::from_secs(1)).await.unwrap_err();
        assert!(err.to_string().contains("host:port"), "{err}");
    }
}
