//! The doorbell against the real kernel: listens, closes and binds ring with the right
//! process, port and family, in this process and in another network namespace; a
//! connection churn does not ring (the kernel filter works, shown against a permissive
//! one); a filter the kernel refuses is an error; tracefs is mounted privately without
//! touching the host's mount table; and without capabilities the error names the missing
//! one, while CAP_PERFMON alone is enough.
//!
//! Tests that need other credentials or another mount namespace run this test binary
//! again as a child (`in_child`): under `unshare -m` and `setpriv`, with the test's name
//! and [`CHILD`] set, the same test runs its child part and prints one line.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a test fails by panicking; the child part reports on stdout"
)]

mod util;

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use listenscope_agent::model::Family;
use listenscope_agent::os::doorbell::{
    BIND_FILTER, Doorbell, DoorbellError, Drained, Event, Options, SET_STATE_FILTER,
};
use util::*;

/// Generous: events arrive about 0.1 ms after the system call.
const BOUND: Duration = Duration::from_secs(5);
/// Set to the test's name in the child it runs.
const CHILD: &str = "LISTENSCOPE_DOORBELL_CHILD";
const REPORT: &str = "doorbell-child: ";

fn options() -> Options {
    Options {
        skip_own_binds: false, // the test's own binds are what it looks for
        ..Options::default()
    }
}

/// A doorbell and everything it has delivered so far.
struct Bell {
    doorbell: Doorbell,
    seen: Vec<Event>,
    counts: Drained,
}

impl Bell {
    fn open(options: &Options) -> Bell {
        Bell {
            doorbell: Doorbell::open(options).unwrap_or_else(|e| panic!("doorbell: {e}")),
            seen: Vec::new(),
            counts: Drained::default(),
        }
    }

    fn drain(&mut self) {
        let d = self.doorbell.drain(&mut self.seen);
        self.counts.lost += d.lost;
        self.counts.malformed += d.malformed;
        self.counts.ignored += d.ignored;
    }

    /// Waits (at most [`BOUND`]) until `want` has been delivered.
    fn expect(&mut self, want: Event) {
        let deadline = Instant::now() + BOUND;
        loop {
            self.drain();
            if self.seen.contains(&want) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{want:?} not delivered within {BOUND:?}; delivered: {:?}",
                self.mine(want.pid())
            );
            self.doorbell
                .wait(Some(left.min(Duration::from_millis(200))))
                .unwrap();
        }
    }

    fn mine(&self, pid: u32) -> Vec<Event> {
        self.seen
            .iter()
            .copied()
            .filter(|e| e.pid() == pid)
            .collect()
    }
}

