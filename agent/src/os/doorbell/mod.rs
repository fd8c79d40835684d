//! The doorbell: the kernel tells the agent that a TCP socket started or stopped listening
//! or that a `bind()` succeeded, microseconds after the system call (to a thread waiting
//! in [`Doorbell::wait`]: median 5 µs, 99th percentile 40 µs on the reference machine), so
//! `run` can rescan the one namespace concerned instead of waiting for the next interval.
//!
//! Two tracepoints, read through `perf_event_open` on every online CPU (docs/kernel.md,
//! "Listen and close notifications"):
//!
//! - `sock:inet_sock_set_state`, kernel-filtered to [`SET_STATE_FILTER`]: a socket moving
//!   to `TCP_LISTEN`, or from `TCP_LISTEN` to `TCP_CLOSE`. Unfiltered it fires for every
//!   connection's every state change; the filter is what makes it cheap, so a kernel that
//!   refuses it is an error, never a reason to run unfiltered.
//! - `syscalls:sys_exit_bind`, kernel-filtered to [`BIND_FILTER`] (success): UDP sockets
//!   have no state change to watch, their `bind()` is the moment they appear. It fires for
//!   every successful bind (TCP, netlink, unix too) and carries a pid, not a namespace.
//!   Enabling it slows every system call on the machine a little ([`Options::bind_events`]).
//!
//! An event is a hint to rescan, not a fact to record: the kernel fires the listen event
//! *before* the socket is in the listening hash (`inet_csk_listen_start` validates the port
//! after announcing the state), events of different CPUs are not ordered, and a full ring
//! drops events (counted in [`Drained::lost`]). The caller rescans the event's process's
//! namespace, shortly after, and rescans everything when something was lost.
//!
//! Use: [`Doorbell::open`] (falls back to polling on any [`DoorbellError`]: its text is
//! what the operator sees), then a dedicated thread loops on [`Doorbell::wait`] (or polls
//! [`Doorbell::fds`] itself) and [`Doorbell::drain`]. CPU hotplug: the rings are those of
//! the CPUs online at `open`; a CPU brought online later is not watched, which the
//! periodic reconciliation scan covers.
//!
//! Layout: `format.rs` (pure: tracefs `format` files → field offsets), `ring.rs` (pure:
//! perf ring records → events), `tracefs.rs` (finding or privately mounting tracefs),
//! `perf.rs` (`perf_event_open`, filters, mmap, poll).

mod format;
mod perf;
mod ring;
mod tracefs;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use crate::model::Family;
pub use format::FormatError;
use format::{BindLayout, Format, SetStateLayout};
use perf::{CpuRing, Tracepoint};
use ring::Decoder;

/// The in-kernel filter of `sock:inet_sock_set_state`: listen (`* → TCP_LISTEN`) and a
/// listener's close (`TCP_LISTEN → TCP_CLOSE`). Accepted children (`TCP_LISTEN →
/// TCP_SYN_RECV`) and every connection's own states stay in the kernel.
pub const SET_STATE_FILTER: &str = "newstate == 10 || (oldstate == 10 && newstate == 7)";
/// The in-kernel filter of `syscalls:sys_exit_bind`: successful binds only.
pub const BIND_FILTER: &str = "ret == 0";

/// What rang. `pid` and `tid` are the task that was running when the tracepoint fired:
/// for `listen()`, `close()` and `bind()`, the caller (a listener closed because its
/// process exited carries the exiting process; one closed by the kernel, a kernel thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A TCP (or MPTCP) socket started listening. `port` is in host order, and is 0 when
    /// `listen()` picks the port itself (no `bind()` before): the tracepoint fires before
    /// the port is chosen. SCTP listeners are not reported (the agent does not inventory
    /// SCTP).
    Listen {
        pid: u32,
        tid: u32,
        family: Family,
        port: u16,
    },
    /// A TCP listener was closed (or shut down, or its `listen()` failed after the state
    /// change).
    ListenClose {
        pid: u32,
        tid: u32,
        family: Family,
        port: u16,
    },
    /// A `bind()` of any socket kind succeeded (the tracepoint knows no more). With
    /// [`Options::skip_own_binds`], the agent's own are not reported.
    Bind { pid: u32, tid: u32 },
}

