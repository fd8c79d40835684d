//! Man page generation, shared by the `xtask` binary and its test.

use std::path::Path;

use anyhow::Context;

/// Writes `NAME.1` for `cmd` and `NAME-SUB.1` for every subcommand, recursively (the
/// `git-commit(1)` convention; clap names built subcommands that way). Returns how many
/// pages were written.
pub fn write_man_pages(mut cmd: clap::Command, dir: &Path) -> anyhow::Result<usize> {
    cmd.build();
    let name = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let mut written = 0;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        written += write_man_pages(sub.clone(), dir)?;
    }
    let file = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .render(&mut buf)
        .with_context(|| format!("rendering {name}.1"))?;
    std::fs::write(&file, buf).with_context(|| format!("writing {}", file.display()))?;
    Ok(written + 1)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn one_man_page_per_command_and_subcommand() {
        let dir = listenscope_testkit::TempDir::new("man");
        let n =
            super::write_man_pages(listenscope_collector::cli::Cli::command(), dir.path()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(n, names.len());
        for page in [
            "listenscope-collector.1",
            "listenscope-collector-serve.1",
            "listenscope-collector-certs-issue.1",
            "listenscope-collector-exposure.1",
        ] {
            assert!(names.iter().any(|n| n == page), "{page} missing: {names:?}");
        }
        let serve =
            std::fs::read_to_string(dir.path().join("listenscope-collector-serve.1")).unwrap();
        assert!(serve.contains(r"\-\-max\-sessions"), "{serve}");
        assert!(!names.iter().any(|n| n.contains("help")), "{names:?}");
    }
}
