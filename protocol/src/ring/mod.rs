//! The shared-memory command ring (docs/protocol.md section 7.11): a
//! region's data commands travel through a memfd both sides map, instead
//! of a socket, so an access costs no system call while the other side is
//! awake.
//!
//! The ring carries the very same 32-byte ioregionfd [`Cmd`](crate::Cmd)s
//! as the data socket. The frontend produces, the backend consumes; one
//! response slot holds the answer to the one synchronous access a region
//! has outstanding at a time. Each side sleeps on an eventfd only after a
//! spin that found nothing, and says so in a flag first; the other side
//! signals the eventfd only when that flag is set (virtio's event
//! suppression, done with a Dekker-style handshake).
//!
//! Layout (all fields little-endian, offsets in bytes):
//!
//! | offset | size | field | written by |
//! |---|---|---|---|
//! | 0 | 4 | magic `0x4752424f` ("OBRG") | frontend, at setup |
//! | 4 | 4 | version, 1 | frontend, at setup |
//! | 8 | 4 | entries (a power of two, 8..=4096) | frontend, at setup |
//! | 64 | 4 | `tail`: commands published (free-running) | frontend |
//! | 68 | 4 | `fe_waiting`: 1 = the frontend sleeps on `notify` | both |
//! | 128 | 4 | `head`: commands consumed (free-running) | backend |
//! | 132 | 4 | `be_sleeping`: 1 = the backend sleeps on `kick` | both |
//! | 136 | 4 | `resp_seq`: position + 1 of the command answered last | backend |
//! | 144 | 8 | `resp_data`: that answer's data | backend |
//! | 256 | 32 × entries | commands; position `p` is at entry `p mod entries` | frontend |
//!
//! # Memory ordering
//!
//! Entries and the response are plain memory published by a `Release`
//! store of `tail` (resp. `resp_seq`) and read after an `Acquire` load of
//! it. Going to sleep is the classic store-buffer race: the sleeper stores
//! its flag and then loads the other side's index, the waker stores the
//! index and then loads (and clears) the flag. Both pairs are `SeqCst`, so
//! the four operations fall into one total order: either the sleeper's
//! load sees the new index (it does not sleep), or the waker's swap sees
//! the flag (it signals the eventfd). A wake-up is never lost, and the
//! waker clears the flag it acts on (a swap, after a plain load that
//! keeps the line shared while the other side is awake), so one sleep
//! costs at most one `write` to the eventfd however many commands follow.
//!
//! # Hostile peers
//!
//! Everything in the area can be written by the other side at any time.
//! A consumer therefore keeps its own copy of its index and of `entries`,
//! never trusts the shared one, checks `tail - head <= entries` on every
//! load, and copies each entry out once before decoding it. A response
//! sequence other than the previous one or the expected one is a lie.
//!
//! How long each side polls before it sleeps is its own choice;
//! [`SpinBudget`] is the reference sides' adaptive budget.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use thiserror::Error;

use crate::ioregionfd::CMD_SIZE;

mod spin;
pub use spin::SpinBudget;

/// Magic value of a ring's first field ("OBRG" in memory).
pub const MAGIC: u32 = 0x4752_424f;
/// Layout version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Fewest entries a ring may have.
pub const MIN_ENTRIES: u32 = 8;
/// Most entries a ring may have.
pub const MAX_ENTRIES: u32 = 4096;
/// Entries a frontend uses unless told otherwise.
pub const DEFAULT_ENTRIES: u32 = 256;
/// Bytes before the first entry.
pub const HEADER_SIZE: usize = 256;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_ENTRIES: usize = 8;
const OFF_TAIL: usize = 64;
const OFF_FE_WAITING: usize = 68;
const OFF_HEAD: usize = 128;
const OFF_BE_SLEEPING: usize = 132;
const OFF_RESP_SEQ: usize = 136;
const OFF_RESP_DATA: usize = 144;

