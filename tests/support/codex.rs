//! The Codex CLI the tests run: the npm package `@openai/codex` (its native binary ships in a
//! per-platform package it depends on), installed on first use with a pinned version under
//! cargo's target directory, so `cargo test` needs only `npm` on the machine.
//! `CTXGATE_TEST_CODEX` names a `codex` binary to use instead.
//!
//! Test binaries run in parallel processes: the package is installed in a private directory
//! and renamed into place, so a reader never sees half of one; a loser of the race discards its
//! copy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The version the tests pin. Changing it installs anew (the directory carries it).
pub const VERSION: &str = "0.171.0";

/// The `codex` binary to run.
pub fn codex() -> &'static Path {
    static CODEX: OnceLock<PathBuf> = OnceLock::new();
    CODEX.get_or_init(|| match std::env::var_os("CTXGATE_TEST_CODEX") {
        Some(path) => PathBuf::from(path),
        None => provision(),
    })
}

fn provision() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let installed = root.join(format!("test-codex-{VERSION}"));
    let binary = binary_in(&installed);
    if binary.exists() {
        return binary;
    }
    std::fs::create_dir_all(root).expect("create the target tmp dir");
    let staging = root.join(format!("test-codex-staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).expect("create the staging dir");
    let output = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--no-save", "--ignore-scripts", "--prefix"])
        .arg(&staging)
        .arg(format!("@openai/codex@{VERSION}"))
        .env("npm_config_update_notifier", "false")
        .output()
        .unwrap_or_else(|e| panic!("npm install of Codex CLI: cannot start npm: {e}"));
    assert!(
        output.status.success(),
        "npm install of Codex CLI failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Another test process may have finished first: keep its copy, drop ours.
    if std::fs::rename(&staging, &installed).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    assert!(binary.exists(), "no Codex binary at {}", binary.display());
    binary
}

/// Where the platform package puts the native binary (as the package's own launcher finds it).
fn binary_in(prefix: &Path) -> PathBuf {
    let (package, triple) = match (std::env::consts::OS, std::env::consts::ARCH) {
        ("linux", "x86_64") => ("codex-linux-x64", "x86_64-unknown-linux-musl"),
        ("linux", "aarch64") => ("codex-linux-arm64", "aarch64-unknown-linux-musl"),
        ("macos", "x86_64") => ("codex-darwin-x64", "x86_64-apple-darwin"),
        ("macos", "aarch64") => ("codex-darwin-arm64", "aarch64-apple-darwin"),
        (os, arch) => panic!("Codex CLI ships no binary for {os}/{arch}"),
    };
    prefix.join("node_modules/@openai").join(package).join("vendor").join(triple).join("bin/codex")
}
