//! The `ctxgate` binary: parses the command line, loads and validates configuration, sets up
//! logging, binds, and serves until SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ctxgate::config::{Config, ConfigError, EnvSource, ProcessEnv, ValidConfig};
use ctxgate::{AppState, StartupError};

const DEFAULT_CONFIG: &str = "config/ctxgate.toml";

#[derive(Parser, Debug)]
#[command(name = "ctxgate", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Serve(ServeArgs),
    /// Validate a configuration file, print every problem with its key path, exit 1 on any.
    CheckConfig {
        /// The file to check.
        #[arg(default_value = DEFAULT_CONFIG)]
        path: PathBuf,
    },
    /// Read a chat request and write what ctxgate would send upstream (rules only: no state
    /// sheet is written offline); per-rule statistics go to stderr.
    Compress(CompressArgs),
    /// Read a gateway key on stdin (one line) and print its SHA-256, as `[[auth.keys]]` wants it.
    HashKey,
}

#[derive(Args, Debug)]
struct CompressArgs {
    /// Configuration file (TOML); default config/ctxgate.toml if it exists.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override the policy's mode (off, rules, hybrid).
    #[arg(long)]
    mode: Option<String>,
    /// Compact even under the high-water mark.
    #[arg(long)]
    force: bool,
    /// Statistics format on stderr.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    stats: String,
    /// The request file, or - for standard input.
    #[arg(default_value = "-")]
    file: PathBuf,
}

#[derive(Args, Debug, Default)]
struct ServeArgs {
    /// Configuration file (TOML). Without this flag, config/ctxgate.toml is used if it exists.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on, overriding server.listen.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Base URL of the default upstream (e.g. http://127.0.0.1:9000/v1), overriding the config.
    #[arg(long)]
    upstream: Option<String>,
    /// Session store, overriding sessions.store: `embedded:PATH`, `redis://HOST:PORT` or
    /// `redis+cluster://HOST:PORT,HOST:PORT`.
    #[arg(long)]
    store: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { path }) => check_config(&path),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Compress(args)) => compress(args),
        Some(Command::HashKey) => hash_key(),
        None => serve(cli.serve),
    }
}

