//! Finding every network namespace on the host and entering one.
//!
//! Sources (docs/kernel.md, "Network namespaces"): `/proc/*/ns/net` links, `/run/netns/*`
//! files and `nsfs` mounts in `/proc/self/mountinfo` (docker keeps some alive with no
//! process). All refer to nsfs inodes; namespaces are deduplicated by inode (every net
//! namespace lives on the one nsfs superblock, checked by device for files and mounts).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::model::NetnsId;

/// Inode of `init_net` on kernels that give it a fixed one (`PROC_NET_INIT_INO`, Linux 6.x);
/// used only when `/proc/1/ns/net` cannot be read.
const PROC_NET_INIT_INO: u64 = 0xEFFF_FFF9;
/// How many pids to remember per namespace (to enter it, or read its /proc/PID/net).
const PIDS_PER_NS: usize = 4;

/// One discovered namespace and the ways to reach it.
#[derive(Debug, Clone)]
pub struct NetnsEntry {
    pub id: NetnsId,
    /// The namespace this agent runs in (entered without setns).
    pub current: bool,
    /// nsfs files that can be opened for `setns`: `/run/netns/*`, nsfs mount points,
    /// then `/proc/PID/ns/net` of a few member processes.
    pub handles: Vec<PathBuf>,
    /// A few member processes (for the `/proc/PID/net` fallback).
    pub pids: Vec<u32>,
}

/// Result of discovery: the namespaces, and what could not be looked at.
#[derive(Debug, Default)]
pub struct Discovery {
    pub namespaces: Vec<NetnsEntry>,
    /// Processes whose `ns/net` link could not be read (permission).
    pub unreadable_pids: usize,
    /// `host` could not be identified (no access to `/proc/1/ns/net`, no fixed init inode).
    pub host_unknown: bool,
}

/// `net:[4026531833]` → 4026531833.
pub fn parse_ns_link(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

fn ns_link_inode(path: &Path) -> io::Result<u64> {
    let link = fs::read_link(path)?;
    parse_ns_link(&link.to_string_lossy())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a net namespace link"))
}

/// Unescapes the octal escapes mountinfo uses in paths (`\040` for space, …).
pub fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// nsfs mounts of network namespaces in a mountinfo text: (inode, mount point).
pub fn nsfs_net_mounts(mountinfo: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("nsfs") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        if fields.len() < 5 {
            continue;
        }
        if let Some(ino) = parse_ns_link(fields[3]) {
            out.push((ino, unescape_mount_path(fields[4])));
        }
    }
    out
}

fn entry(found: &mut BTreeMap<u64, NetnsEntry>, ino: u64, current: Option<u64>) -> &mut NetnsEntry {
    found.entry(ino).or_insert_with(|| NetnsEntry {
        id: NetnsId {
            inode: ino,
            name: String::new(),
        },
        current: Some(ino) == current,
        handles: Vec::new(),
        pids: Vec::new(),
    })
}

