//! Command line of `listenscope-agent`: flags → options → one call into the library.

use std::io::{self, Write};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use std::path::PathBuf;

use listenscope_core::exit::Exit;
use listenscope_core::logging::LogFormat;

use crate::config::{ConfigErrors, RawConfig, RunConfig, StateConfig};
use crate::model::Protocol;
use crate::os::LinuxSystem;
use crate::output;
use crate::scan::{self, NetnsSelector, ScanOptions};

/// listenscope agent: which ports this host really exposes, over IPv4 and IPv6, in every
/// network namespace.
#[derive(Debug, Parser)]
#[command(name = "listenscope-agent", version, about, long_about = None)]
pub struct Cli {
    /// Log lines as `text` or `json` (one object per line, for log shippers).
    #[arg(
        long,
        global = true,
        env = "LISTENSCOPE_LOG_FORMAT",
        value_name = "text|json",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scan once and print every listening socket with what it really accepts.
    #[command(after_help = SCAN_EXIT_CODES)]
    Scan(ScanArgs),
    /// Scan every interval and stream the inventory to a collector over mutual TLS.
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (example: deploy/agent.toml); flags override its keys.
    #[arg(long, env = "LISTENSCOPE_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Collector URL. Give several collectors sharing one database by repeating the flag
    /// or separating URLs with commas: the agent keeps one session, starting with the first
    /// URL; when a connection fails or breaks it moves straight on to the next, and waits
    /// (backoff up to --reconnect-max) only after every URL has failed in a row.
    #[arg(
        long,
        env = "LISTENSCOPE_COLLECTOR",
        value_name = "https://HOST:PORT",
        value_delimiter = ','
    )]
    pub collector: Vec<String>,
    /// CA certificate (PEM) that signed the collector's certificate.
    #[arg(long, env = "LISTENSCOPE_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate (PEM); its DNS name is the identity the collector records.
    #[arg(long, env = "LISTENSCOPE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This host's private key (PEM).
    #[arg(long, env = "LISTENSCOPE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Time between whole scans (default 60s); changes arrive sooner with --watch.
    #[arg(long, value_name = "DURATION")]
    pub interval: Option<String>,
    /// How changes are noticed between whole scans (default auto: the doorbell, i.e.
    /// kernel tracepoints, when allowed, else adaptive polling).
    #[arg(long, value_name = "auto|doorbell|polling|interval")]
    pub watch: Option<String>,
    /// Do not watch bind() calls: spares every process on the host the kernel's syscall
    /// tracing path (~27 ns per syscall); new UDP sockets then wait for the next whole scan.
    #[arg(long)]
    pub no_bind_events: bool,
    /// Namespaces to scan (default all): all, current, a name (host, a /run/netns name), a
    /// path (/run/netns/NAME, an nsfs mount, /proc/PID/ns/net), INODE or net:[INODE].
    #[arg(long, value_name = "all|current|NAME|PATH|INODE")]
    pub netns: Option<String>,
    /// Name expected in every collector's certificate (default: each URL's host).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Longest wait between rounds of reconnect attempts, once every collector has failed
    /// in a row (default 30s).
    #[arg(long, value_name = "DURATION")]
    pub reconnect_max: Option<String>,
    /// Most listener changes held while the collector is unreachable (default 100000).
    #[arg(long, value_name = "N")]
    pub max_pending_changes: Option<usize>,
    /// Directory for the outbox journal (unacknowledged changes survive a restart) and the
    /// instance id. Default: systemd's $STATE_DIRECTORY (StateDirectory= in the unit),
    /// else none, and a restart loses unacknowledged changes.
    #[arg(long, env = "LISTENSCOPE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Most bytes the outbox journal may take (default 33554432, 32 MiB).
    #[arg(long, value_name = "BYTES")]
    pub journal_max_bytes: Option<u64>,
}

impl RunArgs {
    /// The file (if any) overridden by the flags, validated; the state directory falls
    /// back to systemd's `$STATE_DIRECTORY` (its first entry).
    pub fn config(&self) -> Result<(RunConfig, StateConfig), ConfigErrors> {
        let systemd = std::env::var_os("STATE_DIRECTORY")
            .and_then(|v| std::env::split_paths(&v).next())
            .filter(|p| !p.as_os_str().is_empty());
        self.config_with(systemd)
    }

