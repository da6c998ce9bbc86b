//! The `ctxgate` binary: parses the command line, loads and validates configuration, sets up
//! logging, binds, and serves until SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ctxgate::config::{Config, ConfigError, EnvSource, ProcessEnv};
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
    /// Session store, overriding sessions.store: `embedded:PATH` or `redis://HOST:PORT`.
    #[arg(long)]
    store: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { path }) => check_config(&path),
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn check_config(path: &Path) -> ExitCode {
    match Config::load(Some(path), &ProcessEnv) {
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
    let mut config = match path.as_deref() {
        Some(path) => Config::parse_file(path, &env),
        None => Config::parse("", &env),
    };
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
    let config = match config.and_then(|c| c.validate(&env).map(|()| c)) {
        Ok(config) => config,
        Err(err) => {
            report(path.as_deref().unwrap_or(Path::new("<defaults>")), &err);
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

async fn run(config: Config, env: &dyn EnvSource) -> Result<(), StartupError> {
    let addr = config.server.listen;
    let state = AppState::new(config, env).await?;
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| StartupError::Bind { addr, source })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(listen = %local, upstreams = state.config.upstreams.len(), "ctxgate listening");
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
