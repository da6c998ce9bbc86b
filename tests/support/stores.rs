//! Running one scenario on several session stores: the embedded redb file, a real
//! `redis-server` started for the test, or a real three-master Redis Cluster.

use super::cluster::RedisCluster;
use super::redis::RedisServer;

#[derive(Clone, Copy, Debug)]
pub enum Store {
    Embedded,
    Redis,
    Cluster,
}

/// A store URL for `store`, and what must outlive it (the temp dir, the Redis servers).
pub struct StoreUrl {
    pub url: String,
    pub redis: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
    _dir: tempfile::TempDir,
}

impl Store {
    pub async fn url(self) -> StoreUrl {
        let dir = tempfile::tempdir().unwrap();
        match self {
            Store::Embedded => StoreUrl {
                url: format!("embedded:{}", dir.path().join("sessions.redb").display()),
                redis: None,
                cluster: None,
                _dir: dir,
            },
            Store::Redis => {
                let redis = RedisServer::start().await;
                StoreUrl { url: redis.url(), redis: Some(redis), cluster: None, _dir: dir }
            }
            Store::Cluster => {
                let cluster = RedisCluster::start().await;
                StoreUrl { url: cluster.url(), redis: None, cluster: Some(cluster), _dir: dir }
            }
        }
    }
}

/// A session (`GET /v1/sessions/{id}`), as its owner (`authorization`) reads it.
pub async fn session(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    authorization: &str,
) -> serde_json::Value {
    let response = client
        .get(format!("{base}/v1/sessions/{id}"))
        .header("authorization", authorization)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// A session's transcript, as its owner (`authorization`) reads it.
pub async fn transcript(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    authorization: &str,
) -> Vec<serde_json::Value> {
    let response = client
        .get(format!("{base}/v1/sessions/{id}/messages"))
        .header("authorization", authorization)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    body["data"].as_array().unwrap().clone()
}

/// Declares each named `async fn scenario(Store)` as `single_redis::scenario` and
/// `redis_cluster::scenario`.
#[macro_export]
macro_rules! on_redis_and_cluster {
    ($($scenario:ident),* $(,)?) => {
        mod single_redis {
            $(#[tokio::test] async fn $scenario() { super::$scenario($crate::support::stores::Store::Redis).await })*
        }
        mod redis_cluster {
            $(#[tokio::test] async fn $scenario() { super::$scenario($crate::support::stores::Store::Cluster).await })*
        }
    };
}

/// Declares each named `async fn scenario(Store)` as two tests, `embedded::scenario` and
/// `redis_store::scenario`.
#[macro_export]
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test] async fn $scenario() { super::$scenario($crate::support::stores::Store::Embedded).await })*
        }
        mod redis_store {
            $(#[tokio::test] async fn $scenario() { super::$scenario($crate::support::stores::Store::Redis).await })*
        }
    };
}
