//! VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: the shared area where the backend
//! records which descriptor heads are in flight, so that the backend that
//! serves the next connection (this process after a disconnect, or a new
//! one after a crash) resubmits them.
//!
//! The layout is the vhost-user specification's for split queues, as QEMU
//! and libvhost-user use it: one region per queue, each `features` (u64),
//! `version`, `desc_num`, `last_batch_head`, `used_idx` (u16 each), then
//! `desc_num` 16-byte entries (`inflight` u8, 5 bytes of padding, `next`
//! u16, `counter` u64), the region's size rounded up to 64 bytes as
//! libvhost-user rounds it (`16 * queue_size + 2`). [`allocate`] answers
//! GET_INFLIGHT_FD with a zeroed memfd sealed against resizing;
//! [`Area::map`] maps what SET_INFLIGHT_FD hands over (it must be sealed
//! against shrinking, so the frontend cannot pull pages from under the
//! backend). While a queue is served, its [`QueueLog`] marks a head in
//! flight when it is popped and clears it once it is on the used ring
//! (through `crate::virtio::inflight`).
//!
//! When a vring starts with an area that has been used before,
//! [`QueueLog::start`] repairs the last completion the previous backend
//! may not have finished recording (the specification's `used_idx` and
//! `last_batch_head` step) and collects the heads still in flight, in
//! counter order. Outboard's devices complete each queue's requests in the
//! order they pop them, so those heads are exactly the available ring's
//! entries from the used ring's index on: the backend checks that against
//! the ring and restarts its available index at the used index, so the
//! device pops them again, first and once each, whatever the frontend's
//! SET_VRING_BASE said. An area that does not match the ring (a device that
//! completes out of order, or a corrupt area) is reported and cleared, and
//! serving restarts at the used index as well (a request may then be served
//! twice, none is lost).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, MmapRegion, VolatileMemory as _};

use crate::virtio::inflight::InflightLog;
use crate::virtio::Memory;

/// Size of the inflight description (QEMU's `VhostUserInflight`: two u64
/// and two u16, padded to 8 bytes).
pub(super) const DESCRIPTION_SIZE: usize = 24;
/// The largest queue a frontend may describe (QEMU's VIRTQUEUE_MAX_SIZE).
pub(super) const MAX_QUEUE_SIZE: u16 = 1024;
/// The region layout version this backend writes and reads.
const VERSION: u16 = 1;
/// Bytes before the first descriptor entry of a queue's region.
const HEADER: usize = 16;
/// Bytes per descriptor entry.
const ENTRY: usize = 16;
/// Offsets in a queue region's header.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
/// Offsets in a descriptor entry.
const OFF_INFLIGHT: usize = 0;
const OFF_NEXT: usize = 6;
const OFF_COUNTER: usize = 8;

/// Errors handling an inflight area.
#[derive(Debug, Error)]
pub enum Error {
    /// the description's shape is out of range
    #[error("inflight area for {num_queues} queues of {queue_size} (1 to {max_queues} queues of 1 to {MAX_QUEUE_SIZE})")]
    Shape {
        /// Queues described.
        num_queues: u16,
        /// Descriptors per queue described.
        queue_size: u16,
        /// The device's queues.
        max_queues: u16,
    },
    /// the area is too small for its queues
    #[error("inflight area of {size} bytes ({need} needed)")]
    Size {
        /// The size described.
        size: u64,
        /// The size the queues need.
        need: u64,
    },
    /// the offset is not page aligned
    #[error("inflight area at offset {0:#x} (not page aligned)")]
    Offset(u64),
    /// the fd can shrink
    #[error("the inflight fd is not sealed against shrinking")]
    NotSealed,
    /// reading the seals failed
    #[error("cannot read the inflight fd's seals")]
    Seals(#[source] io::Error),
    /// mapping failed
    #[error("cannot map the inflight area")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// creating the memfd failed
    #[error("cannot create the inflight memfd")]
    Create(#[source] io::Error),
}

/// The inflight description of GET_INFLIGHT_FD and SET_INFLIGHT_FD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Description {
    /// Size of the area.
    pub mmap_size: u64,
    /// Offset of the area in its fd.
    pub mmap_offset: u64,
    /// Queues in the area.
    pub num_queues: u16,
    /// Descriptor entries per queue.
    pub queue_size: u16,
}

impl Description {
    /// Decodes the little-endian payload (the relay checked its size).
    pub fn decode(b: &[u8; DESCRIPTION_SIZE]) -> Self {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Description {
            mmap_size: u64_at(0),
            mmap_offset: u64_at(8),
            num_queues: u16::from_le_bytes([b[16], b[17]]),
            queue_size: u16::from_le_bytes([b[18], b[19]]),
        }
    }

