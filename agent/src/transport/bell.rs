//! The doorbell's thread: waits on the kernel's rings (`os::doorbell`), places each
//! event's process in its network namespace at once (the process may be gone a moment
//! later), and hands the events to the scanner loop (`scanner.rs`) in batches.
//!
//! One plain thread, not a tokio task: it blocks in poll(2) with no timeout, so an idle
//! host costs nothing. The channel is bounded: when the scanner lags, this thread waits,
//! events wait in the kernel's rings, and a ring that overflows reports lost events,
//! which cost one whole scan.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::live::Event;
use crate::os::System;
use crate::os::doorbell::{self, Doorbell};
use crate::os::procfs;
use crate::os::udp_gone::Gone;

/// Stack of the two threads: they hold a few small buffers, nothing deep.
const STACK: usize = 128 * 1024;

/// Opens the doorbell (on a blocking thread: it may mount tracefs) and starts its thread,
/// and the thread that hands on the namespaces' destroyed-UDP notices (`os::udp_gone`).
/// The error, when the doorbell cannot open, is the reason polling is used instead.
pub(crate) async fn spawn(
    sys: Arc<dyn System + Send + Sync>,
    bind_events: bool,
    tx: mpsc::Sender<Vec<Event>>,
) -> Result<(), String> {
    let options = doorbell::Options {
        bind_events,
        ..doorbell::Options::default()
    };
    let opened = tokio::task::spawn_blocking(move || Doorbell::open(&options))
        .await
        .map_err(|e| format!("opening the doorbell failed: {e}"))?;
    let bell = opened.map_err(|e| e.to_string())?;
    sys.want_udp_gone();
    let udp_tx = tx.clone();
    std::thread::Builder::new()
        .name("doorbell".into())
        .stack_size(STACK)
        .spawn(move || ring(bell, tx))
        .map_err(|e| format!("cannot start the doorbell thread: {e}"))?;
    if let Err(e) = std::thread::Builder::new()
        .name("udp-gone".into())
        .stack_size(STACK)
        .spawn(move || udp_gone(&*sys, udp_tx))
    {
        tracing::warn!(error = %e, "Cannot start the UDP close thread: UDP closes are seen at the next whole scan.");
    }
    Ok(())
}

/// Hands on destroyed-UDP notices until the scanner loop goes away.
fn udp_gone(sys: &dyn System, tx: mpsc::Sender<Vec<Event>>) {
    let mut gone = Vec::new();
    loop {
        gone.clear();
        match sys.udp_gone(None, &mut gone) {
            Ok(true) => {}
            Ok(false) => return, // this system keeps no subscriptions
            Err(e) => {
                tracing::warn!(error = %e, "Waiting for UDP close notices failed: UDP closes are seen at the next whole scan.");
                return;
            }
        }
        if gone.is_empty() {
            continue;
        }
        let batch = gone
            .iter()
            .map(|g| match *g {
                Gone::Port { netns, port } => Event::UdpGone {
                    netns,
                    port: Some(port),
                },
                Gone::Lost { netns } => Event::UdpGone { netns, port: None },
            })
            .collect();
        if tx.blocking_send(batch).is_err() {
            return;
        }
    }
}

/// Until the scanner loop goes away (the channel closes) or waiting fails (logged; the
/// loop then polls).
fn ring(mut bell: Doorbell, tx: mpsc::Sender<Vec<Event>>) {
    let mut raw = Vec::new();
    loop {
        if let Err(e) = bell.wait(None) {
            tracing::error!(error = %e, "Waiting on the doorbell failed; falling back to polling.");
            return;
        }
        raw.clear();
        let drained = bell.drain(&mut raw);
        let mut batch: Vec<Event> = raw.iter().map(place).collect();
        if drained.lost > 0 {
            tracing::debug!(
                lost = drained.lost,
                "Doorbell events lost; a whole scan follows."
            );
            batch.push(Event::Lost);
        }
        if batch.is_empty() {
            continue;
        }
        tracing::debug!(events = ?batch, "Doorbell rang.");
        if tx.blocking_send(batch).is_err() {
            return; // the agent is stopping
        }
    }
}

/// An event with the namespace of the thread that caused it. A thread that is already
/// gone is not placed (`None`): guessing its process's namespace would be wrong for the
/// thread-per-namespace pattern (a thread enters a namespace, listens, exits), and
/// `live::plan` knows what to do without a place.
fn place(e: &doorbell::Event) -> Event {
    let netns = |_pid: u32, tid: u32| procfs::netns_of(tid);
    match *e {
        doorbell::Event::Listen {
            pid,
            tid,
            family,
            port,
        } => Event::Listen {
            pid,
            netns: netns(pid, tid),
            family,
            port,
        },
        doorbell::Event::ListenClose {
            pid,
            tid,
            family,
            port,
        } => Event::Close {
            pid,
            netns: netns(pid, tid),
            family,
            port,
        },
        doorbell::Event::Bind { pid, tid } => Event::Bind {
            pid,
            netns: netns(pid, tid),
        },
    }
}
