//! The driver's plain types: guest RAM allocation, buffers, options, and
//! the per-queue state the driver keeps.

use std::collections::HashMap;

use super::Error;

/// A bump allocator over a window of guest RAM, for rings and buffers.
#[derive(Debug, Clone)]
pub struct GuestAllocator {
    next: u64,
    end: u64,
}

impl GuestAllocator {
    /// Allocates from `start..start + size`.
    pub fn new(start: u64, size: u64) -> Self {
        GuestAllocator {
            next: start,
            end: start.saturating_add(size),
        }
    }

    /// `size` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64, Error> {
        let addr = self
            .next
            .checked_add(align - 1)
            .map(|a| a & !(align - 1))
            .ok_or(Error::OutOfMemory)?;
        let end = addr.checked_add(size).ok_or(Error::OutOfMemory)?;
        if end > self.end {
            return Err(Error::OutOfMemory);
        }
        self.next = end;
        Ok(addr)
    }
}

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub device_writes: bool,
}

impl Buffer {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Buffer {
            addr,
            len,
            device_writes: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Buffer {
            addr,
            len,
            device_writes: true,
        }
    }
}

#[derive(Debug)]
pub(super) struct DriverQueue {
    pub(super) size: u16,
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
    pub(super) avail_idx: u16,
    pub(super) used_seen: u16,
    /// The available index when the driver last decided about notifying.
    pub(super) kicked_idx: u16,
    pub(super) free: Vec<u16>,
    pub(super) in_flight: HashMap<u16, Held>,
    /// Used chains not yet collected by `wait`: their descriptors stay
    /// allocated until then, so a head index is never reused while a
    /// completion for it is pending.
    pub(super) done: HashMap<u16, (u32, Held)>,
}

impl DriverQueue {
    /// Where the driver publishes `used_event` (after the avail ring).
    pub(super) fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    /// Where the device publishes `avail_event` (after the used ring).
    pub(super) fn avail_event_addr(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }
}

/// What an in-flight chain holds: ring descriptors and an indirect table.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) ids: Vec<u16>,
    pub(super) table: Option<usize>,
}

/// Indirect descriptor tables in guest RAM, [`super::INDIRECT_ENTRIES`] each.
#[derive(Debug)]
pub(super) struct IndirectPool {
    pub(super) base: u64,
    pub(super) free: Vec<usize>,
}

/// Notifications the driver sent and the ones the device let it skip.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notifications {
    /// QueueNotify writes.
    pub sent: u64,
    /// Notifications skipped: NO_NOTIFY set, or `avail_event` not crossed.
    pub suppressed: u64,
}

/// What the driver asks of a device at initialization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriverOptions {
    /// Device features to accept when offered (VIRTIO_F_VERSION_1 is
    /// always accepted; add [`super::F_INDIRECT_DESC`] and [`super::F_EVENT_IDX`] for the
    /// ring features).
    pub wanted: u64,
    /// Largest queue size to choose (the device's maximum if smaller).
    pub queue_size: u16,
    /// How many of the device's queues to set up (from queue 0).
    pub max_queues: usize,
}

impl DriverOptions {
    /// Accepts `wanted`, queues of up to `queue_size` entries, every queue.
    pub fn new(wanted: u64, queue_size: u16) -> Self {
        DriverOptions {
            wanted,
            queue_size,
            max_queues: usize::MAX,
        }
    }

    /// Sets up at most `n` queues.
    pub fn queues(self, n: usize) -> Self {
        DriverOptions {
            max_queues: n,
            ..self
        }
    }
}