/// Errors setting up or using a ring.
#[derive(Debug, Error)]
pub enum Error {
    /// entries {0} is not a power of two in 8..=4096
    #[error("ring entries {0} is not a power of two in {MIN_ENTRIES}..={MAX_ENTRIES}")]
    Entries(u32),
    /// cannot create the ring's memfd
    #[error("cannot create the ring's memfd")]
    Create(#[source] io::Error),
    /// the ring's fd is not sealed against shrinking
    #[error("the ring's fd is not sealed against shrinking")]
    NotSealed,
    /// the ring's fd is smaller than the ring
    #[error("the ring's fd holds {got} bytes where {need} are needed")]
    Short {
        /// Bytes the ring needs.
        need: u64,
        /// Bytes the fd holds.
        got: u64,
    },
    /// cannot inspect or map the ring's fd
    #[error("cannot inspect or map the ring's fd")]
    Map(#[source] io::Error),
    /// the ring's header does not match
    #[error(
        "the ring's header does not match (magic {magic:#x}, version {version}, entries {entries})"
    )]
    Header {
        /// Magic found.
        magic: u32,
        /// Version found.
        version: u32,
        /// Entries found.
        entries: u32,
    },
    /// the peer moved an index out of range
    #[error(
        "corrupt ring: {what} {got} with {base} consumed of {tail} published and {entries} entries"
    )]
    Corrupt {
        /// Which index.
        what: &'static str,
        /// The value read.
        got: u32,
        /// The reader's own consumed count.
        base: u32,
        /// Published commands (as far as the reader knows).
        tail: u32,
        /// Ring entries.
        entries: u32,
    },
}

/// True when `entries` is a valid ring size.
pub fn valid_entries(entries: u32) -> bool {
    entries.is_power_of_two() && (MIN_ENTRIES..=MAX_ENTRIES).contains(&entries)
}

/// Bytes a ring of `entries` entries occupies.
pub fn area_size(entries: u32) -> Result<usize, Error> {
    if !valid_entries(entries) {
        return Err(Error::Entries(entries));
    }
    Ok(HEADER_SIZE + entries as usize * CMD_SIZE)
}

/// A shared, writable mapping of a ring's fd.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access to it goes
// through atomics or volatile copies, so it may move between and be used
// from threads like any `&[AtomicU8]`.
unsafe impl Send for Mapping {}
// SAFETY: as above: no access through `&Mapping` creates a Rust reference
// to non-atomic shared data.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(fd: &OwnedFd, len: usize) -> Result<Self, Error> {
        // SAFETY: a fresh shared mapping of `len` bytes of an open fd; the
        // kernel picks the address, so no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Map(io::Error::last_os_error()));
        }
        NonNull::new(ptr.cast())
            .map(|ptr| Mapping { ptr, len })
            .ok_or_else(|| Error::Map(io::Error::other("mmap returned null")))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `new` made; nothing refers to it once
        // its owner is dropped (accessors borrow the owner).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A mapped command ring: the frontend's side ([`Ring::create`]) or the
/// backend's ([`Ring::open`]). The accessors are the ring's protocol; each
/// side keeps its own index and calls only its own half.
#[derive(Debug)]
pub struct Ring {
    map: Mapping,
    entries: u32,
}

impl Ring {
    /// Frontend: a new ring of `entries` entries in a fresh memfd, sealed
    /// against shrinking, growing and further sealing, its header written.
    /// Returns the ring and the fd to pass in SET_CMD_RING.
    pub fn create(entries: u32) -> Result<(Ring, OwnedFd), Error> {
        let size = area_size(entries)?;
        // SAFETY: a valid NUL-terminated name; the fd is owned just below.
        let raw = unsafe {
            libc::memfd_create(
                c"outboard-ring".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(Error::Create(io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate and F_ADD_SEALS on an fd we own.
        let ok = unsafe {
            libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) == 0
                && libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
                ) == 0
        };
        if !ok {
            return Err(Error::Create(io::Error::last_os_error()));
        }
        let ring = Ring {
            map: Mapping::new(&fd, size)?,
            entries,
        };
        ring.u32_at(OFF_MAGIC).store(MAGIC, Ordering::Relaxed);
        ring.u32_at(OFF_VERSION).store(VERSION, Ordering::Relaxed);
        ring.u32_at(OFF_ENTRIES).store(entries, Ordering::Relaxed);
        Ok((ring, fd))
    }

    /// Backend: maps a ring the frontend made, after checking that `fd`
    /// cannot shrink under the mapping (a memfd with F_SEAL_SHRINK), is
    /// large enough, and carries a header for `entries` entries.
    pub fn open(fd: &OwnedFd, entries: u32) -> Result<Ring, Error> {
        let size = area_size(entries)?;
        // SAFETY: F_GET_SEALS only queries an open fd.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(Error::NotSealed);
        }
        // SAFETY: a zeroed stat is a valid out-buffer for fstat.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, which outlives the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(Error::Map(io::Error::last_os_error()));
        }
        let got = u64::try_from(st.st_size).unwrap_or(0);
        if got < size as u64 {
            return Err(Error::Short {
                need: size as u64,
                got,
            });
        }
        let ring = Ring {
            map: Mapping::new(fd, size)?,
            entries,
        };
        let (magic, version, found) = (
            ring.u32_at(OFF_MAGIC).load(Ordering::Relaxed),
            ring.u32_at(OFF_VERSION).load(Ordering::Relaxed),
            ring.u32_at(OFF_ENTRIES).load(Ordering::Relaxed),
        );
        if magic != MAGIC || version != VERSION || found != entries {
            return Err(Error::Header {
                magic,
                version,
                entries: found,
            });
        }
        Ok(ring)
    }

