//! Test harness: a real `redis-server` per test, on its own ephemeral loopback port, with no
//! persistence and a throwaway working directory, killed when the guard drops.
//!
//! Ports come from binding `127.0.0.1:0` and are recorded in a process-wide set, so parallel
//! tests in one binary never pick the same one; a port stays reserved for the rest of the process
//! (also after the guard drops), so `kill` + `restart` always gets it back and a test that expects
//! a dropped server's port to go quiet never sees another test's server there. If another process
//! grabs the port before redis binds it, `start` tries again on a new port.
//!
//! Commands are spoken in hand-written RESP over a fresh TCP connection, so the harness needs no
//! redis client crate. The binary is `$REDIS_SERVER_BIN`, else `redis-server` from `PATH`.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a freshly spawned server gets to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Spawns per `start` (each on a new port) or `restart` (same port) when the bind is lost.
const LAUNCH_ATTEMPTS: usize = 3;
/// Per-request budget for `command`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Per-probe budget while waiting for readiness.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

static RESERVED: LazyLock<Mutex<HashSet<u16>>> = LazyLock::new(Default::default);

/// A running (or deliberately killed) `redis-server` owned by one test.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
    /// Arguments after the harness's own, kept for `restart`.
    extra: Vec<String>,
}

impl RedisServer {
    /// Spawns a server on a fresh port and waits until it answers `PING`.
    /// Panics with the server log if it cannot be started.
    pub async fn start() -> RedisServer {
        Self::start_with(&[], false).await
    }