/// The calling thread's id (`/proc/thread-self` → `PID/task/TID`).
fn thread_id() -> u32 {
    let link = std::fs::read_link("/proc/thread-self").unwrap();
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

fn mountinfo(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap()
}

#[test]
fn listens_closes_and_binds_ring_with_their_process_port_and_family() {
    require_root();
    let before = mountinfo("self");
    let mut bell = Bell::open(&options());
    // Where the layouts came from: a private mount when tracefs is not mounted here, and
    // then the host has no tracefs afterwards either. (Whether the host's table changed
    // at all, even for a moment, is `without_tracefs_it_is_mounted_privately`'s question:
    // here other tests add namespaces, each a mount on /run/netns.)
    if !before.contains(" - tracefs ") && !before.contains(" - debugfs ") {
        assert!(
            bell.doorbell.tracefs().contains("private mount"),
            "{}",
            bell.doorbell.tracefs()
        );
        assert!(!mountinfo("self").contains(" - tracefs "));
    }
    assert!(!bell.doorbell.cpus().is_empty());
    let (me, tid) = (std::process::id(), thread_id());

    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    let (p4, p6) = (
        v4.local_addr().unwrap().port(),
        v6.local_addr().unwrap().port(),
    );
    let listen = |family, port| Event::Listen {
        pid: me,
        tid,
        family,
        port,
    };
    bell.expect(listen(Family::Ipv4, p4));
    bell.expect(listen(Family::Ipv6, p6));
    bell.expect(Event::Bind { pid: me, tid });
    drop(v4);
    bell.expect(Event::ListenClose {
        pid: me,
        tid,
        family: Family::Ipv4,
        port: p4,
    });
    drop(v6);
    bell.expect(Event::ListenClose {
        pid: me,
        tid,
        family: Family::Ipv6,
        port: p6,
    });

    // A UDP bind on another thread: the event names that thread.
    let before_udp = bell.seen.len();
    let (udp, udp_tid) =
        std::thread::spawn(|| (UdpSocket::bind("127.0.0.1:0").unwrap(), thread_id()))
            .join()
            .unwrap();
    bell.expect(Event::Bind {
        pid: me,
        tid: udp_tid,
    });
    drop(udp);
    // A UDP socket does not listen, so nothing but the bind was reported for it.
    assert!(
        bell.seen[before_udp..]
            .iter()
            .all(|e| e.pid() != me || matches!(e, Event::Bind { .. })),
        "{:?}",
        &bell.seen[before_udp..]
    );

    // Another process in another network namespace: its listen, its UDP bind, and the
    // close when it is killed (the exiting process closes its files).
    let ns = Netns::new();
    let mut child = Proc(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c"])
            .arg(
                "import socket, time\n\
                 s = socket.socket(socket.AF_INET6); s.bind(('::', 0)); s.listen()\n\
                 u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('0.0.0.0', 0))\n\
                 print(s.getsockname()[1], flush=True)\n\
                 time.sleep(60)\n",
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // `ip netns exec` execs python in place: same pid, and the main thread's tid is it.
    let pid = child.pid();
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    bell.expect(Event::Listen {
        pid,
        tid: pid,
        family: Family::Ipv6,
        port,
    });
    bell.expect(Event::Bind { pid, tid: pid });
    child.kill();
    bell.expect(Event::ListenClose {
        pid,
        tid: pid,
        family: Family::Ipv6,
        port,
    });
    // (Lost samples are possible here while nothing drains, from the rest of the machine;
    // the churn test checks that a drained doorbell loses none.)
    assert_eq!(bell.counts.malformed, 0, "{:?}", bell.counts);
}

#[test]
fn without_bind_events_only_listens_ring() {
    require_root();
    let mut bell = Bell::open(&Options {
        bind_events: false,
        ..options()
    });
    let me = std::process::id();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    bell.expect(Event::Listen {
        pid: me,
        tid: thread_id(),
        family: Family::Ipv4,
        port: tcp.local_addr().unwrap().port(),
    });
    // Both binds happened before the listen, whose event has been read: had they rung,
    // their events would be here too (every drain reads every CPU's ring).
    assert!(
        !bell
            .mine(me)
            .iter()
            .any(|e| matches!(e, Event::Bind { .. })),
        "{:?}",
        bell.mine(me)
    );
    assert_eq!(bell.counts.malformed, 0);
    drop((udp, tcp));
}

#[test]
fn a_connection_churn_does_not_ring() {
    require_root();
    let mut bell = Bell::open(&options());
    // The same tracepoint with a filter that lets every state change through: the
    // control that shows the churn below would be seen without the real filter.
    let mut open_bell = Bell {
        doorbell: Doorbell::open_with_filters(&options(), "newstate >= 0", BIND_FILTER).unwrap(),
        seen: Vec::new(),
        counts: Drained::default(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    const CONNECTIONS: usize = 2000;
    let server = std::thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.read(&mut [0u8; 1]); // until the client closes
        }
        listener
    });
    let client = std::thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            drop(TcpStream::connect(addr).unwrap());
        }
    });
    while !client.is_finished() {
        bell.doorbell.wait(Some(Duration::from_millis(20))).unwrap();
        bell.drain();
        open_bell.drain();
    }
    client.join().unwrap();
    let listener = server.join().unwrap();
    std::thread::sleep(Duration::from_millis(100)); // the last closes' events
    bell.drain();
    open_bell.drain();

    let at_port: Vec<Event> = bell
        .seen
        .iter()
        .copied()
        .filter(|e| matches!(e, Event::Listen { port, .. } | Event::ListenClose { port, .. } if *port == addr.port()))
        .collect();
    let me = std::process::id();
    assert_eq!(
        at_port,
        [Event::Listen {
            pid: me,
            tid: thread_id(),
            family: Family::Ipv4,
            port: addr.port()
        }]
    );
    assert_eq!(bell.counts.lost, 0, "{:?}", bell.counts);
    // Anything else the machine did meanwhile may ring, but no state change of these
    // connections got past the filter: with it the ring saw none, without it thousands.
    assert!(bell.counts.ignored < 10, "{:?}", bell.counts);
    let unfiltered = open_bell.counts.ignored + open_bell.counts.lost;
    assert!(
        unfiltered >= CONNECTIONS as u64,
        "the permissive filter saw {:?}",
        open_bell.counts
    );
    drop(listener);
}

