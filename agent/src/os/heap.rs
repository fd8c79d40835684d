//! The C library's allocator, tuned for a long-running agent.
//!
//! `run` scans every interval on short-lived threads (the tokio blocking pool, the owner
//! walk's threads, one thread per foreign namespace). glibc gives each new thread an arena
//! of its own, up to 8 per core, and an arena keeps the pages of everything freed in it:
//! the inventory of one scan, built on one thread, leaves its high-water mark resident in
//! that thread's arena, and the next scan, on another thread, builds its own beside it.
//! Measured at 10,000 listeners (`docs/BENCHMARKS.md`): two arenas of 42 MiB each plus
//! 13 MiB of main heap, for a live heap of about 20 MiB between scans.
//!
//! - [`limit_arenas`]: one arena for the whole process (`M_ARENA_MAX` = 1). The agent's
//!   threads allocate little at the same time (the walk is syscalls), so the lock costs
//!   nothing measurable, and every scan reuses the memory the previous one freed.
//! - Allocations of 64 KiB and more are mapped on their own (`M_MMAP_THRESHOLD`), and
//!   unmapped when freed. A scan's big vectors (the inventory's listeners, 4–5 MiB at
//!   10,000; the socket lists; the maps' tables) then never sit in the heap between
//!   small, long-lived allocations, where their pages could not be given back. Setting
//!   the threshold also stops glibc from raising it by itself after each such free
//!   (its default is dynamic: up to 32 MiB), which is what let them into the heap.
//! - [`release_free_memory`]: `malloc_trim(0)` after a scan is recorded, which gives every
//!   whole free page back, from every arena (the collector does the same after bursts,
//!   `collector/src/heap.rs`). Without it the heap keeps the transient peak of a scan
//!   (two inventories and the diff at once) for the rest of the process's life.
//!
//! Both are no-ops where the C library is not glibc (musl has no arenas to tune).

/// Allocations at least this big get a mapping of their own.
const MMAP_THRESHOLD: i32 = 64 * 1024;

/// One malloc arena for the whole process, and big allocations mapped on their own. Call
/// before any thread is started.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` takes two integers and changes glibc's own tunables under its
        // lock; M_ARENA_MAX and M_MMAP_THRESHOLD are documented parameters, and 1 and
        // 64 KiB valid values (the threshold's maximum is 32 MiB on 64-bit).
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Returns free heap pages to the operating system; `true` if any were released.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointers; it walks glibc's own arenas under their
        // locks and only releases pages no allocation uses. `mallinfo2` only reads them.
        let (released, info) = unsafe { (libc::malloc_trim(0) != 0, libc::mallinfo2()) };
        tracing::debug!(
            in_use = info.uordblks,
            free = info.fordblks,
            mapped = info.hblkhd,
            "Heap trimmed."
        );
        released
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