    fn config_with(
        &self,
        systemd_state_dir: Option<PathBuf>,
    ) -> Result<(RunConfig, StateConfig), ConfigErrors> {
        let file = match &self.config {
            Some(path) => RawConfig::load(path)?,
            None => RawConfig::default(),
        };
        let flags = RawConfig {
            // Any --collector replaces the file's whole list.
            collector: (!self.collector.is_empty()).then(|| self.collector.clone()),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            interval: self.interval.clone(),
            watch: self.watch.clone(),
            bind_events: self.no_bind_events.then_some(false),
            netns: self.netns.clone(),
            server_name: self.server_name.clone(),
            reconnect_max: self.reconnect_max.clone(),
            max_pending_changes: self.max_pending_changes,
            state_dir: self.state_dir.clone(),
            journal_max_bytes: self.journal_max_bytes,
        };
        let mut raw = file.overridden_by(flags);
        if raw.state_dir.is_none() {
            raw.state_dir = systemd_state_dir;
        }
        raw.validate_all()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

/// `scan --help`: the exit codes (core::exit), as scripts need them.
const SCAN_EXIT_CODES: &str = "Exit status:
  0  the scan is complete; with --trap-only: a trap was found (even in a partial scan)
  1  --trap-only: no trap found, and the scan is complete
  2  error (bad flags, no such namespace, output failed)
  3  the scan is partial: some namespace could not be read, or only without the kernel's
     v6only answer (e.g. without root; the warnings say which, and JSON has \"partial\":
     true); with --trap-only: no trap found in what could be read. Warnings about owners
     or firewall verdicts alone do not make a scan partial";

#[derive(Debug, Args)]
pub struct ScanArgs {
    /// Print one JSON document instead of a table (schema: docs/scan-json.md).
    #[arg(long, conflicts_with_all = ["csv", "no_header"])]
    pub json: bool,
    /// Print CSV (a header line, then one line per listener, LF line ends; columns in
    /// docs/scan-json.md).
    #[arg(long)]
    pub csv: bool,
    /// Rows only: no header line (and, for the table, no summary below it).
    #[arg(long)]
    pub no_header: bool,
    /// Only listeners on this port.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only this protocol.
    #[arg(long, value_enum, value_name = "tcp|udp")]
    pub proto: Option<ProtoArg>,
    /// Only IPv6 sockets that also accept IPv4 (the ones netstat shows as IPv6 only).
    #[arg(long)]
    pub trap_only: bool,
    /// Which network namespaces: all, current, a name (host, a /run/netns name), a path
    /// (/run/netns/NAME, an nsfs mount, /proc/PID/ns/net), INODE or net:[INODE].
    #[arg(
        long,
        value_name = "all|current|NAME|PATH|INODE",
        default_value = "all"
    )]
    pub netns: NetnsSelector,
}

impl ScanArgs {
    pub fn options(&self) -> ScanOptions {
        ScanOptions {
            netns: self.netns.clone(),
            protocols: match self.proto {
                Some(ProtoArg::Tcp) => vec![Protocol::Tcp],
                Some(ProtoArg::Udp) => vec![Protocol::Udp],
                None => vec![Protocol::Tcp, Protocol::Udp],
            },
            port: self.port,
            trap_only: self.trap_only,
        }
    }
}

/// Runs one command; the binary turns the result into an exit code (an error is 2).
pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Command::Scan(args) => run_scan(&args),
        Command::Run(args) => run_agent(&args),
    }
}

fn run_agent(args: &RunArgs) -> anyhow::Result<Exit> {
    let (cfg, state) = args.config()?;
    // Before any thread starts: one malloc arena, reused by every scan (`os::heap`).
    crate::os::heap::limit_arenas();
    // One scan thread plus a small async side: a current-thread runtime is plenty.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        crate::transport::run_with_state(
            cfg,
            state,
            std::sync::Arc::new(LinuxSystem::keeping_sockets()),
            listenscope_core::signal::shutdown_signal(),
        )
        .await
    })?;
    Ok(Exit::Success)
}

fn run_scan(args: &ScanArgs) -> anyhow::Result<Exit> {
    let sys = LinuxSystem::new();
    let inv = scan::scan(&sys, &args.options())?;
    let exit = scan_exit(&inv, args.trap_only);
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    let t = std::time::Instant::now();
    let header = !args.no_header;
    let written = if args.json {
        output::write_json(&inv, &mut out)
    } else if args.csv {
        output::write_csv(&inv, header, &mut out)
    } else {
        output::write_table(&inv, header, &mut out)
    };
    tracing::debug!(us = t.elapsed().as_micros() as u64, "Output written.");
    match written.and_then(|()| out.flush()) {
        // `scan | head` closes the pipe early: the reader has what it wanted (dropping the
        // BufWriter tries its last bytes once more and ignores the error).
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(exit),
        other => other.context("writing the scan to stdout")?,
    }
    if !args.json {
        let mut err = io::stderr().lock();
        for w in &inv.warnings {
            let _ = writeln!(err, "warning: {w}");
        }
    }
    Ok(exit)
}

