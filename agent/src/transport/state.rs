//! The agent's state directory (`state_dir`, systemd's `StateDirectory=`): the outbox
//! journal (`journal.rs`) and this installation's instance id, owned by one agent process
//! at a time.
//!
//! - `lock`: held with `flock` while the agent runs. A second agent on the same directory
//!   is refused at start-up: two writers would interleave one journal, and two hosts
//!   would share one instance id.
//! - `instance-id`: 16 random bytes as 32 hex digits, created once (temp file, fsync,
//!   rename) and sent in every Hello. The collector tells two machines sharing one
//!   certificate apart by it (docs/protocol.md); a restarted agent keeps it. Its second
//!   line names the machine it was made on (`/etc/machine-id` and the host name): a
//!   state directory copied to another machine (a VM cloned after the agent ran, a
//!   restored backup) gets a new id there, and the journal it brought (the other
//!   machine's session) is moved aside, so two clones are two instances, not one.
//! - `outbox.journal` (and `outbox.journal.unreadable`, a journal that could not be read).
//!
//! The directory is created (0700) if only its last component is missing; one that other
//! users may write is refused, since whoever writes the journal chooses what this host
//! reports. Files are 0600.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The instance id's file name.
pub const INSTANCE_ID: &str = "instance-id";
const LOCK: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state directory {}: {source}; create it (mode 0700, owned by the agent's user), or \
         point state_dir (--state-dir, LISTENSCOPE_STATE_DIR) at a writable directory; the \
         systemd unit's StateDirectory= and the DaemonSet's hostPath volume provide one",
        path.display()
    )]
    Unusable { path: PathBuf, source: io::Error },
    #[error(
        "state directory {} is writable by other users (mode {mode:o}): they could rewrite \
         what this host reports; run `chmod 700 {}`",
        path.display(),
        path.display()
    )]
    OpenToOthers { path: PathBuf, mode: u32 },
    #[error(
        "state directory {} is in use by another listenscope-agent: give each agent its own \
         state_dir (--state-dir)",
        path.display()
    )]
    Locked { path: PathBuf },
}

/// An open state directory, locked for this process until dropped.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    /// Holds the flock.
    _lock: File,
}