impl Event {
    /// The process whose namespace to rescan.
    pub fn pid(&self) -> u32 {
        match *self {
            Event::Listen { pid, .. }
            | Event::ListenClose { pid, .. }
            | Event::Bind { pid, .. } => pid,
        }
    }
}

/// What a [`Doorbell::drain`] could not turn into events.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Samples the kernel dropped because a ring was full.
    pub lost: u64,
    /// Records that could not be decoded (never expected; counted, never retried).
    pub malformed: u64,
    /// Samples read but not reported: SCTP listeners, families other than IPv4/IPv6, the
    /// agent's own binds, and state changes the kernel filter should have kept (so this
    /// also shows whether the filter works).
    pub ignored: u64,
}

impl Drained {
    /// Whether events may be missing: the caller should rescan everything.
    pub fn missed_any(&self) -> bool {
        self.lost > 0 || self.malformed > 0
    }
}

/// How [`Doorbell::open`] may go about it.
#[derive(Debug, Clone)]
pub struct Options {
    /// When tracefs is not mounted, mount it in a private mount namespace on a
    /// short-lived thread (needs CAP_SYS_ADMIN; the host's mount table is not touched).
    /// Default: true.
    pub mount_tracefs: bool,
    /// Watch successful `bind()` calls (`syscalls:sys_exit_bind`): the only notice of a
    /// new UDP socket. Its price is paid by every process: while any syscall tracepoint
    /// is enabled, every system call of every task takes the kernel's syscall-tracing
    /// path (measured on Linux 6.18: `getppid` 118 → 145 ns, filter or not). Without it,
    /// UDP sockets are found by the periodic scan only. Default: true.
    pub bind_events: bool,
    /// Drop `Bind` events of this process: the agent binds netlink sockets on every scan,
    /// which would otherwise ring for the next one. Default: true.
    pub skip_own_binds: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mount_tracefs: true,
            bind_events: true,
            skip_own_binds: true,
        }
    }
}

/// Why the doorbell is off. Each message names the cause and the fix in one line: it is
/// what the operator sees in the logs and the collector's `hosts` view (the cause is in the
/// text, not in a `source()`, so a `{:#}` chain does not repeat it).
#[derive(Debug, thiserror::Error)]
pub enum DoorbellError {
    #[error(
        "tracefs is not mounted ({cause}): mount it at /sys/kernel/tracing, or grant \
         CAP_SYS_ADMIN for a private mount"
    )]
    NoTracefs { cause: String },
    #[error("cannot read {} ({cause}): needs root or CAP_DAC_READ_SEARCH", path.display())]
    TracefsUnreadable { path: PathBuf, cause: io::Error },
    #[error("tracepoint {tracepoint} is missing from {}/events: {}", tracefs.display(), needs(tracepoint))]
    TracepointMissing {
        tracepoint: &'static str,
        tracefs: PathBuf,
    },
    #[error("tracepoint {tracepoint} has a layout this agent cannot read: {cause}")]
    BadFormat {
        tracepoint: &'static str,
        cause: FormatError,
    },
    #[error(
        "perf_event_open refused ({cause}): grant CAP_PERFMON (or set \
         kernel.perf_event_paranoid=-1); if granted, a seccomp filter forbids it"
    )]
    NoPermission { cause: io::Error },
    #[error(
        "perf_event_open unavailable ({cause}): kernel without perf events or \
         tracepoints, or a seccomp filter hides the call"
    )]
    Unsupported { cause: io::Error },
    #[error(
        "the kernel refused the filter `{filter}` on {tracepoint} ({cause}); the doorbell never runs unfiltered"
    )]
    FilterRefused {
        tracepoint: &'static str,
        filter: String,
        cause: io::Error,
    },
    #[error(
        "cannot map a perf ring ({cause}): perf's locked memory is used up; raise \
         kernel.perf_event_mlock_kb or grant CAP_IPC_LOCK"
    )]
    RingMap { cause: io::Error },
    #[error("cannot tell the online CPUs ({cause})")]
    Cpus { cause: String },
    #[error("{what} failed ({cause})")]
    Perf { what: String, cause: io::Error },
}

