//! The Python the tests run (the official `openai` SDK, the OpenAI Agents SDK, the MCP test
//! server): a venv under cargo's target directory, made on first use with pinned packages, so
//! `cargo test` passes on a fresh machine with only `python3` installed. `CTXGATE_TEST_PYTHON`
//! names an interpreter to use instead (one that already has the packages).
//!
//! Test binaries run in parallel processes: the venv is built in a private directory and
//! renamed into place, so a reader never sees half of one; a loser of the race discards its
//! copy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// What the tests import, pinned. Changing this list builds a new venv (its name carries a
/// hash of the list).
/// `websockets` is the SDK's own optional dependency for `responses.connect()`.
const REQUIREMENTS: &[&str] =
    &["openai==3.63.0", "websockets==15.0.1", "mcp==1.30.0", "openai-agents==0.24.0"];

/// The interpreter to run test scripts with.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| match std::env::var_os("CTXGATE_TEST_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => provision(),
    })
}

/// Runs `tests/e2e/{script}` with `base` (the gateway's `/v1` URL) as its argument and `input`
/// on its stdin; panics with its stderr unless it succeeds, and returns what it printed, as JSON.
pub async fn run_script(script: &str, base: &str, input: &[u8]) -> serde_json::Value {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e").join(script);
    let python = python();
    let mut child = tokio::process::Command::new(python)
        .arg(&path)
        .arg(base)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input).await.expect("the script reads its input");
    drop(stdin);
    let output = child.wait_with_output().await.expect("the script ran");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script} failed:\n{stderr}");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}):\n{stderr}"))
}

fn provision() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = root.join(format!("test-venv-{:016x}", fingerprint()));
    let python = venv.join("bin/python");
    if python.exists() {
        return python;
    }
    std::fs::create_dir_all(root).expect("create the target tmp dir");
    let staging = root.join(format!("test-venv-staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    run(Command::new("python3").args(["-m", "venv"]).arg(&staging), "python3 -m venv");
    run(
        Command::new(staging.join("bin/python"))
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
            .args(REQUIREMENTS),
        "pip install of the test packages",
    );
    // Another test process may have finished first: keep its venv, drop ours.
    if std::fs::rename(&staging, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    assert!(python.exists(), "no interpreter at {}", python.display());
    python
}

fn run(command: &mut Command, what: &str) {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(output.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

/// A hash of the requirement list (FNV-1a: stable across Rust versions, unlike `DefaultHasher`).
fn fingerprint() -> u64 {
    REQUIREMENTS
        .iter()
        .flat_map(|r| r.bytes().chain([0]))
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}