impl StateDir {
    /// Opens (creating the last component if missing) and locks `path`.
    pub fn open(path: &Path) -> Result<StateDir, StateError> {
        let unusable = |source| StateError::Unusable {
            path: path.to_path_buf(),
            source,
        };
        match fs::DirBuilder::new().mode(0o700).create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(unusable(e)),
        }
        let meta = fs::metadata(path).map_err(unusable)?;
        if !meta.is_dir() {
            return Err(unusable(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(StateError::OpenToOthers {
                path: path.to_path_buf(),
                mode,
            });
        }
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path.join(LOCK))
            .map_err(unusable)?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StateError::Locked {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(unusable(e.into())),
        }
        Ok(StateDir {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This installation's instance id: read from `instance-id`, or created there once.
    /// A file that does not hold one is replaced (with a warning); so is one made on
    /// another machine, whose journal is then moved aside.
    pub fn instance_id(&self) -> Result<[u8; 16], StateError> {
        self.instance_id_on(&machine())
    }

    fn instance_id_on(&self, machine: &str) -> Result<[u8; 16], StateError> {
        let file = self.path.join(INSTANCE_ID);
        let unusable = |source| StateError::Unusable {
            path: self.path.clone(),
            source,
        };
        match fs::read_to_string(&file) {
            Ok(text) => {
                let mut lines = text.lines();
                let id = lines.next().and_then(|l| parse_hex(l.trim()));
                let made_on = lines.next().and_then(|l| l.strip_prefix("machine "));
                match (id, made_on) {
                    (Some(id), Some(m)) if m == machine => return Ok(id),
                    (Some(id), None) => {
                        // From an agent before the machine line: this machine's.
                        self.write_instance_id(&id, machine).map_err(unusable)?;
                        return Ok(id);
                    }
                    (Some(_), Some(m)) => {
                        let journal = self.path.join(super::journal::FILE);
                        let aside = self.path.join(OTHER_MACHINE_JOURNAL);
                        let moved = fs::rename(&journal, &aside).is_ok();
                        tracing::warn!(
                            state_dir = %self.path.display(),
                            made_on = m,
                            this_machine = machine,
                            journal_moved_to = moved.then(|| aside.display().to_string()),
                            "The state directory was made on another machine (copied or \
                             cloned): this machine gets its own instance id and starts a new \
                             session."
                        );
                    }
                    (None, _) => tracing::warn!(
                        file = %file.display(),
                        "The instance id file does not hold 32 hex digits; writing a new one."
                    ),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(unusable(e)),
        }
        let id = random_id().map_err(unusable)?;
        self.write_instance_id(&id, machine).map_err(unusable)?;
        Ok(id)
    }

    fn write_instance_id(&self, id: &[u8; 16], machine: &str) -> io::Result<()> {
        let tmp = self.path.join("instance-id.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        writeln!(f, "{}\nmachine {machine}", hex(id))?;
        f.sync_all()?;
        fs::rename(&tmp, self.path.join(INSTANCE_ID))?;
        File::open(&self.path).and_then(|d| d.sync_all())
    }
}

/// Where a journal brought by a state directory copied from another machine goes.
pub const OTHER_MACHINE_JOURNAL: &str = "outbox.journal.other-machine";

/// This machine, as the instance id file names it: `/etc/machine-id` (`-` when absent)
/// and the host name, printable and without spaces.
fn machine() -> String {
    let id = fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into());
    let tag = format!("{id} {}", crate::os::procfs::hostname());
    tag.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// 16 random bytes from the OS.
pub fn random_id() -> io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(id)
}

pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn instance_id_is_created_once_and_kept() {
        let dir = listenscope_testkit::TempDir::new("state-id");
        let path = dir.join("state");
        let s = StateDir::open(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let id = s.instance_id().unwrap();
        assert_eq!(s.instance_id().unwrap(), id);
        let text = fs::read_to_string(path.join(INSTANCE_ID)).unwrap();
        assert_eq!(text, format!("{}\nmachine {}\n", hex(&id), machine()));
        assert_eq!(
            fs::metadata(path.join(INSTANCE_ID))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // A second agent on the same directory is refused while the first holds it.
        let err = StateDir::open(&path).unwrap_err();
        assert!(err.to_string().contains("in use by another"), "{err}");
        drop(s);
        let s = StateDir::open(&path).unwrap();
        assert_eq!(s.instance_id().unwrap(), id, "kept across restarts");
        // A damaged file is replaced.
        fs::write(path.join(INSTANCE_ID), "zz\n").unwrap();
        let new = s.instance_id().unwrap();
        assert_ne!(new, id);
        assert_eq!(s.instance_id().unwrap(), new);
    }

    /// A state directory copied to another machine: a new instance id there, and the
    /// journal it brought moved aside; back on its own machine the id is kept. A file from
    /// before the machine line is adopted.
    #[test]
    fn a_copied_state_directory_gets_its_own_instance_id() {
        let dir = listenscope_testkit::TempDir::new("state-clone");
        let path = dir.join("state");
        let s = StateDir::open(&path).unwrap();
        let original = s.instance_id_on("m1 web-01").unwrap();
        assert_eq!(s.instance_id_on("m1 web-01").unwrap(), original);
        fs::write(
            path.join(super::super::journal::FILE),
            b"the other machine's",
        )
        .unwrap();
        let clone = s.instance_id_on("m2 web-02").unwrap();
        assert_ne!(clone, original);
        assert!(!path.join(super::super::journal::FILE).exists());
        assert_eq!(
            fs::read(path.join(OTHER_MACHINE_JOURNAL)).unwrap(),
            b"the other machine's"
        );
        assert_eq!(s.instance_id_on("m2 web-02").unwrap(), clone);
        fs::write(path.join(INSTANCE_ID), format!("{}\n", hex(&original))).unwrap();
        assert_eq!(s.instance_id_on("m3 web-03").unwrap(), original);
        assert_eq!(s.instance_id_on("m3 web-03").unwrap(), original);
    }

    #[test]
    fn unusable_directories_are_named_with_the_fix() {
        let dir = listenscope_testkit::TempDir::new("state-bad");
        let err = StateDir::open(&dir.join("no/such/parent")).unwrap_err();
        assert!(
            err.to_string().contains("point state_dir (--state-dir"),
            "{err}"
        );
        let open = dir.join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let err = StateDir::open(&open).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
        let file = dir.join("file");
        fs::write(&file, "").unwrap();
        assert!(StateDir::open(&file).is_err());
    }

    #[test]
    fn hex_round_trips() {
        let id = random_id().unwrap();
        assert_eq!(parse_hex(&hex(&id)), Some(id));
        assert_eq!(parse_hex("00"), None);
    }
}
