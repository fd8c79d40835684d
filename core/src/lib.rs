//! What the agent and the collector share: the inventory model and its rules.
//!
//! - `domain`: the vocabulary (protocol, family, reach, source, owners, containers);
//! - `record`: one listener per endpoint ([`record::ListenerRecord`]) and what of it is
//!   material history; `diff`: the changes between two states of a host;
//! - `fingerprint`: the stable, documented fingerprints the collector stores;
//! - `limits`: every bound of the protocol, once; `wire`: the protobuf edge, where every
//!   rule is enforced (`TryFrom`);
//! - `pem`: loading and checking the PEM files of mutual TLS; `config`: durations and TOML;
//!   `signal`: the shutdown signal; `exit`: the exit codes; `logging`: `--log-format` and
//!   `LISTENSCOPE_LOG`;
//! - `watch`: how the agent learns of listens and closes (`doorbell`, `polling(3s)`,
//!   `interval(10s)`), reported in Hello and Heartbeat and shown in `hosts`.
//!
//! Nothing here touches the OS beyond reading named files; the agent's Linux layer stays
//! in the agent, the store in the collector (see ARCHITECTURE.md).

pub mod config;
pub mod diff;
pub mod domain;
pub mod exit;
pub mod fingerprint;
pub mod json;
pub mod limits;
pub mod logging;
pub mod pem;
pub mod record;
pub mod signal;
pub mod watch;
pub mod wire;
