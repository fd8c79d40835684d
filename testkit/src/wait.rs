//! Bounded polling: wait for an observable condition instead of sleeping and hoping.
//!
//! Each helper checks at once, then again after short pauses (2 ms doubling up to 100 ms)
//! until the condition holds, and panics naming what it waited for once `timeout` has
//! passed. The `_for` forms take a check that says what is still wrong (`Err`), and the
//! panic says it too. The async forms measure time with tokio's clock, so they also work
//! under `tokio::time::pause`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

const FIRST_PAUSE: Duration = Duration::from_millis(2);
const MAX_PAUSE: Duration = Duration::from_millis(100);

fn timed_out(timeout: Duration, what: &str, why: &str) -> ! {
    if why.is_empty() {
        panic!("timed out after {timeout:?} waiting for: {what}")
    }
    panic!("timed out after {timeout:?} waiting for: {what}\nstill: {why}")
}

/// Blocks until `check` holds; panics after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    wait_for(timeout, what, || {
        check().then_some(()).ok_or_else(String::new)
    });
}

/// Blocks until `check` returns `Ok`, and returns its value; panics after `timeout` with
/// the last `Err`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        let why = match check() {
            Ok(v) => return v,
            Err(why) => why,
        };
        let now = std::time::Instant::now();
        if now >= deadline {
            timed_out(timeout, what, &why);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Waits until `check` holds; panics after `timeout`.
pub async fn wait_until_async<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for_async(timeout, what, || {
        let fut = check();
        async move { fut.await.then_some(()).ok_or_else(String::new) }
    })
    .await;
}

/// Waits until `check` returns `Ok`, and returns its value; panics after `timeout` with the
/// last `Err`.
pub async fn wait_for_async<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        let why = match check().await {
            Ok(v) => return v,
            Err(why) => why,
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            timed_out(timeout, what, &why);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Waits until something accepts TCP connections at `addr` (20 s at most).
pub async fn wait_listening(addr: SocketAddr) {
    wait_until_async(
        Duration::from_secs(20),
        &format!("something listening on {addr}"),
        || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn returns_once_the_check_holds() {
        let calls = Cell::new(0);
        let v = wait_for(Duration::from_secs(5), "the third call", || {
            calls.set(calls.get() + 1);
            if calls.get() == 3 {
                Ok(calls.get())
            } else {
                Err(format!("call {}", calls.get()))
            }
        });
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "timed out after 20ms waiting for: never\nstill: not yet")]
    fn panics_naming_what_and_why() {
        wait_for::<()>(Duration::from_millis(20), "never", || Err("not yet".into()));
    }

    #[tokio::test]
    async fn async_waits_return_once_the_check_holds() {
        let calls = Cell::new(0);
        let v = wait_for_async(Duration::from_secs(5), "the third call", || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                if n == 3 {
                    Ok(n)
                } else {
                    Err(format!("call {n}"))
                }
            }
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 20ms waiting for: never")]
    async fn async_waits_give_up() {
        wait_until_async(Duration::from_millis(20), "never", || async { false }).await;
    }
}