    /// The payload bytes.
    pub fn encode(&self) -> [u8; DESCRIPTION_SIZE] {
        let mut b = [0u8; DESCRIPTION_SIZE];
        b[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        b
    }

    /// Checks the shape against a device of `max_queues` queues; returns
    /// the size of one queue's region.
    fn stride(&self, max_queues: u16) -> Result<u64, Error> {
        if self.num_queues == 0
            || self.num_queues > max_queues
            || self.queue_size == 0
            || self.queue_size > MAX_QUEUE_SIZE
        {
            return Err(Error::Shape {
                num_queues: self.num_queues,
                queue_size: self.queue_size,
                max_queues,
            });
        }
        Ok(queue_region_size(self.queue_size))
    }
}

/// Bytes of one queue's region for `queue_size` entries, as libvhost-user
/// computes it (`vu_inflight_queue_size`).
pub(super) fn queue_region_size(queue_size: u16) -> u64 {
    (ENTRY as u64 * u64::from(queue_size) + 2).next_multiple_of(64)
}

/// GET_INFLIGHT_FD: a zeroed memfd for the queues `asked` describes, sealed
/// against growing, shrinking and further seals, and the reply's
/// description.
pub(super) fn allocate(asked: &Description, max_queues: u16) -> Result<(Description, File), Error> {
    let stride = asked.stride(max_queues)?;
    let size = stride * u64::from(asked.num_queues);
    // SAFETY: a NUL-terminated name and flags; the returned fd (if any) is
    // new and owned by nobody else.
    let fd = unsafe {
        libc::memfd_create(
            c"outboard-vu-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Error::Create(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned `fd`; this is its only owner.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(Error::Create)?;
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::Create(io::Error::last_os_error()));
    }
    let reply = Description {
        mmap_size: size,
        mmap_offset: 0,
        ..*asked
    };
    Ok((reply, file))
}

/// An area handed over with SET_INFLIGHT_FD, mapped.
#[derive(Debug)]
pub(super) struct Area {
    region: Arc<MmapRegion<()>>,
    num_queues: u16,
    queue_size: u16,
    stride: usize,
}

impl Area {
    /// Maps the area `d` describes in `file`, for a device of `max_queues`
    /// queues.
    pub fn map(d: &Description, file: File, max_queues: u16) -> Result<Self, Error> {
        let stride = d.stride(max_queues)?;
        let need = stride * u64::from(d.num_queues);
        if d.mmap_size < need {
            return Err(Error::Size {
                size: d.mmap_size,
                need,
            });
        }
        if !d.mmap_offset.is_multiple_of(4096) {
            return Err(Error::Offset(d.mmap_offset));
        }
        // SAFETY: F_GET_SEALS only reads the seals of an fd we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(Error::Seals(io::Error::last_os_error()));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(Error::NotSealed);
        }
        // Only the part the queues use is mapped; vm-memory checks that the
        // file is large enough.
        let len = usize::try_from(need).map_err(|_| Error::Size {
            size: d.mmap_size,
            need,
        })?;
        let region =
            MmapRegion::from_file(FileOffset::new(file, d.mmap_offset), len).map_err(Error::Map)?;
        Ok(Area {
            region: Arc::new(region),
            num_queues: d.num_queues,
            queue_size: d.queue_size,
            stride: stride as usize,
        })
    }

