//! `listenscope-agent`: parse the command line, start logging, run, map the result to an
//! exit code. Everything else lives in the library.

use clap::Parser;
use listenscope_agent::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    listenscope_core::pem::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LISTENSCOPE_LOG").unwrap_or_else(|_| {
                EnvFilter::new(match cli.command {
                    cli::Command::Run(_) => "info",
                    cli::Command::Scan(_) => "warn",
                })
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
