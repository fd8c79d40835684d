//! A TCP relay that cuts what the client sends into random pieces: each connection's
//! bytes (TLS records, HTTP/2 frames, gRPC messages) reach the collector in writes of 1
//! byte to a few KiB, each its own TCP segment (no Nagle), so the collector's TLS and
//! HTTP/2 layers reassemble them from any split. The pieces come from a seed the test sets
//! per case ([`Chunker::set_seed`]), so a failing case replays the same cuts. Replies pass
//! through unchanged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The relay; stops when dropped.
pub struct Chunker {
    pub addr: SocketAddr,
    seed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Chunker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// xorshift64*: enough randomness for cutting bytes, and reproducible from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

impl Chunker {
    /// Relays 127.0.0.1:(new port) to `target`.
    pub async fn start(target: SocketAddr) -> Chunker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seed = Arc::new(AtomicU64::new(1));
        let seeds = Arc::clone(&seed);
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                n += 1;
                // Each connection of a case gets its own cuts, from the case's seed.
                let s = seeds.load(Ordering::Relaxed) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                tokio::spawn(relay(client, target, Rng(s | 1)));
            }
        });
        Chunker { addr, seed, task }
    }

    /// The seed for the connections accepted from now on.
    pub fn set_seed(&self, seed: u64) {
        self.seed.store(seed, Ordering::Relaxed);
    }
}

async fn relay(client: TcpStream, target: SocketAddr, mut rng: Rng) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    // Largest piece for this connection: byte by byte, a few bytes, about a packet, or
    // more than a TLS record.
    let max = [1u64, 7, 100, 1500, 20_000][rng.below(5) as usize];
    let up = async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut relayed = 0usize;
        loop {
            // Past the first 64 KiB (the handshake and the first messages), pieces of at
            // least 256 bytes: a 4 MiB message byte by byte would take minutes.
            let max = if relayed > 64 * 1024 {
                max.max(256)
            } else {
                max
            };
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut at = 0;
            while at < n {
                let piece = (1 + rng.below(max) as usize).min(n - at);
                if to_server.write_all(&buf[at..at + piece]).await.is_err() {
                    return;
                }
                at += piece;
                relayed += piece;
                if rng.below(8) == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        let _ = to_server.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    };
    tokio::join!(up, down);
}