    /// The log of queue `index`, if the area covers it.
    pub fn queue(&self, index: usize) -> Option<QueueLog> {
        (index < usize::from(self.num_queues)).then(|| QueueLog {
            region: Arc::clone(&self.region),
            base: index * self.stride,
            desc_num: self.queue_size,
            counter: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// What [`QueueLog::start`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Start {
    /// The area was new: it is initialised and nothing is resubmitted.
    Fresh,
    /// The heads in flight (in counter order) are the ring's entries from
    /// the used index on; the available index restarts there.
    Resumed {
        /// The used ring's index.
        used: u16,
        /// The heads that will be served again, in order.
        heads: Vec<u16>,
    },
    /// The area did not match the ring: cleared; the available index
    /// restarts at the used index.
    Mismatch {
        /// The used ring's index.
        used: u16,
        /// Why.
        why: String,
    },
}

/// One queue's part of an [`Area`]: the [`InflightLog`] the queue's
/// processing reports to. Clones share the area and the counter.
#[derive(Debug, Clone)]
pub(super) struct QueueLog {
    region: Arc<MmapRegion<()>>,
    base: usize,
    desc_num: u16,
    counter: Arc<AtomicU64>,
}

impl QueueLog {
    fn load16(&self, off: usize) -> u16 {
        self.region
            .as_volatile_slice()
            .load::<u16>(self.base + off, Ordering::Acquire)
            .unwrap_or(0)
    }

    fn store16(&self, off: usize, v: u16) {
        let _ = self
            .region
            .as_volatile_slice()
            .store(v, self.base + off, Ordering::Release);
    }

    fn entry(&self, head: u16) -> Option<usize> {
        (head < self.desc_num).then(|| HEADER + ENTRY * usize::from(head))
    }

    fn inflight(&self, head: u16) -> bool {
        self.entry(head).is_some_and(|e| {
            self.region
                .as_volatile_slice()
                .load::<u8>(self.base + e + OFF_INFLIGHT, Ordering::Acquire)
                .is_ok_and(|v| v == 1)
        })
    }

    fn set_inflight(&self, head: u16, v: u8) {
        if let Some(e) = self.entry(head) {
            let _ = self.region.as_volatile_slice().store(
                v,
                self.base + e + OFF_INFLIGHT,
                Ordering::Release,
            );
        }
    }

    fn counter_of(&self, head: u16) -> u64 {
        self.entry(head)
            .and_then(|e| {
                self.region
                    .as_volatile_slice()
                    .load::<u64>(self.base + e + OFF_COUNTER, Ordering::Acquire)
                    .ok()
            })
            .unwrap_or(0)
    }

    /// Prepares the area for a vring that starts now (its rings set, not
    /// yet served), and sets the queue's available and used indices when
    /// the area has been used before; see the module docs.
    pub fn start(&self, queue: &mut Queue, mem: &Memory) -> Result<Start, virtio_queue::Error> {
        let used = queue.used_idx(mem, Ordering::Acquire)?.0;
        if self.load16(OFF_VERSION) == 0 {
            self.store16(OFF_DESC_NUM, self.desc_num);
            self.store16(OFF_LAST_BATCH_HEAD, 0);
            self.store16(OFF_USED_IDX, used);
            self.counter.store(0, Ordering::Relaxed);
            self.store16(OFF_VERSION, VERSION);
            return Ok(Start::Fresh);
        }
        let heads = match self.in_flight(used) {
            Ok(heads) => heads,
            Err(why) => return Ok(self.mismatch(queue, used, why)),
        };
        // In order: head k must be the ring's entry at used + k.
        let avail = queue.avail_idx(mem, Ordering::Acquire)?.0;
        let size = queue.size();
        if usize::from(avail.wrapping_sub(used)) < heads.len() {
            let why = format!(
                "{} heads in flight but only {} available past the used index",
                heads.len(),
                avail.wrapping_sub(used)
            );
            return Ok(self.mismatch(queue, used, why));
        }
        for (k, &head) in heads.iter().enumerate() {
            let pos = used.wrapping_add(k as u16);
            let at = ring_entry(queue.avail_ring(), pos, size);
            let entry = mem
                .read_obj::<[u8; 2]>(GuestAddress(at))
                .map(u16::from_le_bytes)
                .map_err(|_| virtio_queue::Error::InvalidAvailRingIndex)?;
            if entry != head {
                let why =
                    format!("head {head} is in flight but the ring holds {entry} at index {pos}");
                return Ok(self.mismatch(queue, used, why));
            }
        }
        let next = heads
            .iter()
            .map(|&h| self.counter_of(h))
            .max()
            .map_or(0, |c| c + 1);
        self.counter.store(next, Ordering::Relaxed);
        queue.set_next_avail(used);
        queue.set_next_used(used);
        Ok(Start::Resumed { used, heads })
    }

    /// The heads in flight in counter order, after finishing the record of
    /// the last completion (the used ring's index is `used`).
    fn in_flight(&self, used: u16) -> Result<Vec<u16>, String> {
        let logged = self.load16(OFF_USED_IDX);
        if logged != used {
            // The used ring moved past what the area says: the last batch
            // reached the ring but was not cleared here.
            let batch = used.wrapping_sub(logged);
            if batch > self.desc_num {
                return Err(format!(
                    "the area's used index {logged} is {batch} behind the ring's {used}"
                ));
            }
            let mut head = self.load16(OFF_LAST_BATCH_HEAD);
            for _ in 0..batch {
                let Some(e) = self.entry(head) else {
                    return Err(format!("last batch head {head} out of range"));
                };
                self.set_inflight(head, 0);
                head = self.load16(e + OFF_NEXT);
            }
            self.store16(OFF_USED_IDX, used);
        }
        let mut heads: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.inflight(h))
            .map(|h| (self.counter_of(h), h))
            .collect();
        heads.sort_unstable();
        Ok(heads.into_iter().map(|(_, h)| h).collect())
    }

    fn mismatch(&self, queue: &mut Queue, used: u16, why: String) -> Start {
        for h in 0..self.desc_num {
            self.set_inflight(h, 0);
        }
        self.store16(OFF_USED_IDX, used);
        self.counter.store(0, Ordering::Relaxed);
        queue.set_next_avail(used);
        queue.set_next_used(used);
        Start::Mismatch { used, why }
    }
}

/// Guest address of the available ring's entry for index `pos`.
fn ring_entry(avail_ring: u64, pos: u16, size: u16) -> u64 {
    avail_ring + 4 + 2 * u64::from(pos % size.max(1))
}

impl InflightLog for QueueLog {
    fn popped(&mut self, head: u16) {
        let Some(e) = self.entry(head) else {
            return;
        };
        let c = self.counter.fetch_add(1, Ordering::Relaxed);
        let s = self.region.as_volatile_slice();
        let _ = s.store(c, self.base + e + OFF_COUNTER, Ordering::Release);
        let _ = s.store(1u8, self.base + e + OFF_INFLIGHT, Ordering::Release);
    }

    fn completing(&mut self, head: u16) {
        let Some(e) = self.entry(head) else {
            return;
        };
        let last = self.load16(OFF_LAST_BATCH_HEAD);
        self.store16(e + OFF_NEXT, last);
        self.store16(OFF_LAST_BATCH_HEAD, head);
    }

    fn completed(&mut self, head: u16, used_idx: u16) {
        self.set_inflight(head, 0);
        self.store16(OFF_USED_IDX, used_idx);
    }
}

/// The session's inflight state, shared by the relay (which installs areas
/// and sees vrings start) and the vring threads (which log to them).
#[derive(Debug)]
pub(super) struct Tracking {
    queues: Vec<Mutex<Slot>>,
}

/// One queue's state in a session.
#[derive(Debug, Default)]
pub(super) struct Slot {
    /// The queue's part of the area, once SET_INFLIGHT_FD covered it.
    pub log: Option<QueueLog>,
    /// The vring (re)started since it was last served: [`QueueLog::start`]
    /// runs before it is served again.
    pub starting: bool,
}

impl Tracking {
    /// State for `queues` queues, none tracked.
    pub fn new(queues: usize) -> Self {
        Tracking {
            queues: (0..queues).map(|_| Mutex::default()).collect(),
        }
    }

    /// The state of queue `index`.
    pub fn slot(&self, index: usize) -> Option<MutexGuard<'_, Slot>> {
        self.queues
            .get(index)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// SET_INFLIGHT_FD: every queue logs to `area` from its next start.
    pub fn install(&self, area: &Area) {
        for (i, q) in self.queues.iter().enumerate() {
            let mut slot = q.lock().unwrap_or_else(PoisonError::into_inner);
            slot.log = area.queue(i);
            slot.starting = true;
        }
    }

    /// SET_VRING_KICK for queue `index`: the vring (re)starts.
    pub fn starting(&self, index: usize) {
        if let Some(mut slot) = self.slot(index) {
            slot.starting = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn area(queues: u16, size: u16) -> Area {
        let asked = Description {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: queues,
            queue_size: size,
        };
        let (d, f) = allocate(&asked, 4).unwrap_or_else(|e| panic!("{e}"));
        Area::map(&d, f, 4).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A 16-entry queue with `n` one-descriptor chains (heads 0..n).
    fn queue(mem: &Memory, n: u16) -> (MockSplitQueue<'_, Memory>, Queue) {
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        let descs: Vec<RawDescriptor> = (0..n)
            .map(|i| {
                RawDescriptor::from(Descriptor::new(
                    0x8000 + 0x100 * u64::from(i),
                    8,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        mock.add_desc_chains(&descs, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        let q = mock.create_queue().unwrap_or_else(|e| panic!("{e}"));
        (mock, q)
    }

    #[test]
    fn allocate_when_asked_then_sealed_zeroed_and_libvhost_user_sized() {
        let asked = Description {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 128,
        };
        let (d, f) = allocate(&asked, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.mmap_size, 2 * 2112);
        assert_eq!(f.metadata().map(|m| m.len()).ok(), Some(2 * 2112));
        // SAFETY: F_GET_SEALS reads the seals of a valid fd.
        let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(
            seals,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL
        );
        assert!(matches!(
            allocate(
                &Description {
                    num_queues: 3,
                    ..asked
                },
                2
            ),
            Err(Error::Shape { .. })
        ));
        let back = Description::decode(&d.encode());
        assert_eq!(back, d);
    }

    #[test]
    fn map_when_fd_can_shrink_or_area_too_small_then_refused() {
        let f = tempfile_like();
        f.set_len(8192).unwrap_or_else(|e| panic!("{e}"));
        let d = Description {
            mmap_size: 4096,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 16,
        };
        assert!(matches!(Area::map(&d, f, 1), Err(Error::NotSealed)));
        let d = Description { mmap_size: 64, ..d };
        assert!(matches!(
            Area::map(&d, tempfile_like(), 1),
            Err(Error::Size { need: 320, .. })
        ));
    }

    fn tempfile_like() -> File {
        // SAFETY: a NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned here only.
        File::from(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    #[test]
    fn start_when_heads_in_flight_then_resumed_at_used_index_in_counter_order() {
        let mem = memory();
        let (_mock, mut q) = queue(&mem, 3);
        let a = area(1, 16);
        let mut log = a.queue(0).unwrap_or_else(|| panic!("queue 0"));
        assert_eq!(log.start(&mut q, &mem).ok(), Some(Start::Fresh));
        // Heads 0 and 1 popped; 0 completed; 1 still in flight; 2 not popped.
        log.popped(0);
        log.completing(0);
        log.completed(0, 1);
        log.popped(1);
        // The next backend: its queue starts wherever the frontend said.
        let (_mock2, mut q2) = queue(&mem, 0);
        q2.set_next_avail(3);
        // The guest's used index is 1 (the mock wrote none; set it).
        mem.write_obj(1u16.to_le_bytes(), GuestAddress(q2.used_ring() + 2))
            .unwrap_or_else(|e| panic!("{e}"));
        // The available ring holds heads 0, 1, 2 at 0, 1, 2.
        for (i, h) in [0u16, 1, 2].iter().enumerate() {
            mem.write_obj(
                h.to_le_bytes(),
                GuestAddress(q2.avail_ring() + 4 + 2 * i as u64),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        }
        mem.write_obj(3u16.to_le_bytes(), GuestAddress(q2.avail_ring() + 2))
            .unwrap_or_else(|e| panic!("{e}"));
        let log2 = a.queue(0).unwrap_or_else(|| panic!("queue 0"));
        let s = log2.start(&mut q2, &mem).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s,
            Start::Resumed {
                used: 1,
                heads: vec![1]
            }
        );
        assert_eq!(q2.next_avail(), 1);
        assert_eq!(q2.next_used(), 1);
    }

    #[test]
    fn start_when_last_completion_reached_the_ring_only_then_not_resubmitted() {
        let mem = memory();
        let (_mock, mut q) = queue(&mem, 2);
        let a = area(1, 16);
        let mut log = a.queue(0).unwrap_or_else(|| panic!("queue 0"));
        assert_eq!(log.start(&mut q, &mem).ok(), Some(Start::Fresh));
        log.popped(0);
        log.completing(0);
        // The used ring got head 0 (index 1), then the backend died before
        // recording it.
        mem.write_obj(1u16.to_le_bytes(), GuestAddress(q.used_ring() + 2))
            .unwrap_or_else(|e| panic!("{e}"));
        let s = log.start(&mut q, &mem).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s,
            Start::Resumed {
                used: 1,
                heads: vec![]
            }
        );
        assert!(!log.inflight(0));
    }

    #[test]
    fn start_when_ring_disagrees_then_cleared_and_restarted_at_used_index() {
        let mem = memory();
        let (_mock, mut q) = queue(&mem, 2);
        let a = area(1, 16);
        let mut log = a.queue(0).unwrap_or_else(|| panic!("queue 0"));
        assert_eq!(log.start(&mut q, &mem).ok(), Some(Start::Fresh));
        // Head 1 in flight, but the ring's entry at the used index (0) is 0.
        log.popped(1);
        let s = log.start(&mut q, &mem).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(s, Start::Mismatch { used: 0, .. }), "{s:?}");
        assert!(!log.inflight(1));
        assert_eq!(q.next_avail(), 0);
    }
}
