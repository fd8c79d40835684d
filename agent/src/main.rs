//! `listenscope-agent`: parse the command line, start logging, run, map the result to an
//! exit code. Everything else lives in the library.

use std::io::Write;

use clap::Parser;
use listenscope_agent::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    listenscope_core::pem::install_crypto_provider();
    let default = match cli.command {
        cli::Command::Run(_) => "info",
        cli::Command::Scan(_) => "warn",
    };
    listenscope_core::logging::init(cli.log_format, default);
    match cli::run(cli) {
        Ok(exit) => std::process::ExitCode::from(exit.code()),
        Err(e) => {
            // A closed stderr must not turn an error into a panic.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            std::process::ExitCode::from(listenscope_core::exit::ERROR)
        }
    }
}
