//! The headless Chromium of `listenscope_testkit::browser` against a real HTTP server on
//! 127.0.0.1 (a std `TcpListener` in this test): the DOM it returns is the parsed one, a
//! screenshot is a PNG of the window's size, a failed load and a page that never answers
//! are errors naming the cause, and after every call no process of the browser and no
//! temporary directory is left. Needs Chromium installed (`scripts/test` installs it):
//! without it the test fails with the install command.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test fails by panicking, helpers included (clippy.toml covers #[test] fns only)"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use listenscope_testkit::{Chromium, TempDir};

/// The page: static HTML (no script) the parser must repair: no `<tbody>`, unquoted
/// attributes, unclosed `<td>` and `<p>`.
const PAGE: &str = "<!doctype html><html lang=en><head><meta charset=utf-8>\
<title>listenscope browser test</title>\
<style>body{font:16px sans-serif;background:#fff;color:#111} .trap{color:#b00020;font-weight:bold}</style>\
</head><body><h1 id=headline>web-01 exposes tcp/8080 over IPv4</h1>\
<table id=ports><tr><td class=trap>:::8080<td>apache2</table><p>shown as IPv6 only";

/// A tiny HTTP/1.1 server on 127.0.0.1:0: `/` is [`PAGE`], `/stall` accepts and never
/// answers, anything else is a 404. Each connection on its own thread; stopped on drop.
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let accept = std::thread::spawn(move || {
            // Bounded: 256 connections at most.
            for conn in listener.incoming().take(256) {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(c) = conn {
                    let flag = flag.clone();
                    std::thread::spawn(move || serve(c, &flag));
                }
            }
        });
        Server {
            addr,
            stop,
            accept: Some(accept),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// One connection: requests until the client closes, each answered from its path.
fn serve(mut c: TcpStream, stop: &AtomicBool) {
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Bounded: a connection lives at most 60 s here.
    for _ in 0..300 {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match c.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return,
        }
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let (status, body) = match path.as_str() {
                "/" => ("200 OK", PAGE),
                // Never answered: the connection stays open until the server stops.
                "/stall" => continue,
                _ => (
                    "404 Not Found",
                    "<!doctype html><title>404</title><p>not here",
                ),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nCache-Control: no-store\r\n\r\n{body}",
                body.len()
            );
            if c.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// One browser test at a time: each checks that nothing of this process's browsers is
/// left, which a concurrent one would contradict.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn chromium() -> Chromium {
    Chromium::find().unwrap_or_else(|e| panic!("{e}"))
}

/// No browser process of this test process runs, and no temporary directory of one is
/// left (their names carry this process's pid).
fn nothing_left() {
    let marker = format!("lst-chromium-{}-", std::process::id());
    let procs: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&marker))
        .collect();
    assert!(procs.is_empty(), "browser processes left: {procs:#?}");
    let dirs: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&marker))
        .collect();
    assert!(dirs.is_empty(), "temporary directories left: {dirs:?}");
}

#[test]
fn dump_dom_is_the_parsed_page() {
    let _one = serial();
    let server = Server::start();
    let b = chromium();
    assert!(b.version().starts_with("Chromium"), "{}", b.version());
    let dom = b.dump_dom(&server.url("/"));
    // The element and its text, as the page sent them.
    assert!(
        dom.contains(r#"<h1 id="headline">web-01 exposes tcp/8080 over IPv4</h1>"#),
        "{dom}"
    );
    // The parser's work, not the bytes sent: <tbody> added, attributes quoted, the cells
    // and the paragraph closed.
    assert!(
        dom.contains(
            r#"<table id="ports"><tbody><tr><td class="trap">:::8080</td><td>apache2</td></tr></tbody></table>"#
        ),
        "{dom}"
    );
    assert!(
        dom.contains("<p>shown as IPv6 only\n</p></body></html>")
            || dom.contains("<p>shown as IPv6 only</p></body></html>"),
        "{dom}"
    );
    assert!(dom.starts_with("<!DOCTYPE html>"), "{dom}");
    // A 404 is a page like any other (Chromium does not report the status).
    let missing = b.dump_dom(&server.url("/missing"));
    assert!(missing.contains("<p>not here</p>"), "{missing}");
    nothing_left();
}

#[test]
fn screenshot_is_a_png_of_the_window() {
    let _one = serial();
    let server = Server::start();
    let dir = TempDir::new("shot");
    let path = dir.join("page.png");
    std::fs::write(&path, b"stale").unwrap();
    chromium().screenshot(&server.url("/"), &path, 640, 360);
    let png = std::fs::read(&path).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (640, 360), "the window's size");
    // A white page with text and the red trap marker is more than a blank image, which
    // compresses to a few hundred bytes at this size.
    assert!(png.len() > 2_000, "{} bytes", png.len());
    nothing_left();
}

#[test]
fn failures_are_errors_and_leave_nothing() {
    let _one = serial();
    let b = chromium();

    // Nothing listens there: Chromium exits 0 and prints nothing; this is an error.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let e = b
        .try_dump_dom(&format!("http://127.0.0.1:{port}/"))
        .unwrap_err();
    assert!(e.contains("ERR_CONNECTION_REFUSED"), "{e}");
    nothing_left();

    // Off loopback: refused before anything starts.
    let e = b.try_dump_dom("http://example.com/").unwrap_err();
    assert!(e.contains("loopback"), "{e}");
    let dir = TempDir::new("shot");
    let e = b
        .try_screenshot("http://192.0.2.1/", &dir.join("x.png"), 100, 100)
        .unwrap_err();
    assert!(e.contains("loopback"), "{e}");
    assert!(!dir.join("x.png").exists());

    // A page that never answers: killed at the timeout, with every helper process.
    let server = Server::start();
    let started = std::time::Instant::now();
    let e = b
        .clone()
        .timeout(Duration::from_secs(3))
        .try_dump_dom(&server.url("/stall"))
        .unwrap_err();
    assert!(e.contains("did not finish within 3s"), "{e}");
    // Bounded: the timeout, the group's end, the readers.
    assert!(started.elapsed() < Duration::from_secs(30));
    nothing_left();
}