fn check_config(path: &Path) -> ExitCode {
    match Config::read(Some(path), &ProcessEnv).and_then(|c| c.validate(&ProcessEnv)) {
        Ok(_) => {
            let _ = writeln!(std::io::stdout(), "{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            report(path, &err);
            ExitCode::FAILURE
        }
    }
}

fn hash_key() -> ExitCode {
    let mut line = String::new();
    if let Err(err) = std::io::stdin().read_line(&mut line) {
        let _ = writeln!(std::io::stderr(), "cannot read the key: {err}");
        return ExitCode::FAILURE;
    }
    // The key is the line without its line ending; spaces inside would be part of it.
    let key = line.trim_end_matches(['\r', '\n']);
    if key.is_empty() {
        let _ = writeln!(std::io::stderr(), "no key on stdin");
        return ExitCode::FAILURE;
    }
    let _ = writeln!(std::io::stdout(), "{}", ctxgate::auth::hash_key(key.as_bytes()));
    ExitCode::SUCCESS
}

fn compress(args: CompressArgs) -> ExitCode {
    use std::io::Read;

    use ctxgate::compress::rules::Rule;
    use ctxgate::compress::Acted;
    use ctxgate::config::CompressionMode;

    let env = ProcessEnv;
    let path =
        args.config.or_else(|| Path::new(DEFAULT_CONFIG).exists().then(|| PathBuf::from(DEFAULT_CONFIG)));
    let config =
        match path.as_deref().map_or_else(|| Config::parse("", &env), |p| Config::parse_file(p, &env)) {
            Ok(config) => config,
            Err(err) => {
                report(path.as_deref().unwrap_or(Path::new("<defaults>")), &err);
                return ExitCode::FAILURE;
            }
        };
    let mode = match args.mode.as_deref() {
        None => None,
        Some("off") => Some(CompressionMode::Off),
        Some("rules") => Some(CompressionMode::Rules),
        Some("hybrid") => Some(CompressionMode::Hybrid),
        Some(other) => {
            let _ = writeln!(std::io::stderr(), "--mode must be off, rules or hybrid, not {other}");
            return ExitCode::FAILURE;
        }
    };
    let mut input = Vec::new();
    let read = if args.file.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut input).map(|_| ())
    } else {
        std::fs::read(&args.file).map(|bytes| input = bytes)
    };
    if let Err(err) = read {
        let _ = writeln!(std::io::stderr(), "cannot read {}: {err}", args.file.display());
        return ExitCode::FAILURE;
    }
    let (body, plan) = match ctxgate::compress::compress_offline(&config, &input, mode, args.force) {
        Ok(out) => out,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "not a valid chat request: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&body).and_then(|()| stdout.write_all(b"\n"));
    let rules: serde_json::Map<String, serde_json::Value> =
        Rule::ALL.iter().map(|r| (r.name().to_string(), plan.stats.get(*r).into())).collect();
    // Say why the output is the input, so "nothing happened" is never a puzzle.
    let note = match plan.acted {
        Acted::Off => Some(format!(
            "nothing done: compression is off for this model in {} (compression.mode); pass --mode rules or --mode hybrid",
            path.as_deref().map_or_else(|| "the defaults".to_string(), |p| p.display().to_string())
        )),
        Acted::None => Some(
            "nothing done: the request is under the compaction mark (compression.high_water of \
             compression.context_window); pass --force to compact anyway"
                .to_string(),
        ),
        Acted::Rules | Acted::Hybrid => None,
    };
    let mut stderr = std::io::stderr().lock();
    if args.stats == "json" {
        let stats = serde_json::json!({
            "tokens_before": plan.tokens_before,
            "tokens_after": plan.tokens_after,
            "acted": plan.acted.as_str(),
            "saved_by_rule": rules,
            "note": note,
        });
        let _ = writeln!(stderr, "{stats}");
    } else {
        let _ = writeln!(stderr, "tokens before  {:>8}", plan.tokens_before);
        let _ = writeln!(stderr, "tokens after   {:>8}  ({})", plan.tokens_after, plan.acted.as_str());
        for (name, saved) in &rules {
            let _ = writeln!(stderr, "  {name:<24}{saved:>8}");
        }
        if let Some(note) = note {
            let _ = writeln!(stderr, "{note}");
        }
    }
    ExitCode::SUCCESS
}

fn report(path: &Path, err: &ConfigError) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "{}: {} problem(s)", path.display(), err.0.len());
    for issue in &err.0 {
        let _ = writeln!(stderr, "  {issue}");
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let env = ProcessEnv;
    let path = args
        .config
        .clone()
        .or_else(|| Path::new(DEFAULT_CONFIG).exists().then(|| PathBuf::from(DEFAULT_CONFIG)));
    let mut config = Config::read(path.as_deref(), &env);
    if let Ok(config) = &mut config {
        if let Some(listen) = args.listen {
            config.server.listen = listen;
        }
        if let Some(upstream) = args.upstream {
            config.set_default_upstream(upstream);
        }
        if let Some(store) = args.store {
            config.sessions.store = store;
        }
    }
    let config = match config.and_then(|c| c.validated(&env)) {
        Ok(config) => config,
        Err(err) => {
            // Without a file, say where the default one was looked for: a start outside the
            // repository's root is the usual reason none was found.
            let label = path.clone().unwrap_or_else(|| {
                let cwd = std::env::current_dir().map_or_else(|_| ".".into(), |d| d.display().to_string());
                PathBuf::from(format!("<defaults: no {DEFAULT_CONFIG} in {cwd}>"))
            });
            report(&label, &err);
            return ExitCode::FAILURE;
        }
    };
    ctxgate::telemetry::init_tracing(&config.telemetry);

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config, &env)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "ctxgate failed to start");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ValidConfig, env: &dyn EnvSource) -> Result<(), StartupError> {
    let addr = config.server.listen;
    let upstreams = config.upstreams.len();
    let state = AppState::new(config, env).await?;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| StartupError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(listen = %local, upstreams, "ctxgate listening");
    ctxgate::serve(listener, state, shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
