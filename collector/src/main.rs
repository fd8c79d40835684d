//! `listenscope-collector`: parse the command line, start logging, run, map the result to
//! an exit code. Everything else lives in the library.

use std::io::Write;

use clap::Parser;
use listenscope_collector::cli::{self, Cli};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    listenscope_core::pem::install_crypto_provider();
    // The server logs its life at info; one-shot commands only speak up when it matters.
    let default = match cli.command {
        cli::Command::Serve(_) | cli::Command::Ui(_) => "info",
        _ => "warn",
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
