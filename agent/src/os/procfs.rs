//! Everything read from `/proc`, `/sys/fs/cgroup` and `/etc/passwd`.
//!
//! The socket → process walk is the hot path of a scan (docs/kernel.md: ≈ 4.6 µs per fd).
//! It opens each `/proc/PID/fd` once and `readlinkat`s every entry relative to that
//! directory fd, keeps only `socket:[INODE]` targets the caller asked for, and splits the
//! pids over a few threads. The `procfs` crate was measured slower here (a `PathBuf` per
//! fd and a full `stat`), so the walk stays hand-written, on `rustix`'s allocation-free
//! calls (`openat`, `RawDir` over `getdents64`, `readlinkat_raw`) and without `unsafe`.
//! Processes that exit mid-walk are skipped, never errors.

use std::collections::HashMap;

use crate::fasthash::{FastMap, FastSet};
use std::ffi::CStr;
use std::fs;
use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::{self as rfs, Mode, OFlags, RawDir};
use rustix::io::Errno;

use crate::model::{Family, ProcessInfo, Protocol, RawSocket};

/// Longest cmdline kept per process (bytes); longer ones end in `…`.
pub const CMDLINE_MAX: usize = 4096;
/// Most cgroup directories visited when mapping cgroup ids to paths.
const CGROUP_DIRS_MAX: usize = 200_000;

/// Linux capability numbers used in operator hints.
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;

/// Effective capabilities of this process (`CapEff` in /proc/self/status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps(pub u64);

impl Caps {
    pub fn has(self, cap: u32) -> bool {
        self.0 & (1u64 << cap) != 0
    }

