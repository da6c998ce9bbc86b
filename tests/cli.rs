//! The binary's own messages, run as an operator would: from a directory of its own, with its
//! output going to pipes rather than a terminal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ctxgate(dir: &std::path::Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ctxgate"));
    command.current_dir(dir).stdin(Stdio::null());
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until a gateway on `port` answers `/healthz` (it is serving, its start-up logged).
fn wait_healthy(port: u16) {
    use std::io::Write;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let mut answer = String::new();
            let asked = stream.write_all(b"GET /healthz HTTP/1.0\r\nhost: x\r\n\r\n").is_ok();
            if asked && stream.read_to_string(&mut answer).is_ok() && answer.starts_with("HTTP/1.") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "ctxgate did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command` until it exits (bounded), returning its stderr.
fn stderr_of(command: &mut Command) -> (bool, String) {
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ctxgate did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status.success(), stderr)
}

#[test]
fn without_a_config_file_the_error_says_where_it_looked_and_what_is_enough() {
    // Given a directory without config/ctxgate.toml
    let dir = tempfile::tempdir().unwrap();
    // When ctxgate starts there with no flags
    let (ok, stderr) =
        stderr_of(ctxgate(dir.path()).args(["--listen", &format!("127.0.0.1:{}", free_port())]));
    // Then it says where the default file was looked for, and that --upstream alone is enough
    assert!(!ok);
    let cwd = dir.path().canonicalize().unwrap();
    assert!(stderr.contains(&format!("no config/ctxgate.toml in {}", cwd.display())), "{stderr}");
    assert!(stderr.contains("read from the working directory"), "{stderr}");
    assert!(stderr.contains("`--upstream URL` alone is enough"), "{stderr}");
}

#[test]
fn a_second_gateway_on_the_same_file_names_it_and_the_ways_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}", dir.path().join("data/ctxgate.redb").display());
    let serve = |port: u16| {
        let mut command = ctxgate(dir.path());
        command.args(["--upstream", "http://127.0.0.1:9/v1", "--store", &store]);
        command.args(["--listen", &format!("127.0.0.1:{port}")]);
        command
    };
    // Given a gateway serving from the directory's store
    let port = free_port();
    let mut first = serve(port).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_healthy(port);
    // When a second one starts on the same file
    let (ok, stderr) = stderr_of(&mut serve(free_port()));
    let _ = first.kill();
    let _ = first.wait();
    // Then it exits naming the file, --store, the config key and Redis
    assert!(!ok);
    assert!(stderr.contains(&dir.path().join("data/ctxgate.redb").display().to_string()), "{stderr}");
    assert!(stderr.contains("--store") && stderr.contains("sessions.store"), "{stderr}");
    assert!(stderr.contains("redis://"), "{stderr}");
}

#[test]
fn check_config_refuses_gateway_keys_with_an_upstream_that_gets_no_credential() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    std::fs::write(
        &file,
        format!(
            "[[upstreams]]\nname = \"openai\"\nbase_url = \"https://api.openai.com/v1\"\n\
             [[auth.keys]]\nname = \"team\"\nsha256 = \"{}\"\n",
            "a".repeat(64)
        ),
    )
    .unwrap();
    let (ok, stderr) = stderr_of(ctxgate(dir.path()).arg("check-config").arg(&file));
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("upstreams[0].api_key_env"), "{stderr}");
    assert!(stderr.contains("no credential"), "{stderr}");
}

#[test]
fn check_config_takes_the_session_header_as_one_name_or_a_list() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sessions.toml");
    let upstream = "[[upstreams]]\nname = \"local\"\nbase_url = \"http://127.0.0.1:8081/v1\"\n";
    for ok in [r#"header = "x-session-id""#, r#"header = ["x-session-id", "thread-id"]"#] {
        std::fs::write(&file, format!("[sessions]\n{ok}\nprompt_cache_key = true\n{upstream}")).unwrap();
        let (ok_run, stderr) = stderr_of(ctxgate(dir.path()).arg("check-config").arg(&file));
        assert!(ok_run, "{ok}: {stderr}");
    }
    std::fs::write(&file, format!("[sessions]\nheader = [\"x-session-id\", \"bad name\"]\n{upstream}"))
        .unwrap();
    let (ok, stderr) = stderr_of(ctxgate(dir.path()).arg("check-config").arg(&file));
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("sessions.header[1]: `bad name` is not a valid header name"), "{stderr}");
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("embedded:{}", dir.path().join("s.redb").display());
    let port = free_port();
    let mut child = ctxgate(dir.path())
        .args(["--upstream", "http://127.0.0.1:9/v1", "--store", &store])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The start-up line is written before the gateway serves.
    wait_healthy(port);
    let _ = child.kill();
    let _ = child.wait();
    let mut logs = String::new();
    child.stderr.take().unwrap().read_to_string(&mut logs).unwrap();
    assert!(logs.contains("ctxgate listening"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "colour codes in piped logs: {logs:?}");
}