    /// Like [`start`](Self::start), with `extra` arguments (relative paths are inside the
    /// server's own temp dir). With `cluster_bus`, the port 10000 above is reserved and free too.
    pub async fn start_with(extra: &[&str], cluster_bus: bool) -> RedisServer {
        let dir = TempDir::new().expect("create redis temp dir");
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let mut last = String::new();
        for _ in 0..LAUNCH_ATTEMPTS {
            let port = reserve_port(cluster_bus);
            match launch(port, dir.path(), &extra).await {
                Ok(child) => return RedisServer { port, child: Some(child), dir, extra },
                Err(Failure::PortTaken(msg)) => last = msg,
                Err(Failure::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!("redis-server lost its port {LAUNCH_ATTEMPTS} times; last attempt: {last}");
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILLs the server and reaps it. The port stays reserved for this guard. No-op if not
    /// running.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Starts the server again on the same port (killing it first if running) and waits for
    /// `PING`. Data is gone: nothing is persisted.
    pub async fn restart(&mut self) {
        self.kill().await;
        let mut last = String::new();
        for _ in 0..LAUNCH_ATTEMPTS {
            match launch(self.port, self.dir.path(), &self.extra).await {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(Failure::PortTaken(msg)) => {
                    last = msg;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(Failure::Fatal(msg)) => panic!("{msg}"),
            }
        }
        panic!("redis-server could not get its port {} back: {last}", self.port);
    }

    /// Whether the server process is still alive (it may also have died on its own).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends one command over a fresh connection and renders the reply: simple strings, bulk
    /// strings and integers as their text, nil as `(nil)`, errors as `(error) MSG`, arrays as
    /// `[a, b]`. Panics on I/O failure.
    pub async fn command(&self, args: &[&str]) -> String {
        request(self.port, args, COMMAND_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("redis {args:?} on port {}: {e}", self.port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        // `dir` (a TempDir) removes itself after this.
    }
}

/// A free port nobody in this process has had; with `bus`, port + 10000 (a cluster node's bus)
/// is free and reserved as well.
pub fn reserve_port(bus: bool) -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        let bus_port = port.checked_add(10_000);
        let bus_free = !bus || bus_port.is_some_and(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok());
        drop(listener);
        if !bus_free {
            continue;
        }
        let mut reserved = RESERVED.lock().unwrap_or_else(PoisonError::into_inner);
        if reserved.contains(&port) || bus && bus_port.is_some_and(|p| reserved.contains(&p)) {
            continue;
        }
        reserved.insert(port);
        if let (true, Some(p)) = (bus, bus_port) {
            reserved.insert(p);
        }
        return port;
    }
}

enum Failure {
    /// Someone else holds the port; worth retrying.
    PortTaken(String),
    Fatal(String),
}

/// Spawns `redis-server` on `port` and waits until it answers `PING` and is the process that
/// answered (not some other server that raced us to the port).
async fn launch(port: u16, dir: &Path, extra: &[String]) -> Result<Child, Failure> {
    let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());
    let log = dir.join("redis.log");
    let _ = std::fs::remove_file(&log); // so a failure shows this attempt's log only
    let mut child = Command::new(&bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .args(["--daemonize", "no", "--protected-mode", "no"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn `{bin}` (set REDIS_SERVER_BIN to override): {e}"));

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failure(
                &log,
                port,
                &format!("redis-server exited ({status}) before answering PING"),
            ));
        }
        if request(port, &["PING"], PROBE_TIMEOUT).await.is_ok_and(|r| r == "PONG") {
            // Make sure the PONG came from our child and not an intruder on the port.
            if let Ok(info) = request(port, &["INFO", "server"], PROBE_TIMEOUT).await {
                let pid = info.lines().find_map(|l| l.trim().strip_prefix("process_id:"));
                if pid == Some(child.id().to_string().as_str()) {
                    return Ok(child);
                }
                kill_and_reap(&mut child);
                let msg = format!("port {port} answered PING from another process ({pid:?})");
                return Err(Failure::PortTaken(msg));
            }
        }
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            return Err(failure(
                &log,
                port,
                &format!("redis-server did not answer PING within {READY_TIMEOUT:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn failure(log: &Path, port: u16, what: &str) -> Failure {
    let contents = std::fs::read_to_string(log).unwrap_or_else(|e| format!("<no log: {e}>"));
    let msg = format!("{what} on port {port}; log {}:\n{contents}", log.display());
    if contents.contains("Address already in use") {
        Failure::PortTaken(msg)
    } else {
        Failure::Fatal(msg)
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill(); // fails only if it already exited
    let _ = child.wait();
}

/// One command, one connection, one rendered reply.
pub(super) async fn request(port: u16, args: &[&str], timeout: Duration) -> io::Result<String> {
    let exchange = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream.write_all(&encode(args)).await?;
        let mut buf = Vec::new();
        loop {
            if let Some((reply, _)) = parse(&buf)? {
                return Ok(reply);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-reply"));
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no reply within {timeout:?}")))?
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

/// Parses one RESP2 reply from the front of `buf`: `Ok(None)` if incomplete, else the rendered
/// reply and the number of bytes it took.
fn parse(buf: &[u8]) -> io::Result<Option<(String, usize)>> {
    let Some((&kind, rest)) = buf.split_first() else { return Ok(None) };
    let Some(len) = rest.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    let line = String::from_utf8_lossy(&rest[..len]).into_owned();
    let next = 1 + len + 2;
    let invalid =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("bad RESP {what}: {line:?}"));
    let reply = match kind {
        b'+' | b':' => (line, next),
        b'-' => (format!("(error) {line}"), next),
        b'$' => {
            let Ok(len) = line.parse::<i64>() else { return Err(invalid("bulk length")) };
            if len < 0 {
                ("(nil)".to_owned(), next)
            } else {
                let stop = next + len as usize;
                if buf.len() < stop + 2 {
                    return Ok(None);
                }
                (String::from_utf8_lossy(&buf[next..stop]).into_owned(), stop + 2)
            }
        }
        b'*' => {
            let Ok(len) = line.parse::<i64>() else { return Err(invalid("array length")) };
            if len < 0 {
                ("(nil)".to_owned(), next)
            } else {
                let mut items = Vec::new();
                let mut at = next;
                for _ in 0..len {
                    let Some((item, used)) = parse(&buf[at..])? else { return Ok(None) };
                    items.push(item);
                    at += used;
                }
                (format!("[{}]", items.join(", ")), at)
            }
        }
        _ => return Err(invalid("type")),
    };
    Ok(Some(reply))
}