    pub fn current() -> Caps {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        Caps(parse_cap_eff(&status).unwrap_or(0))
    }
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// Result of the socket → owner walk.
#[derive(Debug, Default)]
pub struct OwnerWalk {
    /// socket inode → pids holding it (one entry per process, unsorted).
    pub by_inode: FastMap<u64, Vec<u32>>,
    /// Every process named in `by_inode`, described while it was known to be alive.
    pub processes: FastMap<u32, ProcessInfo>,
    /// Processes whose fd table could not be read (permission).
    pub denied: usize,
}

/// All numeric entries of /proc.
pub fn pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// Most (inode, pid) pairs one walker thread holds before it knows which inodes are
/// wanted (~1 MiB); past it, the thread waits for the wanted set.
const PENDING_MAX: usize = 65_536;
/// Pids a walker thread takes at a time.
const WALK_BATCH: usize = 8;

/// Finds which of `pids` hold which wanted socket inodes, using `threads` threads, and
/// describes each owner. `wanted` may be published while the walk already runs: until then
/// each thread keeps every socket it sees (bounded by [`PENDING_MAX`]) and filters once
/// the set arrives, so the walk overlaps the netlink dumps. A process that exits before it
/// is described is dropped with its sockets: it is gone, which is not an error.
pub fn walk_socket_owners(
    pids: &[u32],
    wanted: &OnceLock<FastSet<u64>>,
    threads: usize,
    passwd: &Passwd,
) -> OwnerWalk {
    let threads = threads.clamp(1, 8).min(pids.len().max(1));
    let next = AtomicUsize::new(0);
    let mut parts: Vec<OwnerWalk> = std::thread::scope(|s| {
        let next = &next;
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let mut part = OwnerWalk::default();
                    let mut pending: Vec<(u64, u32)> = Vec::new();
                    let mut found = Vec::new();
                    // Small batches from a shared cursor: a thread that drew cheap processes
                    // takes more, so no core idles while another walks a big fd table.
                    let batches = std::iter::from_fn(|| {
                        let start = next.fetch_add(WALK_BATCH, Ordering::Relaxed);
                        pids.get(start..(start + WALK_BATCH).min(pids.len()))
                    });
                    for &pid in batches.flatten() {
                        let set = match wanted.get() {
                            None if pending.len() >= PENDING_MAX => Some(wanted.wait()),
                            other => other,
                        };
                        if set.is_some_and(|s| s.is_empty()) {
                            break; // nothing to look for
                        }
                        found.clear();
                        let keep = |inode: u64| set.is_none_or(|s| s.contains(&inode));
                        match walk_pid(pid, keep, &mut found) {
                            Ok(()) => {}
                            Err(e) if e.raw_os_error() == Some(libc::EACCES) => part.denied += 1,
                            // ENOENT/ESRCH: exited mid-walk. Any other error leaves the
                            // process out too, as if it had exited.
                            Err(_) => {}
                        }
                        if set.is_none() {
                            pending.extend_from_slice(&found);
                        } else {
                            record(&mut part, &found, passwd);
                        }
                    }
                    if !pending.is_empty() {
                        let set = wanted.wait();
                        pending.retain(|(inode, _)| set.contains(inode));
                        // Grouped by pid (the walk pushed them that way) for one describe each.
                        for chunk in pending.chunk_by(|a, b| a.1 == b.1) {
                            record(&mut part, chunk, passwd);
                        }
                    }
                    part
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    // Merge into the largest part; an inode is usually seen by one thread only.
    parts.sort_by_key(|p| std::cmp::Reverse(p.by_inode.len()));
    let mut out = parts.remove(0);
    for part in parts {
        out.denied += part.denied;
        out.processes.extend(part.processes);
        for (inode, pids) in part.by_inode {
            out.by_inode.entry(inode).or_default().extend(pids);
        }
    }
    out
}

/// Adds one process's wanted sockets to `part`, describing the process first; a process
/// that can no longer be described has exited and is skipped.
fn record(part: &mut OwnerWalk, found: &[(u64, u32)], passwd: &Passwd) {
    let Some(&(_, pid)) = found.first() else {
        return;
    };
    if let std::collections::hash_map::Entry::Vacant(slot) = part.processes.entry(pid) {
        let Some(info) = process_info(pid, passwd) else {
            return;
        };
        slot.insert(info);
    }
    for &(inode, pid) in found {
        let owners = part.by_inode.entry(inode).or_default();
        if !owners.contains(&pid) {
            owners.push(pid);
        }
    }
}

/// getdents64 buffer for one fd directory: the size glibc's `opendir` used before, so a
/// process with up to ≈ 1,000 fds is still listed in one call.
const DIRENT_BUF: usize = 32 * 1024;

/// Reads one process's fd table: `openat` of `/proc/PID/fd`, `getdents64` into a stack
/// buffer, one `readlinkat` per entry relative to the directory fd (no per-fd path, no
/// allocation), `close`. An error means the table could not be read: ENOENT or ESRCH
/// when the process exited, EACCES when it may not be inspected; callers skip the former
/// and count the latter.
pub fn walk_pid(
    pid: u32,
    keep: impl Fn(u64) -> bool,
    found: &mut Vec<(u64, u32)>,
) -> io::Result<()> {
    let mut path = [0u8; 32];
    let dir = rfs::openat(
        rfs::CWD,
        proc_fd_path(pid, &mut path),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut dents = [MaybeUninit::<u8>::uninit(); DIRENT_BUF];
    let mut entries = RawDir::new(&dir, &mut dents);
    let mut link = [0u8; 64];
    let mut denied = false;
    while let Some(entry) = entries.next() {
        // ENOENT/ESRCH here: the process exited between two getdents64 calls.
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes().first() == Some(&b'.') {
            continue;
        }
        match rfs::readlinkat_raw(&dir, name, &mut link) {
            Ok(n) => {
                if let Some(inode) = socket_inode(&link[..n])
                    && keep(inode)
                {
                    found.push((inode, pid));
                }
            }
            // Some processes (not dumpable, LSM) let the directory be listed but not its links.
            Err(Errno::ACCESS) => denied = true,
            Err(_) => {} // the fd was closed since it was listed, or the process exited
        }
    }
    if denied {
        return Err(io::Error::from_raw_os_error(libc::EACCES));
    }
    Ok(())
}

/// `/proc/PID/fd` as a C string in `buf`, without allocating.
fn proc_fd_path(pid: u32, buf: &mut [u8; 32]) -> &CStr {
    *buf = [0; 32];
    // At most 19 bytes: the write cannot fail, and the NUL after it is already there.
    let _ = write!(&mut buf[..31], "/proc/{pid}/fd");
    CStr::from_bytes_until_nul(buf).unwrap_or_default()
}

/// `socket:[12345]` → 12345.
pub fn socket_inode(target: &[u8]) -> Option<u64> {
    let digits = target.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        d.is_ascii_digit()
            .then(|| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .flatten()
    })
}

/// uid → user name from `/etc/passwd` (no NSS: an agent must not block on LDAP).
#[derive(Debug, Default)]
pub struct Passwd(HashMap<u32, String>);

impl Passwd {
    pub fn load() -> Passwd {
        Passwd::parse(&fs::read_to_string("/etc/passwd").unwrap_or_default())
    }

    pub fn parse(text: &str) -> Passwd {
        let mut map = HashMap::new();
        for line in text.lines() {
            let mut f = line.split(':');
            let (Some(name), _, Some(uid)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if let Ok(uid) = uid.parse::<u32>() {
                map.entry(uid).or_insert_with(|| name.to_string());
            }
        }
        Passwd(map)
    }

    pub fn name(&self, uid: u32) -> String {
        self.0.get(&uid).cloned().unwrap_or_else(|| uid.to_string())
    }
}

/// comm, cmdline and effective user of a process; `None` when it has exited.
///
/// The user comes from the owner of `/proc/PID` (the effective uid of a dumpable process)
/// rather than from parsing `status`, which costs ten times more to generate.
pub fn process_info(pid: u32, passwd: &Passwd) -> Option<ProcessInfo> {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let euid = fs::metadata(&base).ok()?.uid();
    let comm = fs::read_to_string(base.join("comm")).ok()?;
    let mut raw = Vec::with_capacity(256);
    fs::File::open(base.join("cmdline"))
        .and_then(|f| f.take(CMDLINE_MAX as u64 + 1).read_to_end(&mut raw))
        .ok()?;
    Some(ProcessInfo {
        pid,
        comm: comm.trim_end_matches('\n').to_string(),
        cmdline: format_cmdline(&raw),
        user: passwd.name(euid),
    })
}

/// NUL-separated argv → one line, bounded to [`CMDLINE_MAX`] bytes.
pub fn format_cmdline(raw: &[u8]) -> String {
    let truncated = raw.len() > CMDLINE_MAX;
    let raw = &raw[..raw.len().min(CMDLINE_MAX)];
    let trimmed = raw.strip_suffix(b"\0").unwrap_or(raw);
    let mut s: String = String::from_utf8_lossy(trimmed).replace('\0', " ");
    if truncated {
        s.push('…');
    }
    s
}

/// The cgroup v2 mount point, from a mountinfo text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next() != Some("cgroup2") {
            return None;
        }
        let point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(crate::os::netns::unescape_mount_path(point)))
    })
}