/// Walks /proc, /run/netns and mountinfo.
pub fn discover() -> Discovery {
    let mut found: BTreeMap<u64, NetnsEntry> = BTreeMap::new();
    let mut d = Discovery::default();
    let nsfs_dev = fs::metadata("/proc/self/ns/net").map(|m| m.dev()).ok();
    let current = ns_link_inode(Path::new("/proc/thread-self/ns/net"))
        .or_else(|_| ns_link_inode(Path::new("/proc/self/ns/net")))
        .ok();
    let host = ns_link_inode(Path::new("/proc/1/ns/net")).ok();

    // Named namespaces first, so their handles come first.
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let path = e.path();
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if nsfs_dev.is_some_and(|dev| dev != meta.dev()) {
                continue; // a leftover file, not a mounted namespace
            }
            let ns = entry(&mut found, meta.ino(), current);
            if ns.id.name.is_empty() {
                ns.id.name = e.file_name().to_string_lossy().into_owned();
            }
            ns.handles.push(path);
        }
    }
    if let Ok(text) = fs::read_to_string("/proc/self/mountinfo") {
        for (ino, mount_point) in nsfs_net_mounts(&text) {
            let path = PathBuf::from(&mount_point);
            let ns = entry(&mut found, ino, current);
            if ns.handles.contains(&path) {
                continue;
            }
            if ns.id.name.is_empty() {
                ns.id.name = mount_point;
            }
            ns.handles.push(path);
        }
    }
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let link = PathBuf::from(format!("/proc/{pid}/ns/net"));
            match ns_link_inode(&link) {
                Ok(ino) => {
                    let ns = entry(&mut found, ino, current);
                    if ns.pids.len() < PIDS_PER_NS {
                        ns.pids.push(pid);
                        ns.handles.push(link);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    tracing::debug!(pid, "Network namespace link unreadable.");
                    d.unreadable_pids += 1;
                }
                Err(_) => {} // exited, or a kernel thread: skipped
            }
        }
    }
    if let Some(cur) = current {
        entry(&mut found, cur, current);
    }
    let host = host.or_else(|| {
        found
            .contains_key(&PROC_NET_INIT_INO)
            .then_some(PROC_NET_INIT_INO)
    });
    d.host_unknown = host.is_none();
    let mut taken = std::collections::HashSet::new();
    for (ino, mut ns) in found {
        if Some(ino) == host {
            ns.id.name = "host".to_string();
        } else if ns.id.name.is_empty() {
            ns.id.name = format!("net:[{ino}]");
        } else {
            // Names become keys in the fleet store: printable, and never "host" twice.
            ns.id.name = ns.id.name.replace(char::is_control, "?");
        }
        let reserved = Some(ino) != host && ns.id.name == "host";
        if reserved || !taken.insert(ns.id.name.clone()) {
            ns.id.name = format!("{} (net:[{ino}])", ns.id.name);
        }
        d.namespaces.push(ns);
    }
    d
}

/// Moves the calling thread into the namespace behind one of `handles` (first that opens).
/// Only the calling thread changes: call it on a thread dedicated to that namespace.
pub fn enter(handles: &[PathBuf], expect_inode: u64) -> io::Result<()> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no handle to enter the namespace");
    for path in handles {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                last = e;
                continue;
            }
        };
        // A /proc/PID/ns/net handle may now belong to a recycled pid in another namespace.
        if file.metadata().map(|m| m.ino()).ok() != Some(expect_inode) {
            continue;
        }
        // SAFETY: `file` owns an open nsfs fd for the whole call, and CLONE_NEWNET makes the
        // kernel refuse any other kind of namespace. setns touches no memory of ours; it
        // moves only the calling thread, which `enter`'s contract reserves for this one
        // namespace (no other work runs on it afterwards).
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc == 0 {
            return Ok(());
        }
        last = io::Error::last_os_error();
        if last.kind() == io::ErrorKind::PermissionDenied {
            return Err(last);
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_links() {
        assert_eq!(parse_ns_link("net:[4026531833]"), Some(4026531833));
        assert_eq!(parse_ns_link("mnt:[4026531833]"), None);
        assert_eq!(parse_ns_link("net:[x]"), None);
    }

    #[test]
    fn mountinfo_nsfs() {
        let text = "\
22 1 0:21 / / rw - ext4 /dev/vda rw
610 29 0:4 net:[4026532440] /run/netns/blue rw,nosuid shared:5 - nsfs nsfs rw
611 29 0:4 net:[4026532512] /run/docker/netns/ab\\040cd rw - nsfs nsfs rw
612 29 0:4 mnt:[4026532513] /run/x rw - nsfs nsfs rw
";
        assert_eq!(
            nsfs_net_mounts(text),
            vec![
                (4026532440, "/run/netns/blue".to_string()),
                (4026532512, "/run/docker/netns/ab cd".to_string())
            ]
        );
    }

    #[test]
    fn unescape() {
        assert_eq!(unescape_mount_path(r"a\040b\134c"), r"a b\c");
        assert_eq!(unescape_mount_path(r"trailing\04"), r"trailing\04");
    }
}
