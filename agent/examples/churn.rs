//! Loopback connection churn for `scripts/bench-realtime`: a listener and client threads
//! that connect, get accepted and close as fast as they can, so the agent's CPU can be
//! measured while the kernel's TCP state tracepoint fires for every connection.
//!
//! Usage: `churn SECONDS [CLIENT_THREADS] [RATE]` (run it inside the namespace to churn,
//! e.g. with `ip netns exec`; RATE in connections per second over all clients, 0 or
//! absent: as fast as they can). Prints `connections=N seconds=S rate=R` at the end.
//! Connections are closed by the client first with SO_LINGER 0 (an RST), so no TIME_WAIT
//! pile-up exhausts the ephemeral ports on a long run.

#![allow(
    clippy::expect_used,
    reason = "a benchmark tool: a broken socket ends it with the reason"
)]
#![allow(clippy::print_stdout)] // its result line is its output

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seconds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let clients: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    let rate: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let port = 0;
    let listener = match listen(port) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            eprintln!("churn: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(2);
        }
    };
    let addr = listener.local_addr().expect("bound address");
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    // As many acceptors as clients: a full accept queue drops SYNs, and a dropped SYN
    // costs its client a whole second.
    for _ in 0..clients {
        let listener = Arc::clone(&listener);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                drop(conn); // accepted, then closed at once
            }
        });
    }
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let stop = Arc::clone(&stop);
            let count = Arc::clone(&count);
            let per_client = rate / clients.max(1) as u64;
            std::thread::spawn(move || client(addr, per_client, &stop, &count))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let took = started.elapsed().as_secs_f64();
    let n = count.load(Ordering::Relaxed);
    println!(
        "connections={n} seconds={took:.1} rate={:.0}",
        n as f64 / took
    );
}

/// A listener with a deep accept queue (the kernel caps it at somaxconn).
fn listen(port: u16) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    s.listen(4096)?;
    Ok(s.into())
}

fn client(addr: SocketAddr, rate: u64, stop: &AtomicBool, count: &AtomicU64) {
    let started = Instant::now();
    let mut done: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        // Paced: never ahead of `rate` per second since the start.
        if rate > 0 {
            let due = Duration::from_secs_f64(done as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if let Ok(s) = TcpStream::connect(addr) {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
            count.fetch_add(1, Ordering::Relaxed);
        }
        done += 1;
    }
}