/// Maps cgroup ids (cgroup v2 directory inodes) to paths like `/system.slice/nginx.service`.
/// Ids it cannot find are absent from the answer.
pub fn cgroup_paths(wanted: &FastSet<u64>) -> HashMap<u64, String> {
    let mut out = HashMap::new();
    if wanted.is_empty() {
        return out;
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(root) = cgroup2_mount(&mountinfo) else {
        return out;
    };
    let Ok(meta) = fs::metadata(&root) else {
        return out;
    };
    if wanted.contains(&meta.ino()) {
        out.insert(meta.ino(), "/".to_string());
    }
    let mut stack: Vec<(PathBuf, String)> = vec![(root, String::new())];
    let mut visited = 0;
    while let Some((dir, rel)) = stack.pop() {
        if out.len() == wanted.len() || visited >= CGROUP_DIRS_MAX {
            break;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            visited += 1;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = format!("{rel}/{name}");
            if wanted.contains(&e.ino()) {
                out.insert(e.ino(), path.clone());
            }
            stack.push((e.path(), path));
        }
    }
    out
}

/// A process's cgroup path: the v2 (`0::`) line, else systemd's v1 hierarchy.
pub fn process_cgroup(pid: u32) -> Option<String> {
    parse_proc_cgroup(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    let mut fallback = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if id == "0" && ctl.is_empty() {
            // On hybrid hosts the v2 hierarchy is often empty ("/"): prefer systemd's then.
            if path != "/" {
                return Some(path.to_string());
            }
            fallback.get_or_insert_with(|| path.to_string());
        } else if ctl == "name=systemd" {
            fallback = Some(path.to_string());
        }
    }
    fallback
}

/// The inode of a process's (or thread's) network namespace; `None` when it has exited
/// or may not be inspected.
pub fn netns_of(pid: u32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    super::netns::parse_ns_link(link.to_str()?)
}

/// A process's start time (field 22 of `/proc/PID/stat`, clock ticks since boot): with
/// the pid it names one process for good, since a recycled pid starts later.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/PID/stat` text. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn parse_start_time(stat: &[u8]) -> Option<u64> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // After ")": field 3 (state) is the first; field 22 is the 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The host name (`/proc/sys/kernel/hostname`, i.e. this UTS namespace's), safe to print
/// and within the protocol's bound (`sethostname` takes any bytes: escapes are escaped).
pub fn hostname() -> String {
    let mut name = fs::read("/proc/sys/kernel/hostname")
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    listenscope_core::record::clean(&mut name, listenscope_core::limits::OS_HOSTNAME);
    name
}

/// `net.ipv6.conf.IF.disable_ipv6` of every interface of the calling thread's network
/// namespace (`/proc/sys/net` is resolved against the reading thread's namespace), as
/// (interface name, disabled); `all` and `default` are left out. An interface that goes
/// away between the listing and the read is skipped.
pub fn ipv6_disabled_per_interface() -> io::Result<Vec<(String, bool)>> {
    let dir = std::path::Path::new("/proc/sys/net/ipv6/conf");
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        if name == "all" || name == "default" {
            continue;
        }
        match fs::read(dir.join(&name).join("disable_ipv6")) {
            Ok(value) => out.push((
                name.to_string_lossy().into_owned(),
                value.trim_ascii() != b"0",
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Reads `/proc/PID/net/{tcp,tcp6,udp,udp6}`: the namespace's sockets without v6only,
/// bound device or socket options (the fallback when setns is not allowed).
pub fn proc_net_sockets(pid: u32, protocols: &[Protocol]) -> io::Result<Vec<RawSocket>> {
    let mut out = Vec::new();
    let base = PathBuf::from(format!("/proc/{pid}/net"));
    for &protocol in protocols {
        for family in [Family::Ipv4, Family::Ipv6] {
            let name = match (protocol, family) {
                (Protocol::Tcp, Family::Ipv4) => "tcp",
                (Protocol::Tcp, Family::Ipv6) => "tcp6",
                (Protocol::Udp, Family::Ipv4) => "udp",
                (Protocol::Udp, Family::Ipv6) => "udp6",
            };
            match fs::read_to_string(base.join(name)) {
                Ok(text) => out.extend(parse_proc_net(&text, protocol, family)),
                // tcp6/udp6 are missing when IPv6 is disabled at boot.
                Err(e) if e.kind() == io::ErrorKind::NotFound && family == Family::Ipv6 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

/// Parses one `/proc/net/{tcp,tcp6,udp,udp6}` table: LISTEN (0A) for TCP, CLOSE (07) for UDP.
pub fn parse_proc_net(text: &str, protocol: Protocol, family: Family) -> Vec<RawSocket> {
    let want_state = match protocol {
        Protocol::Tcp => "0A",
        Protocol::Udp => "07",
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != want_state {
                return None;
            }
            let (addr, port) = f[1].split_once(':')?;
            let address = parse_hex_addr(addr, family)?;
            Some(RawSocket {
                protocol,
                family,
                address,
                port: u16::from_str_radix(port, 16).ok()?,
                v6only: None,
                ifindex: 0,
                freebind: None,
                transparent: None,
                uid: f[7].parse().ok()?,
                inode: f[9].parse().ok()?,
                cgroup_id: None,
            })
        })
        .collect()
}

/// The kernel prints each 32-bit word of the address in host byte order with `%08X`.
fn parse_hex_addr(hex: &str, family: Family) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    match (family, hex.len()) {
        (Family::Ipv4, 8) => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        (Family::Ipv6, 32) => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_times() {
        let stat = |comm: &str| {
            format!("42 ({comm}) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 5122789 1000 1")
        };
        assert_eq!(parse_start_time(stat("sshd").as_bytes()), Some(5122789));
        assert_eq!(parse_start_time(stat("a) b (c").as_bytes()), Some(5122789));
        assert_eq!(parse_start_time(stat("x y z").as_bytes()), Some(5122789));
        assert_eq!(parse_start_time(b"42 (short) S 1 2"), None);
        assert_eq!(parse_start_time(b"no parenthesis"), None);
        let own = start_time(std::process::id()).expect("our own start time");
        assert_eq!(start_time(std::process::id()), Some(own));
    }

    #[test]
    fn socket_inodes() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"socket:[]"), None);
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"socket:[12a45]"), None);
        assert_eq!(socket_inode(b"socket:[99999999999999999999]"), None);
    }

    #[test]
    fn proc_fd_paths() {
        let mut buf = [0u8; 32];
        assert_eq!(proc_fd_path(1, &mut buf).to_bytes(), b"/proc/1/fd");
        assert_eq!(
            proc_fd_path(u32::MAX, &mut buf).to_bytes(),
            b"/proc/4294967295/fd"
        );
    }

    /// The walk lists a fd table larger than one getdents64 buffer (≈ 1,000 entries) in
    /// full: every socket this test opens is found, with its inode as `fstat` reports it.
    #[test]
    fn walk_pid_lists_a_large_fd_table() {
        let limits = fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let soft: usize = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(1024);
        // Leave room for the fds of tests running alongside.
        let pairs = ((soft.saturating_sub(256)) / 2).min(1_200);
        let sockets: Vec<_> = (0..pairs)
            .map(|_| std::os::unix::net::UnixDatagram::pair().unwrap())
            .collect();
        let inodes: FastSet<u64> = sockets
            .iter()
            .flat_map(|(a, b)| [rfs::fstat(a).unwrap().st_ino, rfs::fstat(b).unwrap().st_ino])
            .collect();
        let mut found = Vec::new();
        walk_pid(std::process::id(), |i| inodes.contains(&i), &mut found).unwrap();
        let seen: FastSet<u64> = found.iter().map(|&(inode, _)| inode).collect();
        assert_eq!(seen.len(), inodes.len(), "{pairs} socket pairs");
        assert!(found.iter().all(|&(_, pid)| pid == std::process::id()));
    }

    #[test]
    fn cap_eff() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let caps = Caps(parse_cap_eff(s).unwrap());
        assert!(caps.has(CAP_SYS_ADMIN) && caps.has(CAP_SYS_PTRACE));
        assert!(!Caps(parse_cap_eff("CapEff:\t0000000000000000\n").unwrap()).has(CAP_SYS_ADMIN));
    }

    #[test]
    fn passwd() {
        let p = Passwd::parse(
            "root:x:0:0:root:/root:/bin/bash\n# comment\nwww-data:x:33:33::/var/www:/usr/sbin/nologin\n",
        );
        assert_eq!(p.name(0), "root");
        assert_eq!(p.name(33), "www-data");
        assert_eq!(p.name(4242), "4242");
    }

    #[test]
    fn cmdline() {
        assert_eq!(format_cmdline(b"nginx: master\0"), "nginx: master");
        assert_eq!(format_cmdline(b"/usr/sbin/sshd\0-D\0"), "/usr/sbin/sshd -D");
        assert_eq!(format_cmdline(b""), "");
        let long = vec![b'a'; CMDLINE_MAX + 10];
        let s = format_cmdline(&long);
        assert!(s.ends_with('…') && s.len() == CMDLINE_MAX + '…'.len_utf8());
    }

    #[test]
    fn proc_cgroup() {
        assert_eq!(
            parse_proc_cgroup("0::/system.slice/nginx.service\n").as_deref(),
            Some("/system.slice/nginx.service")
        );
        assert_eq!(
            parse_proc_cgroup("9:name=systemd:/system.slice/ssh.service\n4:memory:/x\n0::/\n")
                .as_deref(),
            Some("/system.slice/ssh.service")
        );
        assert_eq!(parse_proc_cgroup("0::/\n").as_deref(), Some("/"));
        assert_eq!(parse_proc_cgroup("").as_deref(), None);
    }

    #[test]
    fn cgroup2_mount_point() {
        let mi = "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
    }

    #[test]
    fn proc_net_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 16969 1 0000000000000000 100 0 0 10 5\n\
   1: 0500000A:1F90 0600000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 17000 1 0000000000000000 100 0 0 10 5\n";
        let s = parse_proc_net(tcp, Protocol::Tcp, Family::Ipv4);
        assert_eq!(s.len(), 1, "established line is skipped");
        assert_eq!(
            (s[0].address, s[0].port, s[0].uid, s[0].inode),
            ("127.0.0.1".parse().unwrap(), 53, 101, 16969)
        );
        assert_eq!(s[0].v6only, None);

        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20001 1 0000000000000000 100 0 0 10 0\n\
   1: 0000000000000000FFFF00000500000A:0051 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20002 1 0000000000000000 100 0 0 10 0\n\
   2: 000080FE00000000FF4C4C4C4C4C4CFE:0052 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 20003 1 0000000000000000 100 0 0 10 0\n";
        let s = parse_proc_net(tcp6, Protocol::Tcp, Family::Ipv6);
        let addrs: Vec<String> = s
            .iter()
            .map(|s| format!("{}:{}", s.address, s.port))
            .collect();
        assert_eq!(
            addrs,
            [
                ":::80",
                "::ffff:10.0.0.5:81",
                "fe80::4c4c:4cff:fe4c:4c4c:82"
            ]
        );

        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  100: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3000 2 0000000000000000 0\n";
        let s = parse_proc_net(udp, Protocol::Udp, Family::Ipv4);
        assert_eq!((s[0].address, s[0].port), ("0.0.0.0".parse().unwrap(), 68));
    }
}