    /// Entries in the ring (this side's own copy, never re-read).
    pub fn entries(&self) -> u32 {
        self.entries
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= HEADER_SIZE);
        // SAFETY: `off` is one of the header's constants: 4-aligned and
        // inside the first 256 bytes of a page-aligned mapping that lives
        // as long as `&self`. AtomicU32 has u32's size and alignment, and
        // shared memory changed by another process is what atomics are for.
        unsafe { &*self.map.ptr.as_ptr().add(off).cast::<AtomicU32>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= HEADER_SIZE);
        // SAFETY: as in `u32_at`, with an 8-aligned offset.
        unsafe { &*self.map.ptr.as_ptr().add(off).cast::<AtomicU64>() }
    }

    fn entry_ptr(&self, pos: u32) -> *mut [u8; CMD_SIZE] {
        let i = (pos & (self.entries - 1)) as usize;
        // SAFETY: `i < entries`, and the mapping holds HEADER_SIZE +
        // entries * CMD_SIZE bytes (checked at create/open).
        unsafe { self.map.ptr.as_ptr().add(HEADER_SIZE + i * CMD_SIZE).cast() }
    }

    // ---- frontend (producer) half ----

    /// Frontend: writes command bytes at position `pos` (not yet published).
    pub fn put(&self, pos: u32, cmd: &[u8; CMD_SIZE]) {
        // SAFETY: `entry_ptr` is in bounds; a volatile write, because the
        // peer may read (or scribble on) the same bytes concurrently.
        unsafe { std::ptr::write_volatile(self.entry_ptr(pos), *cmd) };
    }

    /// Frontend: publishes every command before position `tail`, then says
    /// whether the backend was asleep (and clears its flag: the caller
    /// must then signal `kick`).
    pub fn publish(&self, tail: u32) -> bool {
        self.u32_at(OFF_TAIL).store(tail, Ordering::SeqCst);
        take_flag(self.u32_at(OFF_BE_SLEEPING))
    }

    /// Frontend: commands consumed, checked against what it published:
    /// `head` may not pass `tail` nor fall behind the last value seen.
    pub fn consumed(&self, seen: u32, tail: u32) -> Result<u32, Error> {
        let head = self.u32_at(OFF_HEAD).load(Ordering::SeqCst);
        if head.wrapping_sub(seen) > tail.wrapping_sub(seen) {
            return Err(Error::Corrupt {
                what: "head",
                got: head,
                base: seen,
                tail,
                entries: self.entries,
            });
        }
        Ok(head)
    }

    /// Frontend: the answer to the command at position `pos`, if it came;
    /// `last` is the sequence of the answer before. Any other sequence is
    /// a lie.
    pub fn response(&self, pos: u32, last: u32) -> Result<Option<u64>, Error> {
        let seq = self.u32_at(OFF_RESP_SEQ).load(Ordering::SeqCst);
        if seq == pos.wrapping_add(1) {
            return Ok(Some(self.u64_at(OFF_RESP_DATA).load(Ordering::Relaxed)));
        }
        if seq == last {
            return Ok(None);
        }
        Err(Error::Corrupt {
            what: "response sequence",
            got: seq,
            base: last,
            tail: pos.wrapping_add(1),
            entries: self.entries,
        })
    }

    /// Frontend: says it is (or is no longer) asleep on `notify`. Call
    /// [`Ring::response`] or [`Ring::consumed`] again after setting it.
    pub fn set_frontend_waiting(&self, waiting: bool) {
        self.u32_at(OFF_FE_WAITING)
            .store(u32::from(waiting), Ordering::SeqCst);
    }

    // ---- backend (consumer) half ----

    /// Backend: commands published, checked against its own `head`: at
    /// most `entries` may be outstanding.
    pub fn published(&self, head: u32) -> Result<u32, Error> {
        let tail = self.u32_at(OFF_TAIL).load(Ordering::SeqCst);
        if tail.wrapping_sub(head) > self.entries {
            return Err(Error::Corrupt {
                what: "tail",
                got: tail,
                base: head,
                tail,
                entries: self.entries,
            });
        }
        Ok(tail)
    }

    /// Backend: copies the command at position `pos` out of the ring (once:
    /// decode the copy, never the shared bytes).
    pub fn take(&self, pos: u32) -> [u8; CMD_SIZE] {
        // SAFETY: `entry_ptr` is in bounds; volatile, as in `put`.
        unsafe { std::ptr::read_volatile(self.entry_ptr(pos)) }
    }

    /// Backend: records `head` consumed and, with `answer = Some((pos,
    /// data))`, the response to the command at `pos`. Returns whether the
    /// frontend was asleep (and clears its flag: the caller must then
    /// signal `notify`).
    pub fn complete(&self, head: u32, answer: Option<(u32, u64)>) -> bool {
        self.u32_at(OFF_HEAD).store(head, Ordering::SeqCst);
        if let Some((pos, data)) = answer {
            self.u64_at(OFF_RESP_DATA).store(data, Ordering::Relaxed);
            self.u32_at(OFF_RESP_SEQ)
                .store(pos.wrapping_add(1), Ordering::SeqCst);
        }
        take_flag(self.u32_at(OFF_FE_WAITING))
    }

    /// Backend: says it is (or is no longer) asleep on `kick`. Call
    /// [`Ring::published`] again after setting it.
    pub fn set_backend_sleeping(&self, sleeping: bool) {
        self.u32_at(OFF_BE_SLEEPING)
            .store(u32::from(sleeping), Ordering::SeqCst);
    }
}