#[test]
fn a_filter_the_kernel_refuses_is_an_error() {
    require_root();
    let check = |set_state: &str, bind: &str, tracepoint: &str| match Doorbell::open_with_filters(
        &options(),
        set_state,
        bind,
    ) {
        Err(e @ DoorbellError::FilterRefused { .. }) => {
            let text = e.to_string();
            assert!(text.contains(tracepoint), "{text}");
            assert!(text.contains("never runs unfiltered"), "{text}");
        }
        other => panic!("{set_state:?} / {bind:?}: {other:?}"),
    };
    check(
        "no_such_field == 1",
        BIND_FILTER,
        "sock/inet_sock_set_state",
    );
    check(SET_STATE_FILTER, "ret ==", "syscalls/sys_exit_bind");
    check(SET_STATE_FILTER, "newstate == 10", "syscalls/sys_exit_bind");
}

/// Runs this test binary's test `test` again in a child: `sh -c SCRIPT` in a new private
/// mount namespace, `SCRIPT` ending with `"$@"` (the test binary). Returns the child's
/// report line.
fn in_child(test: &str, script: &str) -> String {
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD, test)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child {test}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split_once(REPORT).map(|(_, report)| report))
        .unwrap_or_else(|| panic!("child {test} reported nothing:\n{stdout}"))
        .to_string()
}

/// In the child started by [`in_child`] for `test`: runs `part` and prints its report.
/// Returns whether this is that child (the test's parent part must not run then).
fn child_part(test: &str, part: impl FnOnce() -> String) -> bool {
    if std::env::var(CHILD).as_deref() != Ok(test) {
        return false;
    }
    // On a line of its own: the harness has printed `test NAME ... ` without a newline.
    println!("\n{REPORT}{}", part());
    true
}

/// Whether the mount table of this process's namespace changed since `mountinfo` (an
/// open `/proc/self/mountinfo`) was opened, even if it changed back: the kernel then
/// reports POLLPRI on it.
fn mount_table_changed(mountinfo: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: mountinfo.as_raw_fd(),
        events: libc::POLLPRI,
        revents: 0,
    };
    // SAFETY: one valid pollfd, alive for the call; timeout 0 (no wait).
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    p.revents & libc::POLLPRI != 0
}

/// The child's view: the error, or proof that the doorbell works (a listen rings).
fn open_and_listen() -> String {
    let caps = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:\t").map(str::to_string))
        .unwrap();
    let before = mountinfo("self");
    let watch = std::fs::File::open("/proc/self/mountinfo").unwrap();
    let mut bell = match Doorbell::open(&options()) {
        Ok(d) => Bell {
            doorbell: d,
            seen: Vec::new(),
            counts: Drained::default(),
        },
        Err(e) => return format!("CapEff {caps} error: {e}"),
    };
    let unchanged = mountinfo("self") == before && !mount_table_changed(&watch);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    bell.expect(Event::Listen {
        pid: std::process::id(),
        tid: thread_id(),
        family: Family::Ipv4,
        port: l.local_addr().unwrap().port(),
    });
    format!(
        "CapEff {caps} listen seen; tracefs: {}; mount table unchanged: {unchanged}",
        bell.doorbell.tracefs()
    )
}

