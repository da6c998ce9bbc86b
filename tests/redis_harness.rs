//! Self-test for `support::redis` and `support::cluster`: a real `redis-server` (or three, as
//! a Redis Cluster) per test on its own ports.
mod support;

use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use support::cluster::RedisCluster;
use support::redis::RedisServer;

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_millis(200)).is_ok()
}

#[tokio::test]
async fn set_then_get_and_reply_rendering() {
    let redis = RedisServer::start().await;
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}/", redis.port()));
    assert_ne!(redis.port(), 6379);

    assert_eq!(redis.command(&["SET", "k", "v"]).await, "OK");
    assert_eq!(redis.command(&["GET", "k"]).await, "v");
    assert_eq!(redis.command(&["GET", "missing"]).await, "(nil)");
    assert_eq!(redis.command(&["DBSIZE"]).await, "1");
    assert_eq!(redis.command(&["KEYS", "*"]).await, "[k]");
    assert_eq!(redis.command(&["RPUSH", "l", "a", "b c", ""]).await, "3");
    assert_eq!(redis.command(&["LRANGE", "l", "0", "-1"]).await, "[a, b c, ]");
    assert_eq!(redis.command(&["LRANGE", "nope", "0", "-1"]).await, "[]");
    assert!(redis.command(&["NOSUCHCOMMAND"]).await.starts_with("(error) ERR unknown command"));
    // A reply bigger than one read.
    let big = "x".repeat(100_000);
    assert_eq!(redis.command(&["SET", "big", &big]).await, "OK");
    assert_eq!(redis.command(&["GET", "big"]).await, big);
}

#[tokio::test]
async fn concurrent_servers_get_distinct_ports_and_data() {
    let (mut a, b) = tokio::join!(RedisServer::start(), RedisServer::start());
    assert_ne!(a.port(), b.port());
    assert!(a.is_running() && a.url() != b.url());

    assert_eq!(a.command(&["SET", "only-in-a", "1"]).await, "OK");
    assert_eq!(a.command(&["DBSIZE"]).await, "1");
    assert_eq!(b.command(&["DBSIZE"]).await, "0");
}

#[tokio::test]
async fn kill_then_restart_on_the_same_port_without_data() {
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    assert_eq!(redis.command(&["SET", "k", "v"]).await, "OK");
    // An open client connection at kill time leaves the server side of it in TIME_WAIT; the
    // restart must still bind the port.
    let held = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();

    redis.kill().await;
    assert!(!redis.is_running());
    assert!(!accepts(port), "port {port} still accepts after kill");
    redis.kill().await; // idempotent
    drop(held);

    redis.restart().await;
    assert_eq!(redis.port(), port);
    assert!(redis.is_running());
    assert_eq!(redis.command(&["PING"]).await, "PONG");
    assert_eq!(redis.command(&["GET", "k"]).await, "(nil)");
    assert_eq!(redis.command(&["DBSIZE"]).await, "0");

    // Restart while running kills the old process first.
    assert_eq!(redis.command(&["SET", "k2", "v"]).await, "OK");
    redis.restart().await;
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["DBSIZE"]).await, "0");
}

#[tokio::test]
async fn drop_kills_the_server() {
    let redis = RedisServer::start().await;
    let port = redis.port();
    assert!(accepts(port));
    drop(redis);

    let deadline = Instant::now() + Duration::from_secs(5);
    while accepts(port) {
        assert!(Instant::now() < deadline, "port {port} still accepts after drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_cluster_of_three_masters_forms_and_drop_kills_every_node() {
    let cluster = RedisCluster::start().await;
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
    assert_eq!(
        cluster.url(),
        format!("redis+cluster://127.0.0.1:{},127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1], ports[2])
    );

    // Every node is a master with a third of the slots, and each listens on its bus port
    for node in cluster.nodes() {
        let info = node.command(&["CLUSTER", "INFO"]).await;
        assert!(info.contains("cluster_state:ok") && info.contains("cluster_size:3"), "{info}");
        assert!(node.command(&["ROLE"]).await.starts_with("[master"));
        assert!(accepts(node.port() + 10_000), "bus port of {}", node.port());
    }
    // A key lives on the one node owning its slot; the others redirect
    let owner = cluster.owner("k").await;
    assert_eq!(cluster.nodes()[owner].command(&["SET", "k", "v"]).await, "OK");
    assert_eq!(cluster.holder("k").await, Some(owner));
    let other = cluster.nodes()[(owner + 1) % 3].command(&["GET", "k"]).await;
    let slot = cluster.slot("k").await;
    assert!(other.starts_with(&format!("(error) MOVED {slot} 127.0.0.1:{}", ports[owner])), "{other}");

    drop(cluster);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ports.iter().any(|&p| accepts(p)) {
        assert!(Instant::now() < deadline, "a node still accepts after drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