/// The waker's half of the handshake, after its index store: true if the
/// other side sleeps, and then the flag is cleared. A plain load first, so
/// that the common case (the other side awake) leaves the flag's cache
/// line shared instead of taking it over on every command.
fn take_flag(flag: &AtomicU32) -> bool {
    flag.load(Ordering::SeqCst) != 0 && flag.swap(0, Ordering::SeqCst) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AccessSize, Cmd};

    #[test]
    fn area_size_when_entries_invalid_then_error() {
        assert_eq!(area_size(8).ok(), Some(HEADER_SIZE + 8 * 32));
        for bad in [0, 4, 12, 8192] {
            assert!(matches!(area_size(bad), Err(Error::Entries(_))), "{bad}");
        }
    }

    #[test]
    fn ring_when_commands_published_then_backend_takes_them_in_order_and_answers() {
        let (front, fd) = Ring::create(8).unwrap();
        let back = Ring::open(&fd, 8).unwrap();
        back.set_backend_sleeping(true);
        for p in 0..3u32 {
            front.put(
                p,
                &Cmd::write(1, u64::from(p), AccessSize::B4, 7, false).encode(),
            );
        }
        assert!(front.publish(3), "the backend slept: kick it");
        assert!(!front.publish(3), "the flag was cleared");
        assert_eq!(back.published(0).unwrap(), 3);
        for p in 0..3u32 {
            let c = Cmd::decode(&back.take(p)).unwrap();
            assert_eq!(c.offset, u64::from(p));
        }
        front.set_frontend_waiting(true);
        assert!(back.complete(3, Some((2, 0x55))));
        assert_eq!(front.consumed(0, 3).unwrap(), 3);
        assert_eq!(front.response(2, 0).unwrap(), Some(0x55));
        assert_eq!(front.response(5, 3).unwrap(), None, "not yet answered");
    }

    #[test]
    fn ring_when_peer_corrupts_indices_then_corrupt_not_trusted() {
        let (front, fd) = Ring::create(8).unwrap();
        let back = Ring::open(&fd, 8).unwrap();
        front.publish(9);
        assert!(matches!(back.published(0), Err(Error::Corrupt { .. })));
        front.publish(4);
        back.complete(5, None);
        assert!(matches!(front.consumed(0, 4), Err(Error::Corrupt { .. })));
        back.complete(2, Some((7, 1)));
        assert!(
            matches!(front.consumed(3, 4), Err(Error::Corrupt { .. })),
            "went back"
        );
        assert!(matches!(front.response(3, 0), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn open_when_unsealed_short_or_wrong_header_then_refused() {
        let (_front, fd) = Ring::create(16).unwrap();
        assert!(matches!(Ring::open(&fd, 32), Err(Error::Short { .. })));
        assert!(matches!(Ring::open(&fd, 8), Err(Error::Header { .. })));
        // SAFETY: a valid name; the fd is owned at once.
        let raw = unsafe { libc::memfd_create(c"t".as_ptr(), 0) };
        // SAFETY: memfd_create just returned this fd.
        let plain = unsafe { OwnedFd::from_raw_fd(raw) };
        assert!(matches!(Ring::open(&plain, 8), Err(Error::NotSealed)));
    }
}
