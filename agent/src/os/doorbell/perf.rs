//! `perf_event_open` on tracepoints: one ring per online CPU, shared by both tracepoints of
//! that CPU, read without copying more than what the kernel published.
//!
//! Hand-written against the UAPI (`include/uapi/linux/perf_event.h`) rather than with a
//! crate such as `perf-event-open-sys`: the doorbell needs one syscall, four ioctls and
//! five fields of the mmap page, and the `libc` crate is already here.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ring::{Decoder, parse_ring};
use super::{DoorbellError, Drained, Event};

/// `struct perf_event_attr` up to `config1`: `PERF_ATTR_SIZE_VER0`, which every kernel
/// with perf accepts (newer fields read as zero).
#[repr(C)]
#[derive(Debug, Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// Bit field: `disabled` is bit 0, `inherit` bit 1, `watermark` bit 14.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}
const PERF_ATTR_SIZE_VER0: u32 = 64;
const _: () = assert!(size_of::<PerfEventAttr>() == PERF_ATTR_SIZE_VER0 as usize);

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_SAMPLE_TID: u64 = 1 << 1;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const ATTR_DISABLED: u64 = 1 << 0;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const IOC_ENABLE: libc::Ioctl = libc::_IO(b'$' as u32, 0);
const IOC_SET_OUTPUT: libc::Ioctl = libc::_IO(b'$' as u32, 5);
const IOC_SET_FILTER: libc::Ioctl = libc::_IOW::<*const libc::c_char>(b'$' as u32, 6);
/// Offsets in `struct perf_event_mmap_page` (fixed by its 1 KiB-padded layout).
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;
const DATA_OFFSET: usize = 1040;
const DATA_SIZE: usize = 1048;

/// Data pages per CPU ring (a power of two, as the kernel requires). 8 pages (32 KiB with
/// 4 KiB pages) hold about 340 listen/close samples (96 bytes each) or 680 bind samples
/// (48 bytes) between two drains. Past that the kernel drops samples and says how many
/// (`Drained::lost`), and the caller rescans everything; a bigger ring would only delay
/// that point, and every CPU pays for it in locked memory (`perf_event_mlock_kb`, 516 KiB
/// per CPU by default, shared by every perf user of the same uid).
pub const RING_DATA_PAGES: usize = 8;

/// One tracepoint to open on every CPU: its id and the filter the kernel must accept.
#[derive(Debug, Clone, Copy)]
pub struct Tracepoint<'a> {
    pub name: &'static str,
    pub id: u16,
    pub filter: &'a str,
}

/// The two events of one CPU and their shared ring.
#[derive(Debug)]
pub struct CpuRing {
    cpu: u32,
    /// The event whose ring it is (`sock:inet_sock_set_state`): the one polled.
    owner: OwnedFd,
    /// `syscalls:sys_exit_bind` when asked for, writing into `owner`'s ring
    /// (PERF_EVENT_IOC_SET_OUTPUT): one ring and one fd to poll per CPU, not two.
    redirected: Option<OwnedFd>,
    base: NonNull<u8>,
    map_len: usize,
    data_offset: usize,
    data_size: usize,
}

// SAFETY: the mapping belongs to this value alone (created in `open`, unmapped in `drop`),
// and it is only read or written through `&mut self` (`drain`); moving the value to
// another thread moves that exclusive access with it. The kernel's concurrent writes are
// synchronised through `data_head`/`data_tail` with atomics, on any thread.
unsafe impl Send for CpuRing {}

