//! The `mock-upstream` binary: the k6 load-test target. Parses its few flags by hand, serves
//! default-mode traffic with recording off, and exits on SIGINT/SIGTERM.

use std::fmt::Display;
use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use mock_upstream::Server;

const USAGE: &str = "usage: mock-upstream [--listen ADDR] [--latency MS] [--chunks N] [--chunk-delay MS]
                     [--tool-calls N] [--tool-name NAME]
  --listen ADDR      address to bind (default 127.0.0.1:9000); repeat it to serve the same
                     replies on several addresses from one process
  --latency MS       delay before response headers (default 0)
  --chunks N         content chunks per streamed completion (default 8)
  --chunk-delay MS   delay between streamed content chunks (default 0)
  --tool-calls N     answer a chat request whose last message is not a tool result with N
                     parallel calls of --tool-name, arguments {\"q\":\"item-I\"} (default 0: off)
  --tool-name NAME   the tool those calls name (default lookup)
POST /tools/... answers {\"ok\":true,...}: a stand-in HTTP tool.";

#[derive(Debug, PartialEq)]
struct Options {
    listen: Vec<SocketAddr>,
    latency: Duration,
    chunks: usize,
    chunk_delay: Duration,
    tool_calls: usize,
    tool_name: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 9000))],
            latency: Duration::ZERO,
            chunks: 8,
            chunk_delay: Duration::ZERO,
            tool_calls: 0,
            tool_name: "lookup".to_owned(),
        }
    }
}

/// `Ok(None)` means `--help` was asked for.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut opts = Options::default();
    let mut listen = Vec::new();
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--listen" => listen.push(value(&flag, args.next())?),
            "--latency" => opts.latency = Duration::from_millis(value(&flag, args.next())?),
            "--chunks" => opts.chunks = value(&flag, args.next())?,
            "--chunk-delay" => opts.chunk_delay = Duration::from_millis(value(&flag, args.next())?),
            "--tool-calls" => opts.tool_calls = value(&flag, args.next())?,
            "--tool-name" => opts.tool_name = value(&flag, args.next())?,
            _ => return Err(format!("unknown argument: {flag}")),
        }
    }
    if !listen.is_empty() {
        opts.listen = listen;
    }
    Ok(Some(opts))
}

fn value<T: FromStr>(flag: &str, value: Option<String>) -> Result<T, String>
where
    T::Err: Display,
{
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    value.parse().map_err(|e| format!("{flag} {value}: {e}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            let _ = writeln!(std::io::stdout(), "{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("mock-upstream: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut servers = Vec::new();
    for addr in &opts.listen {
        let server = Server::builder()
            .record(false)
            .latency(opts.latency)
            .stream_chunks(opts.chunks)
            .chunk_delay(opts.chunk_delay)
            .tool_calls(&opts.tool_name, opts.tool_calls)
            .start_on(*addr)
            .await;
        match server {
            Ok(server) => servers.push(server),
            Err(e) => {
                eprintln!("mock-upstream: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // Scripts wait for this line before starting load, so flush it past any pipe buffering.
    // A closed stdout is no reason to stop serving, hence the ignored results.
    let mut out = std::io::stdout();
    let urls: Vec<String> = servers.iter().map(Server::base_url).collect();
    let _ = writeln!(out, "mock-upstream listening on {}", urls.join(" "));
    let _ = out.flush();

    if let Err(e) = shutdown_signal().await {
        eprintln!("mock-upstream: cannot listen for signals: {e}");
        return ExitCode::FAILURE;
    }
    drop(servers);
    ExitCode::SUCCESS
}

async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Options>, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_flags_and_defaults() {
        assert_eq!(parse(&[]), Ok(Some(Options::default())));
        let expected = Options {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 8080))],
            latency: Duration::from_millis(5),
            chunks: 3,
            chunk_delay: Duration::from_millis(7),
            tool_calls: 4,
            tool_name: "search".to_owned(),
        };
        let args = [
            "--listen",
            "0.0.0.0:8080",
            "--latency",
            "5",
            "--chunks",
            "3",
            "--chunk-delay",
            "7",
            "--tool-calls",
            "4",
            "--tool-name",
            "search",
        ];
        assert_eq!(parse(&args), Ok(Some(expected)));
        assert_eq!(parse(&["--help"]), Ok(None));
    }

    #[test]
    fn listen_repeats_for_several_addresses() {
        let opts = parse(&["--listen", "127.0.0.1:9001", "--listen", "127.0.0.1:9002"]).unwrap().unwrap();
        assert_eq!(
            opts.listen,
            [SocketAddr::from(([127, 0, 0, 1], 9001)), SocketAddr::from(([127, 0, 0, 1], 9002))]
        );
    }

    #[test]
    fn rejects_unknown_missing_and_malformed() {
        assert_eq!(parse(&["--bogus"]), Err("unknown argument: --bogus".into()));
        assert!(parse(&["--chunks"]).is_err());
        assert!(parse(&["--latency", "soon"]).is_err());
        assert!(parse(&["--tool-calls", "-1"]).is_err());
    }
}