/// What a missing tracepoint says about the kernel.
fn needs(tracepoint: &str) -> &'static str {
    match tracepoint {
        tracefs::SET_STATE => "it needs Linux 4.16 or later",
        tracefs::BIND => {
            "the kernel was built without syscall tracepoints (CONFIG_FTRACE_SYSCALLS)"
        }
        _ => "the kernel does not have it",
    }
}

/// The open doorbell: one perf ring per CPU online at [`Doorbell::open`], both
/// tracepoints of a CPU writing into it. Closing (drop) unmaps and closes everything.
#[derive(Debug)]
pub struct Doorbell {
    rings: Vec<CpuRing>,
    decoder: Decoder,
    /// One ring's worth of bytes, reused by every drain.
    scratch: Vec<u8>,
    tracefs: String,
}

// The run loop moves it to its own thread.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Doorbell>();
};

impl Doorbell {
    /// Finds (or privately mounts) tracefs for the tracepoints' ids and layouts, and opens
    /// both filtered tracepoints on every online CPU. Any error means: poll instead.
    pub fn open(options: &Options) -> Result<Doorbell, DoorbellError> {
        Doorbell::open_with_filters(options, SET_STATE_FILTER, BIND_FILTER)
    }

    /// [`Doorbell::open`] with other filters: for the test that a filter the kernel
    /// refuses is an error.
    #[doc(hidden)]
    pub fn open_with_filters(
        options: &Options,
        set_state_filter: &str,
        bind_filter: &str,
    ) -> Result<Doorbell, DoorbellError> {
        let formats = tracefs::read_formats(options.mount_tracefs, options.bind_events)?;
        let layout = |tracepoint, text: &str| {
            Format::parse(text).map_err(|cause| DoorbellError::BadFormat { tracepoint, cause })
        };
        let set_state_format = layout(tracefs::SET_STATE, &formats.set_state)?;
        let set_state = SetStateLayout::from_format(&set_state_format).map_err(|cause| {
            DoorbellError::BadFormat {
                tracepoint: tracefs::SET_STATE,
                cause,
            }
        })?;
        let bind = match &formats.bind {
            None => None,
            Some(text) => Some(
                BindLayout::from_format(&layout(tracefs::BIND, text)?).map_err(|cause| {
                    DoorbellError::BadFormat {
                        tracepoint: tracefs::BIND,
                        cause,
                    }
                })?,
            ),
        };
        let decoder = Decoder {
            set_state,
            bind,
            skip_binds_of: options.skip_own_binds.then(std::process::id),
        };
        let owner = Tracepoint {
            name: tracefs::SET_STATE,
            id: set_state.id,
            filter: set_state_filter,
        };
        let redirected = bind.map(|b| Tracepoint {
            name: tracefs::BIND,
            id: b.id,
            filter: bind_filter,
        });
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").map_err(|e| {
            DoorbellError::Cpus {
                cause: format!("/sys/devices/system/cpu/online: {e}"),
            }
        })?;
        let cpus = parse_cpu_list(&online).ok_or_else(|| DoorbellError::Cpus {
            cause: format!("/sys/devices/system/cpu/online reads {:?}", online.trim()),
        })?;
        let mut rings = Vec::with_capacity(cpus.len());
        for cpu in cpus {
            // None: the CPU went offline since the list was read.
            if let Some(ring) = CpuRing::open(cpu, &owner, redirected.as_ref())? {
                rings.push(ring);
            }
        }
        if rings.is_empty() {
            return Err(DoorbellError::Cpus {
                cause: "every listed CPU went offline".into(),
            });
        }
        Ok(Doorbell {
            rings,
            decoder,
            scratch: Vec::new(),
            tracefs: formats.from,
        })
    }

    /// Blocks until an event may be waiting, `timeout` passes (`None`: no limit) or a
    /// signal interrupts (`Ok(false)` for both). Wake-ups are edge-triggered: after
    /// `Ok(true)`, [`Doorbell::drain`] before waiting again. Meant for a dedicated thread
    /// that loops on `wait` + `drain` and checks for shutdown between bounded waits.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let fds: Vec<RawFd> = self.rings.iter().map(|r| r.fd().as_raw_fd()).collect();
        perf::poll(&fds, timeout)
    }

    /// The file descriptors that become readable when an event arrives (one per CPU), for
    /// a caller with its own poll loop.
    pub fn fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        self.rings.iter().map(CpuRing::fd)
    }

    /// Appends every event waiting in every CPU's ring to `out` (at most one ring's worth
    /// per CPU, so bounded) and says what was lost. Events of different CPUs are not in
    /// time order.
    pub fn drain(&mut self, out: &mut Vec<Event>) -> Drained {
        let mut counts = Drained::default();
        for ring in &mut self.rings {
            ring.drain(&mut self.scratch, &self.decoder, out, &mut counts);
        }
        counts
    }

    /// The CPUs watched (those online at open).
    pub fn cpus(&self) -> Vec<u32> {
        self.rings.iter().map(CpuRing::cpu).collect()
    }

    /// Where the tracepoints' layouts were read (a tracefs directory, or a private mount),
    /// for the start-up log line.
    pub fn tracefs(&self) -> &str {
        &self.tracefs
    }
}

