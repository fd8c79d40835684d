//! listenscope agent library: enumerate every listening socket in every network namespace
//! from the kernel's own answer (sock_diag), classify what each one really accepts over
//! IPv4 and IPv6, attribute it to processes, containers and units, and render the result.
//!
//! Layers (see ARCHITECTURE.md): `os` is the only code that touches Linux; `classify` and
//! `attribution` are pure; `scan` assembles an [`scan::Inventory`] through the
//! [`os::System`] seam; `output` and `cli` are the human and machine faces. For the fleet:
//! `record` groups sockets into endpoint records (the record, its diff, the protobuf edge
//! and certificate loading are shared with the collector in `listenscope_core`), and
//! `transport` streams to the collector.

mod attribution;
mod classify;
pub mod cli;
pub mod config;
mod fasthash;
pub mod firewall;
pub mod live;
pub mod model;
pub mod os;
mod output;
pub mod record;
pub mod scan;
pub mod transport;