/// `perf_event_open(attr, pid = -1, cpu, group = -1, FD_CLOEXEC)`: every task on `cpu`.
fn open_event(tp: &Tracepoint<'_>, cpu: u32) -> io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: PERF_ATTR_SIZE_VER0,
        config: u64::from(tp.id),
        // Every event is a sample, and every sample wakes the poller: these events are
        // rare (the filter), so latency wins over batching.
        sample_period: 1,
        sample_type: PERF_SAMPLE_TID | PERF_SAMPLE_RAW,
        // Enabled only once the filter is set: never a moment unfiltered. `inherit` off.
        flags: ATTR_DISABLED,
        wakeup_events: 1,
        ..PerfEventAttr::default()
    };
    // SAFETY: `attr` is a valid perf_event_attr of the size it declares and outlives the
    // call, which copies it; the other arguments are plain integers.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            -1 as libc::pid_t,
            cpu as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn ioctl(fd: RawFd, request: libc::Ioctl, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: perf ioctls on a perf fd we own; `arg` is an integer or, for SET_FILTER, a
    // pointer to a NUL-terminated string that the caller keeps alive for the call.
    if unsafe { libc::ioctl(fd, request, arg) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn open_error(tp: &Tracepoint<'_>, cpu: u32, e: io::Error) -> DoorbellError {
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => DoorbellError::NoPermission { cause: e },
        Some(libc::ENOSYS | libc::ENOENT | libc::EOPNOTSUPP) => {
            DoorbellError::Unsupported { cause: e }
        }
        _ => DoorbellError::Perf {
            what: format!("perf_event_open {} on CPU {cpu}", tp.name),
            cause: e,
        },
    }
}

/// One filtered event of `tp` on `cpu`; `Ok(None)` when the CPU went offline meanwhile.
fn filtered_event(tp: &Tracepoint<'_>, cpu: u32) -> Result<Option<OwnedFd>, DoorbellError> {
    let fd = match open_event(tp, cpu) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(None),
        Err(e) => return Err(open_error(tp, cpu, e)),
    };
    let filter = std::ffi::CString::new(tp.filter).map_err(|_| DoorbellError::FilterRefused {
        tracepoint: tp.name,
        filter: tp.filter.to_string(),
        cause: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    ioctl(
        fd.as_raw_fd(),
        IOC_SET_FILTER,
        filter.as_ptr() as libc::c_ulong,
    )
    .map_err(|cause| DoorbellError::FilterRefused {
        tracepoint: tp.name,
        filter: tp.filter.to_string(),
        cause,
    })?;
    Ok(Some(fd))
}

impl CpuRing {
    /// The tracepoints on `cpu`, filtered, sharing one mapped ring, enabled.
    /// `Ok(None)`: the CPU is offline.
    pub fn open(
        cpu: u32,
        owner: &Tracepoint<'_>,
        redirected: Option<&Tracepoint<'_>>,
    ) -> Result<Option<CpuRing>, DoorbellError> {
        let Some(owner_fd) = filtered_event(owner, cpu)? else {
            return Ok(None);
        };
        let redirected_fd = match redirected {
            None => None,
            Some(tp) => match filtered_event(tp, cpu)? {
                Some(fd) => Some(fd),
                None => return Ok(None),
            },
        };
        let page = page_size();
        let map_len = (1 + RING_DATA_PAGES) * page;
        // SAFETY: a new shared mapping of the perf fd (the kernel picks the address); the
        // length is 1 + 2^n pages as perf requires. PROT_WRITE lets us publish data_tail,
        // which puts the ring in the mode where the kernel never overwrites unread data.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                owner_fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(DoorbellError::RingMap {
                cause: io::Error::last_os_error(),
            });
        }
        let Some(base) = NonNull::new(base.cast::<u8>()) else {
            return Err(DoorbellError::RingMap {
                cause: io::Error::other("mmap returned null"),
            });
        };
        let mut ring = CpuRing {
            cpu,
            owner: owner_fd,
            redirected: redirected_fd,
            base,
            map_len,
            data_offset: page,
            data_size: RING_DATA_PAGES * page,
        };
        // The kernel says where the data area is (Linux 4.1+; zero before: right after
        // the first page, as assumed above).
        let (offset, size) = (ring.page_u64(DATA_OFFSET), ring.page_u64(DATA_SIZE));
        if size != 0 {
            let fits = offset
                .checked_add(size)
                .is_some_and(|end| end <= map_len as u64);
            if !fits || offset == 0 {
                return Err(DoorbellError::RingMap {
                    cause: io::Error::other(format!(
                        "the kernel placed the ring at {offset}+{size} in a {map_len}-byte mapping"
                    )),
                });
            }
            (ring.data_offset, ring.data_size) = (offset as usize, size as usize);
        }
        let perf = |what: &str, cause| DoorbellError::Perf {
            what: format!("{what} on CPU {cpu}"),
            cause,
        };
        if let Some(fd) = &ring.redirected {
            ioctl(
                fd.as_raw_fd(),
                IOC_SET_OUTPUT,
                ring.owner.as_raw_fd() as libc::c_ulong,
            )
            .map_err(|e| perf("PERF_EVENT_IOC_SET_OUTPUT", e))?;
        }
        for fd in std::iter::once(&ring.owner).chain(&ring.redirected) {
            ioctl(fd.as_raw_fd(), IOC_ENABLE, 0).map_err(|e| perf("PERF_EVENT_IOC_ENABLE", e))?;
        }
        Ok(Some(ring))
    }

    pub fn cpu(&self) -> u32 {
        self.cpu
    }

    /// The fd to poll (both events wake it).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.owner.as_fd()
    }

    /// The control page's u64 at `offset`, as an atomic shared with the kernel.
    fn page_atomic(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: `offset` is one of the u64 fields of perf_event_mmap_page, inside the
        // first page of the mapping, 8-byte aligned (the mapping is page aligned), valid
        // for as long as `self` (unmapped only in drop). The kernel accesses these fields
        // with its own atomics (smp_store_release of data_head, READ_ONCE / acquire of
        // data_tail), so atomic accesses on this side are the matching ones.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast::<u64>()) }
    }

    fn page_u64(&self, offset: usize) -> u64 {
        self.page_atomic(offset).load(Ordering::Relaxed)
    }

    /// Decodes everything the kernel published since the last drain, then hands the space
    /// back. `scratch` is reused between calls (at most one ring's size).
    pub fn drain(
        &mut self,
        scratch: &mut Vec<u8>,
        decoder: &Decoder,
        out: &mut Vec<Event>,
        counts: &mut Drained,
    ) {
        // Acquire: the record bytes the kernel wrote before publishing `head` are visible.
        let head = self.page_atomic(DATA_HEAD).load(Ordering::Acquire);
        // Only this side writes data_tail.
        let tail = self.page_atomic(DATA_TAIL).load(Ordering::Relaxed);
        let size = self.data_size;
        scratch.resize(size, 0);
        let avail = head.wrapping_sub(tail);
        if avail <= size as u64 {
            // The published bytes go to the same positions of `scratch`: one span, or two
            // when they wrap. Copied rather than borrowed because the kernel keeps writing
            // the rest of the ring meanwhile.
            let start = (tail % size as u64) as usize;
            let first = (avail as usize).min(size - start);
            let spans = [(start, first), (0, avail as usize - first)];
            for (at, len) in spans {
                // SAFETY: `at + len <= size`, so the source lies in the data area of the
                // mapping (valid while `self` is), and the kernel does not write these
                // bytes until data_tail moves past them (below). The destination is
                // `scratch[at..at + len]`, in bounds; the two never overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.base.as_ptr().add(self.data_offset + at),
                        scratch.as_mut_ptr().add(at),
                        len,
                    );
                }
            }
        }
        parse_ring(scratch, tail, head, decoder, out, counts);
        // Release: our reads of the records happen before the kernel may reuse the space.
        self.page_atomic(DATA_TAIL).store(head, Ordering::Release);
    }
}

impl Drop for CpuRing {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `open`, with its length, unmapped once; no
        // reference into it outlives `self`. The fds close after this (field drops).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Waits until one of `fds` is readable, `timeout` passes (`None`: no limit) or a signal
/// arrives. `Ok(true)`: something to drain.
pub fn poll(fds: &[RawFd], timeout: Option<std::time::Duration>) -> io::Result<bool> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| {
        // Rounded up: a 0.5 ms timeout must not become a busy 0.
        let ms = t.as_micros().div_ceil(1000);
        libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
    });
    // SAFETY: `pollfds` is a valid array of its length, alive for the call.
    let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    // A perf fd that hangs up or errs would be reported again at once, forever: that is
    // an error for the caller (who falls back to polling), not a wake-up.
    if let Some(p) = pollfds
        .iter()
        .find(|p| p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0)
    {
        return Err(io::Error::other(format!(
            "perf event fd {} reported {:#x} (hung up)",
            p.fd, p.revents
        )));
    }
    Ok(pollfds.iter().any(|p| p.revents & libc::POLLIN != 0))
}