/// The exit status of a scan (see [`SCAN_EXIT_CODES`]): partial when the socket truth is
/// incomplete ([`scan::Inventory::partial`]); with `--trap-only`, a search.
fn scan_exit(inv: &scan::Inventory, trap_only: bool) -> Exit {
    match (trap_only, inv.listeners.is_empty(), inv.partial) {
        (true, false, _) => Exit::Success,
        (true, true, false) => Exit::NothingFound,
        (_, _, true) => Exit::Partial,
        (false, _, false) => Exit::Success,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `listenscope-agent run ARGS…` with the required certificate flags: the validated
    /// collectors, or the errors.
    fn collectors(args: &[&str]) -> Result<Vec<String>, String> {
        let cli = Cli::try_parse_from(
            [
                "listenscope-agent",
                "run",
                "--tls-ca",
                "a",
                "--tls-cert",
                "b",
                "--tls-key",
                "c",
            ]
            .iter()
            .chain(args),
        )
        .map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else {
            panic!("not run: {cli:?}");
        };
        run.config()
            .map(|(c, _)| c.collectors)
            .map_err(|e| e.to_string())
    }

    /// The state directory: the flag, else the file, else systemd's, else none.
    #[test]
    fn state_dir_from_flag_file_or_systemd() {
        let state = |args: &[&str], file: Option<&str>, systemd: Option<&str>| {
            let dir = listenscope_testkit::TempDir::new("cli-state");
            let mut argv = vec![
                "listenscope-agent",
                "run",
                "--collector",
                "https://a:1",
                "--tls-ca",
                "a",
                "--tls-cert",
                "b",
                "--tls-key",
                "c",
            ];
            let path = dir.join("agent.toml");
            let path = path.to_str().unwrap();
            if let Some(toml) = file {
                std::fs::write(path, toml).unwrap();
                argv.extend(["--config", path]);
            }
            argv.extend(args);
            let Command::Run(run) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not run");
            };
            run.config_with(systemd.map(PathBuf::from))
                .map(|(_, s)| s)
                .map_err(|e| e.to_string())
        };
        let dir = |d: &str, max: u64| {
            Ok(StateConfig {
                state_dir: Some(PathBuf::from(d)),
                journal_max_bytes: max,
            })
        };
        const MAX: u64 = 32 * 1024 * 1024;
        assert_eq!(state(&[], None, None), Ok(StateConfig::default()));
        assert_eq!(state(&[], None, Some("/var/lib/s")), dir("/var/lib/s", MAX));
        assert_eq!(
            state(&[], Some("state_dir = \"/f\"\n"), Some("/var/lib/s")),
            dir("/f", MAX)
        );
        assert_eq!(
            state(
                &["--state-dir", "/x", "--journal-max-bytes", "1000000"],
                Some("state_dir = \"/f\"\n"),
                Some("/s")
            ),
            dir("/x", 1_000_000)
        );
        let err = state(&["--journal-max-bytes", "1"], None, None).unwrap_err();
        assert!(err.contains("journal_max_bytes 1 is below"), "{err}");
    }

    #[test]
    fn collector_flags_repeat_and_split_at_commas() {
        let urls = |v: &[&str]| Ok(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            collectors(&["--collector", "https://a:1"]),
            urls(&["https://a:1"])
        );
        assert_eq!(
            collectors(&[
                "--collector",
                "https://a:1,https://b:2",
                "--collector",
                "https://c:3"
            ]),
            urls(&["https://a:1", "https://b:2", "https://c:3"])
        );
        assert_eq!(
            collectors(&["--collector=https://a:1, https://b:2"]),
            urls(&["https://a:1", "https://b:2"])
        );
        let err = collectors(&["--collector", "https://a:1,https://a:1"]).unwrap_err();
        assert!(
            err.contains("\"https://a:1\" is listed more than once"),
            "{err}"
        );
        let err = collectors(&["--collector", "https://a:1,http://b:2"]).unwrap_err();
        assert!(
            err.contains("\"http://b:2\" must be an https:// URL"),
            "{err}"
        );
    }

    #[test]
    fn collector_flags_replace_the_file_list() {
        let dir = std::env::temp_dir().join(format!("listenscope-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("agent.toml");
        std::fs::write(&file, "collector = [\"https://a:1\", \"https://b:2\"]\n").unwrap();
        let file = file.to_str().unwrap();
        let from_file = collectors(&["--config", file]);
        let from_flag = collectors(&["--config", file, "--collector", "https://c:3"]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            from_file,
            Ok(vec!["https://a:1".to_string(), "https://b:2".to_string()])
        );
        assert_eq!(from_flag, Ok(vec!["https://c:3".to_string()]));
    }
}
