//! `cargo run -p xtask -- man DIR` / `completions DIR`: the man pages (one per command and
//! subcommand, section 1) and the bash, zsh and fish completions of both programs,
//! generated from their clap definitions so they can never drift from `--help`.
//! `scripts/package` runs both and ships the result in the Debian packages.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(what), Some(dir), None) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: xtask man|completions DIR");
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let written = match what.to_str() {
        Some("man") => programs().iter().try_fold(0, |n, cmd| {
            Ok::<_, anyhow::Error>(n + xtask::write_man_pages(cmd.clone(), &dir)?)
        })?,
        Some("completions") => programs().iter().try_fold(0, |n, cmd| {
            Ok::<_, anyhow::Error>(n + write_completions(cmd.clone(), &dir)?)
        })?,
        _ => anyhow::bail!("usage: xtask man|completions DIR (not {what:?})"),
    };
    eprintln!("xtask: wrote {written} files to {}", dir.display());
    Ok(())
}

/// Both programs' clap commands.
fn programs() -> [clap::Command; 2] {
    [
        listenscope_agent::cli::Cli::command(),
        listenscope_collector::cli::Cli::command(),
    ]
}

/// `DIR/bash/NAME`, `DIR/zsh/_NAME`, `DIR/fish/NAME.fish` (the file names the Debian
/// packages install under bash-completion, vendor-completions and vendor_completions.d).
fn write_completions(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<usize> {
    let name = cmd.get_name().to_string();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let sub = dir.join(shell.to_string());
        std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        let file = match shell {
            Shell::Bash => sub.join(&name),
            Shell::Zsh => sub.join(format!("_{name}")),
            _ => sub.join(format!("{name}.fish")),
        };
        let mut out =
            std::fs::File::create(&file).with_context(|| format!("creating {}", file.display()))?;
        clap_complete::generate(shell, &mut cmd, &name, &mut out);
    }
    Ok(3)
}