/// `/sys/devices/system/cpu/online` (`0-3,6,8-9`) → the CPU numbers; `None` when it does
/// not parse. At most 65536 CPUs, so a damaged range cannot allocate without bound.
fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    const MAX: usize = 65536;
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let a = part.parse::<u32>().ok()?;
                (a, a)
            }
        };
        if a > b || cpus.len() + (b - a) as usize >= MAX {
            return None;
        }
        cpus.extend(a..=b);
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_cpu_lists() {
        let check = |text: &str, want: Option<&[u32]>| {
            assert_eq!(parse_cpu_list(text).as_deref(), want, "{text:?}");
        };
        check("0\n", Some(&[0]));
        check("0-1\n", Some(&[0, 1]));
        check("0-3,6,8-9\n", Some(&[0, 1, 2, 3, 6, 8, 9]));
        check("5", Some(&[5]));
        check("", None);
        check("\n", None);
        check("0-", None);
        check("3-1", None);
        check("0,,1", None);
        check("a", None);
        check("0-4294967295", None); // bounded
    }

    /// The words of a filter that name fields (not numbers or operators).
    fn filter_fields(filter: &str) -> Vec<&str> {
        filter
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
            .collect()
    }

    #[test]
    fn filters_name_only_fields_the_tracepoints_have() {
        let set_state = Format::parse(include_str!(
            "../../../tests/data/tracefs/inet_sock_set_state.format"
        ))
        .unwrap();
        let bind = Format::parse(include_str!(
            "../../../tests/data/tracefs/sys_exit_bind.format"
        ))
        .unwrap();
        for (filter, format, want) in [
            (
                SET_STATE_FILTER,
                &set_state,
                &["newstate", "oldstate", "newstate"][..],
            ),
            (BIND_FILTER, &bind, &["ret"][..]),
        ] {
            let fields = filter_fields(filter);
            assert_eq!(fields, want, "{filter}");
            for f in fields {
                assert!(format.fields.iter().any(|(n, _)| n == f), "{f} in {filter}");
            }
        }
        // The numbers are the states the decoder reports.
        assert_eq!(
            SET_STATE_FILTER,
            format!(
                "newstate == {l} || (oldstate == {l} && newstate == {c})",
                l = ring::TCP_LISTEN,
                c = ring::TCP_CLOSE
            )
        );
    }

    #[test]
    fn error_texts_name_cause_and_fix() {
        let e = DoorbellError::NoPermission {
            cause: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(
            e.to_string(),
            "perf_event_open refused (Permission denied (os error 13)): grant CAP_PERFMON \
             (or set kernel.perf_event_paranoid=-1); if granted, a seccomp filter forbids it"
        );
        let e = DoorbellError::TracepointMissing {
            tracepoint: tracefs::SET_STATE,
            tracefs: "/sys/kernel/tracing".into(),
        };
        assert_eq!(
            e.to_string(),
            "tracepoint sock/inet_sock_set_state is missing from /sys/kernel/tracing/events: \
             it needs Linux 4.16 or later"
        );
    }
}
