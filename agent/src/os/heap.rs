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
//! - [`release_free_memory`]: `malloc_trim(0)` after a scan is recorded, which gives every
//!   whole free page back, from every arena (the collector does the same after bursts,
//!   `collector/src/heap.rs`). Without it the heap keeps the transient peak of a scan
//!   (two inventories and the diff at once) for the rest of the process's life.
//!
//! Both are no-ops where the C library is not glibc (musl has no arenas to tune).

/// One malloc arena for the whole process. Call before any thread is started.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` takes two integers and changes glibc's own tunables under its
        // lock; M_ARENA_MAX is a documented parameter and 1 a valid value.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Returns free heap pages to the operating system; `true` if any were released.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` takes no pointers; it walks glibc's own arenas under their
        // locks and only releases pages no allocation uses.
        unsafe { libc::malloc_trim(0) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