/// Unmounts tracefs and debugfs (in the child's namespace only), then runs the child.
const NO_TRACEFS: &str = "umount -l /sys/kernel/tracing 2>/dev/null; \
                          umount -l /sys/kernel/debug 2>/dev/null; ";
/// Mounts tracefs (in the child's namespace only), then runs the child.
const TRACEFS: &str = "mount -t tracefs nodev /sys/kernel/tracing && ";

#[test]
fn without_tracefs_it_is_mounted_privately() {
    const TEST: &str = "without_tracefs_it_is_mounted_privately";
    if child_part(TEST, open_and_listen) {
        return;
    }
    require_root();
    // Every mount shared, as systemd sets up hosts: a mount in a namespace copied from
    // this one would propagate back unless the doorbell makes its copies private first.
    let report = in_child(
        TEST,
        &format!("{NO_TRACEFS} mount --make-rshared / && exec \"$@\""),
    );
    assert!(
        report.ends_with(
            "listen seen; tracefs: a private mount of tracefs at /sys/kernel/tracing; \
             mount table unchanged: true"
        ),
        "{report}"
    );
}

#[test]
fn without_cap_sys_admin_and_tracefs_the_error_says_so() {
    const TEST: &str = "without_cap_sys_admin_and_tracefs_the_error_says_so";
    if child_part(TEST, open_and_listen) {
        return;
    }
    require_root();
    let report = in_child(
        TEST,
        &format!("{NO_TRACEFS} exec setpriv --bounding-set=-all --inh-caps=-all \"$@\""),
    );
    assert_eq!(
        report,
        "CapEff 0000000000000000 error: tracefs is not mounted (unshare(CLONE_NEWNS): \
         Operation not permitted (os error 1)): mount it at /sys/kernel/tracing, or grant \
         CAP_SYS_ADMIN for a private mount"
    );
}

#[test]
fn without_cap_perfmon_the_error_says_so() {
    const TEST: &str = "without_cap_perfmon_the_error_says_so";
    if child_part(TEST, open_and_listen) {
        return;
    }
    require_root();
    let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").unwrap();
    assert!(
        paranoid.trim().parse::<i32>().unwrap() >= 0,
        "perf_event_paranoid is {paranoid}: every user may trace, this test proves nothing"
    );
    let report = in_child(
        TEST,
        &format!("{TRACEFS} exec setpriv --bounding-set=-all --inh-caps=-all \"$@\""),
    );
    assert!(
        report.starts_with("CapEff 0000000000000000 error: perf_event_open refused ("),
        "{report}"
    );
    assert!(report.ends_with("): grant CAP_PERFMON (or set kernel.perf_event_paranoid=-1); if granted, a seccomp filter forbids it"), "{report}");
}

#[test]
fn a_user_who_cannot_read_tracefs_is_told_so() {
    const TEST: &str = "a_user_who_cannot_read_tracefs_is_told_so";
    if child_part(TEST, open_and_listen) {
        return;
    }
    require_root();
    // nobody with CAP_PERFMON: tracefs is mounted, but root's.
    let report = in_child(
        TEST,
        &format!(
            "{TRACEFS} exec setpriv --reuid 65534 --regid 65534 --clear-groups \
             --inh-caps=-all,+perfmon --ambient-caps=-all,+perfmon \"$@\""
        ),
    );
    assert_eq!(
        report,
        format!(
            "CapEff {:016x} error: cannot read /sys/kernel/tracing/events (Permission denied \
             (os error 13)): needs root or CAP_DAC_READ_SEARCH",
            1u64 << 38
        )
    );
}

#[test]
fn cap_perfmon_alone_is_enough() {
    const TEST: &str = "cap_perfmon_alone_is_enough";
    if child_part(TEST, open_and_listen) {
        return;
    }
    require_root();
    let report = in_child(
        TEST,
        &format!("{TRACEFS} exec setpriv --bounding-set=-all,+perfmon --inh-caps=-all \"$@\""),
    );
    // CAP_PERFMON is capability 38.
    assert!(
        report.starts_with(&format!(
            "CapEff {:016x} listen seen; tracefs: /sys/kernel/tracing;",
            1u64 << 38
        )),
        "{report}"
    );
}
