//! Every bound of the protocol, defined once: what one message and one listener may
//! carry. The agent builds records within them (`ListenerRecord::bound`), the collector
//! refuses anything past them (`wire`), and `proto/listenscope/v1/inventory.proto`
//! documents the same numbers.

/// Wire protocol version both sides speak (`Hello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest encoded message either side sends or accepts.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Agents cut snapshot chunks and deltas before this encoded size (a single listener
/// bigger than this still goes alone). A collector keeps each connection's receive
/// buffers (HTTP/2 frame buffer, gRPC message buffer; 8 KiB at most before they grow) for
/// the connection's whole life, grown to the largest message it ever carried: with
/// messages under 7 KiB they never grow, and an idle session costs the same whatever the
/// size of the host's inventory. Tens of thousands of sessions make that matter.
pub const MESSAGE_TARGET_BYTES: usize = 7 * 1024;

/// Bytes of the namespace name.
pub const NETNS: usize = 4096;
/// Bytes of a bound device name.
pub const INTERFACE: usize = 64;
/// Bytes of netstat's "Local Address" form.
pub const SHOWN_AS: usize = 64;
/// Owners one record carries.
pub const PROCESSES: usize = 4096;
/// Sockets one listener (endpoint) counts: what both databases store in a 32-bit signed
/// integer column (`listener.sockets`). A kernel holds far fewer sockets than this; the
/// bound keeps a hostile count from wrapping negative on PostgreSQL or failing its insert
/// forever (found by the protocol property tests, docs/protocol.md).
pub const SOCKETS: u32 = i32::MAX as u32;
/// Bytes of one owner's command name.
pub const COMM: usize = 64;
/// Bytes of one owner's command line.
pub const CMDLINE: usize = 8192;
/// Command-line bytes one record carries in all; past it the remaining owners keep their
/// pid, name and user but an empty cmdline. Bounds a record (a socket shared by thousands
/// of workers) far below the message limit.
pub const CMDLINE_BUDGET: usize = 64 * 1024;
/// Bytes of one owner's user name.
pub const USER: usize = 255;
/// Bytes of a systemd unit name.
pub const UNIT: usize = 255;
/// Bytes of a cgroup path.
pub const CGROUP: usize = 4096;
/// Bytes of a container runtime name.
pub const RUNTIME: usize = 32;
/// Bytes of a container id.
pub const CONTAINER_ID: usize = 255;
/// Bytes of a Kubernetes pod UID.
pub const POD_UID: usize = 64;
/// Bytes of a firewall verdict's reason (the deciding rule, the policy, or why the verdict
/// is unknown). Rule texts are short; 1 KiB holds a few of them joined.
pub const EFFECTIVE_REASON: usize = 1024;
/// Conditions (ways in) one `restricted` verdict carries. The agent's evaluator merges and
/// absorbs them first; past this many the agent keeps the first ones and one entry that
/// says how many more there were.
pub const EFFECTIVE_CONDITIONS: usize = 32;
/// Bytes of one condition (`iifname eth0 and saddr 198.51.100.0/24`).
pub const EFFECTIVE_CONDITION: usize = 256;
/// Bytes of `Hello.agent_version`.
pub const AGENT_VERSION: usize = 64;
/// Bytes of `Hello.os_hostname`.
pub const OS_HOSTNAME: usize = 255;
/// Bytes of `Watch.reason` (why the agent does not use the doorbell: an error text such
/// as "perf_event_open refused: needs CAP_PERFMON"). A few sentences fit.
pub const WATCH_REASON: usize = 512;
/// The longest period of a watch mode (`Watch.interval_ms`): a century, the longest
/// duration any configuration accepts (`config::MAX_DURATION`), so every interval an agent
/// may be configured with is reported as it is. Longer is garbage and refused.
pub const WATCH_INTERVAL_MAX_MS: u64 = 100 * 365 * 86_400 * 1000;
/// How far ahead of the collector's clock an observation may claim to be, in seconds.
pub const CLOCK_SKEW_SECS: i64 = 600;

#[cfg(test)]
mod tests {
    #[test]
    fn the_watch_period_bound_is_the_longest_duration() {
        assert_eq!(
            u128::from(super::WATCH_INTERVAL_MAX_MS),
            crate::config::MAX_DURATION.as_millis()
        );
    }
}
