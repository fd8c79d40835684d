//! `listenscope-testkit`: the helpers the agent's and the collector's integration tests
//! share, so each exists once.
//!
//! - [`require_root`], [`run`] (a command that must succeed, with its stderr on failure),
//!   [`Proc`] (a child killed and reaped on drop), [`TempDir`] (removed on drop);
//! - [`Netns`] (a named network namespace: create, enter, exec, ifindex; deleted on drop),
//!   [`Veth`] (a veth pair between namespaces or to the host), [`HostLink`] (a veth link
//!   from the host into a namespace, on a subnet of its own), [`enter_netns`] (run code in
//!   any namespace given by an nsfs path). Namespaces are named `lst-<pid>-<n>`; the first
//!   [`require_root`] of a test process deletes those whose creating process is gone
//!   (left by a killed run);
//! - real sockets: [`Bind`] (a TCP listener or UDP socket in any bind mode),
//!   [`tcp_listener`], [`udp_socket`], probes [`tcp_connects`], [`udp_delivers`],
//!   [`free_port`];
//! - readiness instead of sleeps: [`wait_until`] / [`wait_for`] (blocking) and
//!   [`wait_until_async`] / [`wait_for_async`] (tokio; they follow a paused tokio clock)
//!   poll a condition until it holds, and panic naming it after a deadline;
//!   [`wait_listening`] waits for a TCP port to accept connections;
//! - [`LogsOnPanic`]: prints the tail of log files when a test fails;
//! - [`Chromium`]: headless Chromium, bounded and kept off the network, for the DOM of a
//!   page on loopback and its screenshot (module `browser` says which flags and why).
//!
//! Linux only, and most of it needs root (namespaces, veth links).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail by panicking"
)]

pub mod browser;
mod netns;
mod process;
mod sockets;
mod wait;

pub use browser::Chromium;
pub use netns::{HostLink, Netns, Veth, enter_netns};
pub use process::{LogsOnPanic, Proc, TempDir, require_root, run};
pub use sockets::{Bind, free_port, tcp_connects, tcp_listener, udp_delivers, udp_socket};
pub use wait::{wait_for, wait_for_async, wait_listening, wait_until, wait_until_async};

use std::sync::atomic::{AtomicUsize, Ordering};

/// A number unique in this test process (names of namespaces, links, directories).
fn unique() -> usize {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    COUNTER.fetch_add(1, Ordering::SeqCst)
}
