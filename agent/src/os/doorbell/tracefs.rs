//! Finding tracefs and reading the two tracepoints' `format` files, which carry their ids
//! and layouts. tracefs is needed for nothing else: `perf_event_open` takes the id, and the
//! filter is set on the perf event itself.
//!
//! Where it is looked for, in order: `/sys/kernel/tracing` (its home since Linux 4.1),
//! `/sys/kernel/debug/tracing` (debugfs automounts it there; reading that path on a host
//! with debugfs mounted makes the kernel mount it, as every tracing tool does), then every
//! tracefs and debugfs mount of `/proc/self/mountinfo`. When none holds it and the caller
//! allows it, tracefs is mounted in a private mount namespace on a short-lived thread of
//! its own (`unshare(CLONE_NEWNS)` affects only the calling thread; every mount is made
//! private first so nothing propagates to the host; the namespace and its mount go away
//! with the thread). The mount point is `/sys/kernel/tracing` itself (inside that private
//! namespace): it exists wherever tracefs is built in, so nothing is created on the
//! host's filesystems, as a temporary directory would be.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::DoorbellError;

pub const SET_STATE: &str = "sock/inet_sock_set_state";
pub const BIND: &str = "syscalls/sys_exit_bind";
const HOME: &str = "/sys/kernel/tracing";
/// A format file is about 2 KiB; anything larger is not one.
const FORMAT_MAX: u64 = 64 * 1024;

/// The two `format` texts, and where they were read.
#[derive(Debug)]
pub struct Formats {
    pub set_state: String,
    /// `None` when it was not asked for.
    pub bind: Option<String>,
    /// The tracefs directory, or a note that a private mount was used.
    pub from: String,
}

/// Where tracefs may be mounted: the two usual places, then tracefs and debugfs mounts of
/// `mountinfo` (debugfs + `/tracing`), without repeats.
pub fn candidates(mountinfo: &str) -> Vec<PathBuf> {
    let mut out = vec![
        PathBuf::from(HOME),
        PathBuf::from("/sys/kernel/debug/tracing"),
    ];
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL…] - FSTYPE SOURCE SUPER`
        let Some(sep) = fields.iter().position(|&f| f == "-").filter(|&s| s >= 6) else {
            continue;
        };
        let (Some(point), Some(&fstype)) = (fields.get(4), fields.get(sep + 1)) else {
            continue;
        };
        let point = PathBuf::from(crate::os::netns::unescape_mount_path(point));
        let path = match fstype {
            "tracefs" => point,
            "debugfs" => point.join("tracing"),
            _ => continue,
        };
        if !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// The formats (`sys_exit_bind`'s only if `bind`) from a mounted tracefs, else (when
/// `mount` allows it) from a private mount.
pub fn read_formats(mount: bool, bind: bool) -> Result<Formats, DoorbellError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for root in candidates(&mountinfo) {
        // `events/` is there only when tracefs is mounted at `root`. tracefs's root is
        // root's own (mode 0700): a user without CAP_DAC_READ_SEARCH cannot even look, and
        // a private mount would not help (a fresh tracefs has the same modes).
        let events = root.join("events");
        match std::fs::metadata(&events) {
            Ok(m) if m.is_dir() => return read_at(&root, bind, root.display().to_string()),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(DoorbellError::TracefsUnreadable {
                    path: events,
                    cause: e,
                });
            }
            _ => {}
        }
    }
    if !mount {
        return Err(DoorbellError::NoTracefs {
            cause: "not mounted, and a private mount was not allowed".into(),
        });
    }
    std::thread::Builder::new()
        .name("tracefs-mount".into())
        .spawn(move || private_mount(bind))
        .map_err(|e| DoorbellError::NoTracefs {
            cause: format!("no thread for the private mount: {e}"),
        })?
        .join()
        .unwrap_or_else(|_| {
            Err(DoorbellError::NoTracefs {
                cause: "the private mount thread panicked".into(),
            })
        })
}

fn read_at(root: &Path, bind: bool, from: String) -> Result<Formats, DoorbellError> {
    Ok(Formats {
        set_state: read_format(root, SET_STATE)?,
        bind: bind.then(|| read_format(root, BIND)).transpose()?,
        from,
    })
}

fn read_format(root: &Path, tracepoint: &'static str) -> Result<String, DoorbellError> {
    let path = root.join("events").join(tracepoint).join("format");
    let mut text = String::new();
    File::open(&path)
        .and_then(|f| f.take(FORMAT_MAX).read_to_string(&mut text))
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DoorbellError::TracepointMissing {
                tracepoint,
                tracefs: root.to_path_buf(),
            },
            _ => DoorbellError::TracefsUnreadable { path, cause: e },
        })?;
    Ok(text)
}

/// Runs on its own thread, which ends right after: a new mount namespace for this thread
/// only, everything in it private, tracefs mounted at `/sys/kernel/tracing`, the formats
/// read, and the mount detached (the namespace would take it away anyway).
fn private_mount(bind: bool) -> Result<Formats, DoorbellError> {
    let fail = |what: &str, e: io::Error| DoorbellError::NoTracefs {
        cause: format!("{what}: {e}"),
    };
    // SAFETY: unshare takes no pointers. CLONE_NEWNS (and the CLONE_FS it implies) changes
    // only the calling thread, which is this dedicated one; no other thread's view of the
    // filesystem changes.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(fail("unshare(CLONE_NEWNS)", io::Error::last_os_error()));
    }
    // Every mount of the new namespace private: the tracefs mount below cannot propagate
    // to the host's namespace (where `/` is usually `shared`).
    mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE)
        .map_err(|e| fail("making mounts private", e))?;
    let home = c"/sys/kernel/tracing";
    mount(
        Some(c"tracefs"),
        home,
        Some(c"tracefs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    )
    .map_err(|e| fail("mount -t tracefs", e))?;
    let read = read_at(
        Path::new(HOME),
        bind,
        format!("a private mount of tracefs at {HOME}"),
    );
    // SAFETY: `home` is a NUL-terminated path; umount2 keeps no pointer. The mount is in
    // this thread's own namespace.
    unsafe { libc::umount2(home.as_ptr(), libc::MNT_DETACH) };
    read
}

fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null
    // where mount(2) accepts null (no source or type for a propagation change; no data).
    let rc = unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_tracefs_is_looked_for() {
        let check = |mountinfo: &str, extra: &[&str]| {
            let mut want = vec!["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
            want.extend_from_slice(extra);
            let got = candidates(mountinfo);
            let got: Vec<&str> = got.iter().map(|p| p.to_str().unwrap()).collect();
            assert_eq!(got, want, "{mountinfo}");
        };
        check("", &[]);
        check(
            "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
             25 21 0:6 / /sys/kernel/tracing rw,nosuid shared:7 - tracefs tracefs rw",
            &[],
        );
        check(
            "30 21 0:12 / /sys/kernel/debug rw shared:9 master:2 - debugfs debugfs rw",
            &[],
        );
        check(
            "40 1 0:50 / /mnt/trace\\040dir rw - tracefs nodev rw\n\
             41 1 0:51 / /dbg rw - debugfs none rw\n\
             42 1 0:50 / /mnt/trace\\040dir rw - tracefs nodev rw",
            &["/mnt/trace dir", "/dbg/tracing"],
        );
        check("garbage line\n1 2 3 - tracefs\n", &[]);
    }
}
