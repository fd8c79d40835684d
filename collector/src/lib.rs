//! listenscope collector library: the gRPC ingest server (mutual TLS, host identity from
//! the client certificate), the store (SQLite embedded; PostgreSQL), the read-only query
//! and report layer, the fleet CA, and the quickstart.
//!
//! Map (see ARCHITECTURE.md): `server` + `tls` accept sessions, `ingest` runs each
//! session's protocol state machine, `store` commits (one transaction per message, plan
//! computed once in `store::plan`), `query` answers SREs, `pki` makes certificates,
//! `cli` and `quickstart` are the faces.

pub mod admission;
pub mod budget;
pub mod cli;
mod config;
mod fdlimit;
mod heap;
pub mod history;
pub mod ingest;
mod metrics;
pub mod pki;
pub mod query;
#[cfg(feature = "quickstart")]
mod quickstart;
pub mod retention;
pub mod revocation;
pub mod server;
pub mod store;
pub mod timefmt;
pub mod tls;
pub mod ui;
