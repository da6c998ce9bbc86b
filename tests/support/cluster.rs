//! Test harness: a real three-master Redis Cluster per test. Three `redis-server` processes in
//! cluster mode, each on its own loopback port whose bus port (port + 10000) is free too, each
//! with its own temp dir and `nodes.conf`, no persistence; joined by `redis-cli --cluster
//! create` and ready once every node reports `cluster_state:ok`. Dropping the guard kills all
//! three. The CLI is `$REDIS_CLI_BIN`, else `redis-cli` from `PATH`.

use std::time::{Duration, Instant};

use super::redis::{request, RedisServer};

const NODES: usize = 3;
/// Budget for `redis-cli --cluster create` and for the cluster to agree on its slot map.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three masters, splits the 16384 slots among them, and waits until every node
    /// says the cluster is ok. Panics (with the CLI's output) if the cluster does not form.
    pub async fn start() -> RedisCluster {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ];
        let (a, b, c) = tokio::join!(
            RedisServer::start_with(&args, true),
            RedisServer::start_with(&args, true),
            RedisServer::start_with(&args, true),
        );
        let cluster = RedisCluster { nodes: vec![a, b, c] };

        let cli = std::env::var("REDIS_CLI_BIN").unwrap_or_else(|_| "redis-cli".to_owned());
        let mut create = tokio::process::Command::new(&cli);
        create.args(["--cluster", "create"]);
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]).kill_on_drop(true);
        let output = tokio::time::timeout(FORM_TIMEOUT, create.output())
            .await
            .unwrap_or_else(|_| panic!("`{cli} --cluster create` did not finish within {FORM_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("spawn `{cli}` (set REDIS_CLI_BIN to override): {e}"));
        assert!(
            output.status.success(),
            "`{cli} --cluster create` failed ({}):\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        cluster.wait_until_ok().await;
        cluster
    }

    /// Polls `CLUSTER INFO` on every node until all say the cluster is ok with every slot
    /// served and every node known. Panics after a deadline.
    pub async fn wait_until_ok(&self) {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            let mut ready = 0;
            for node in &self.nodes {
                let info = request(node.port(), &["CLUSTER", "INFO"], Duration::from_secs(1)).await;
                let info = info.unwrap_or_default();
                let ok = info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && info.contains(&format!("cluster_known_nodes:{NODES}"));
                ready += usize::from(ok);
            }
            if ready == NODES {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster was not ok within {FORM_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port())).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// `CLUSTER KEYSLOT key`, as any node computes it.
    pub async fn slot(&self, key: &str) -> u16 {
        self.nodes[0].command(&["CLUSTER", "KEYSLOT", key]).await.parse().unwrap()
    }

    /// The index of the node that holds `key`: the one answering `EXISTS` with 1 (the others
    /// answer `MOVED`). `None` if no node has it.
    pub async fn holder(&self, key: &str) -> Option<usize> {
        let mut holder = None;
        for (i, node) in self.nodes.iter().enumerate() {
            match node.command(&["EXISTS", key]).await.as_str() {
                "1" => {
                    assert!(holder.is_none(), "{key} is on two nodes");
                    holder = Some(i);
                }
                "0" => {}
                moved => assert!(moved.starts_with("(error) MOVED"), "EXISTS {key}: {moved}"),
            }
        }
        holder
    }

    /// The index of the node that owns `key`'s slot (whether or not the key exists).
    pub async fn owner(&self, key: &str) -> usize {
        for (i, node) in self.nodes.iter().enumerate() {
            if !node.command(&["EXISTS", key]).await.starts_with("(error) MOVED") {
                return i;
            }
        }
        panic!("no node owns the slot of {key}");
    }
}
