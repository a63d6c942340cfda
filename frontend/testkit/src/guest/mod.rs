//! The test guest's virtio driver.
//!
//! Where no guest kernel runs, this driver plays one: it talks to a
//! virtio-mmio device only through a [`Bus`] (register reads and writes) and
//! guest RAM ([`GuestRam`]), exactly as a kernel would: it checks the magic,
//! version and device ID, negotiates features, places split virtqueues in
//! guest RAM, submits descriptor chains, rings QueueNotify, waits for the
//! device's interrupt and reads the used ring. It knows nothing about how
//! the device is implemented, so it works unchanged against any virtio-mmio
//! device the frontend exposes. Tests, the demo and the benchmark use it.
//!
//! Ring features, when the caller asks for them and the device offers them:
//! VIRTIO_RING_F_INDIRECT_DESC (every chain of two buffers or more goes
//! into an indirect table, so a chain may be longer than the queue) and
//! VIRTIO_RING_F_EVENT_IDX (the driver notifies only when the device's
//! `avail_event` asks for it, and publishes `used_event` before it sleeps,
//! as Linux's virtio_ring does). [`VirtioMmioDriver::notifications`] counts
//! notifications sent and suppressed.
//!
//! Guest memory is written in the host's byte order, which is little endian
//! on every platform Outboard runs on, as virtio 1.x requires.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use outboard_frontend::bus::{AccessError, Bus};
use outboard_frontend::irq::IrqLine;
use outboard_frontend::memory::GuestRam;
use outboard_protocol::AccessSize;

/// VIRTIO_F_VERSION_1 as a feature mask.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// VIRTIO_RING_F_INDIRECT_DESC as a feature mask.
pub const F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// VIRTIO_RING_F_EVENT_IDX as a feature mask.
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// The used ring's flag asking the driver not to notify.
const USED_F_NO_NOTIFY: u16 = 1;
/// Indirect tables the driver keeps (chains in flight with one each).
const INDIRECT_TABLES: usize = 32;
/// Entries per indirect table: the longest chain the driver submits.
pub const INDIRECT_ENTRIES: usize = 1024;

/// Errors of the test guest's driver.
#[derive(Debug, Error)]
pub enum Error {
    /// register access failed
    #[error("register access failed")]
    Access(#[source] AccessError),
    /// not a virtio-mmio device: magic {0:#x}
    #[error("not a virtio-mmio device: magic {0:#x}")]
    BadMagic(u32),
    /// unsupported virtio-mmio version {0}
    #[error("unsupported virtio-mmio version {0}")]
    BadVersion(u32),
    /// the device refused features {0:#x}
    #[error("the device refused features {0:#x}")]
    FeaturesRefused(u64),
    /// the device has no queue {0}
    #[error("the device has no queue {0}")]
    NoQueue(usize),
    /// guest memory access failed
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// guest memory for the driver is exhausted
    #[error("guest memory for the driver is exhausted")]
    OutOfMemory,
    /// not enough free descriptors in queue {0}
    #[error("not enough free descriptors in queue {0}")]
    QueueFull(usize),
    /// a chain of {0} buffers is longer than an indirect table
    #[error("a chain of {0} buffers is longer than an indirect table")]
    ChainTooLong(usize),
    /// no completion within the timeout
    #[error("no completion within the timeout")]
    Timeout,
    /// the device needs a reset (status {0:#x})
    #[error("the device needs a reset (status {0:#x})")]
    NeedsReset(u32),
    /// the device returned descriptor {0}, which is not in flight
    #[error("the device returned descriptor {0}, which is not in flight")]
    BogusUsed(u32),
}

/// A virtio-mmio driver bound to one device.
pub struct VirtioMmioDriver {
    bus: Arc<Bus>,
    base: u64,
    ram: Arc<GuestRam>,
    irq: IrqLine,
    irq_seen: u64,
    device_id: u32,
    features: u64,
    queues: Vec<DriverQueue>,
    indirect: Option<IndirectPool>,
    use_indirect: bool,
    notifications: Notifications,
    timeout: Duration,
}

impl std::fmt::Debug for VirtioMmioDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmioDriver")
            .field("base", &self.base)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

impl VirtioMmioDriver {
    /// Initializes the device at `base`: reset, feature negotiation (the
    /// device's features that are in `opts.wanted`, plus
    /// VIRTIO_F_VERSION_1), the device's queues up to `opts.max_queues` (at
    /// most `opts.queue_size` entries each, rings from `alloc`), then
    /// DRIVER_OK.
    pub fn init(
        bus: Arc<Bus>,
        base: u64,
        ram: Arc<GuestRam>,
        irq: IrqLine,
        alloc: &mut GuestAllocator,
        opts: DriverOptions,
    ) -> Result<Self, Error> {
        let (wanted, max_queue_size) = (opts.wanted, opts.queue_size);
        let irq_seen = irq.count();
        let mut d = VirtioMmioDriver {
            bus,
            base,
            ram,
            irq,
            irq_seen,
            device_id: 0,
            features: 0,
            queues: Vec::new(),
            indirect: None,
            use_indirect: true,
            notifications: Notifications::default(),
            timeout: Duration::from_secs(10),
        };
        let magic = d.reg(regs::MAGIC_VALUE)?;
        if magic != regs::MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = d.reg(regs::VERSION)?;
        if version != regs::TRANSPORT_VERSION {
            return Err(Error::BadVersion(version));
        }
        d.device_id = d.reg(regs::DEVICE_ID)?;
        d.set_reg(regs::STATUS, 0)?;
        d.set_reg(regs::STATUS, status::ACKNOWLEDGE)?;
        d.set_reg(regs::STATUS, status::ACKNOWLEDGE | status::DRIVER)?;
        d.set_reg(regs::DEVICE_FEATURES_SEL, 0)?;
        let lo = u64::from(d.reg(regs::DEVICE_FEATURES)?);
        d.set_reg(regs::DEVICE_FEATURES_SEL, 1)?;
        let hi = u64::from(d.reg(regs::DEVICE_FEATURES)?);
        d.features = (lo | (hi << 32)) & (wanted | F_VERSION_1);
        d.negotiate(d.features)?;
        if d.features & F_INDIRECT_DESC != 0 {
            let bytes = (INDIRECT_TABLES * INDIRECT_ENTRIES * 16) as u64;
            d.indirect = Some(IndirectPool {
                base: alloc.alloc(bytes, 16)?,
                free: (0..INDIRECT_TABLES).rev().collect(),
            });
        }
        for q in 0..u32::try_from(opts.max_queues).unwrap_or(u32::MAX) {
            d.set_reg(regs::QUEUE_SEL, q)?;
            let max = d.reg(regs::QUEUE_NUM_MAX)? as u16;
            if max == 0 {
                break;
            }
            let size = max.min(max_queue_size.max(1)).next_power_of_two().min(max);
            let n = u64::from(size);
            let desc = alloc.alloc(16 * n, 16)?;
            // Ring sizes include used_event and avail_event.
            let avail = alloc.alloc(6 + 2 * n, 2)?;
            let used = alloc.alloc(6 + 8 * n, 4)?;
            for (addr, len) in [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)] {
                d.ram
                    .memory()
                    .write_slice(&vec![0u8; len as usize], GuestAddress(addr))
                    .map_err(Error::Memory)?;
            }
            d.set_reg(regs::QUEUE_NUM, u32::from(size))?;
            for (low, high, addr) in [
                (regs::QUEUE_DESC_LOW, regs::QUEUE_DESC_HIGH, desc),
                (regs::QUEUE_AVAIL_LOW, regs::QUEUE_AVAIL_HIGH, avail),
                (regs::QUEUE_USED_LOW, regs::QUEUE_USED_HIGH, used),
            ] {
                d.set_reg(low, addr as u32)?;
                d.set_reg(high, (addr >> 32) as u32)?;
            }
            d.set_reg(regs::QUEUE_READY, 1)?;
            d.queues.push(DriverQueue {
                size,
                desc,
                avail,
                used,
                avail_idx: 0,
                used_seen: 0,
                kicked_idx: 0,
                free: (0..size).rev().collect(),
                in_flight: HashMap::new(),
                done: HashMap::new(),
            });
        }
        let s = d.reg(regs::STATUS)?;
        d.set_reg(regs::STATUS, s | status::DRIVER_OK)?;
        Ok(d)
    }

    fn negotiate(&self, features: u64) -> Result<(), Error> {
        self.set_reg(regs::DRIVER_FEATURES_SEL, 0)?;
        self.set_reg(regs::DRIVER_FEATURES, features as u32)?;
        self.set_reg(regs::DRIVER_FEATURES_SEL, 1)?;
        self.set_reg(regs::DRIVER_FEATURES, (features >> 32) as u32)?;
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.set_reg(regs::STATUS, s)?;
        if self.reg(regs::STATUS)? & status::FEATURES_OK == 0 {
            return Err(Error::FeaturesRefused(features));
        }
        Ok(())
    }

    /// Reads a 32-bit register.
    pub fn reg(&self, offset: u64) -> Result<u32, Error> {
        self.bus
            .try_read(self.base + offset, AccessSize::B4)
            .map(|v| v as u32)
            .map_err(Error::Access)
    }

    /// Writes a 32-bit register.
    pub fn set_reg(&self, offset: u64, value: u32) -> Result<(), Error> {
        self.bus
            .try_write(self.base + offset, AccessSize::B4, u64::from(value))
            .map_err(Error::Access)
    }

    /// Reads `size` bytes of device configuration space at `offset`.
    pub fn config(&self, offset: u64, size: AccessSize) -> Result<u64, Error> {
        self.bus
            .try_read(self.base + regs::CONFIG + offset, size)
            .map_err(Error::Access)
    }

    /// The device's virtio ID.
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The device status register.
    pub fn status(&self) -> Result<u32, Error> {
        self.reg(regs::STATUS)
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The size the driver chose for queue `q`.
    pub fn queue_size(&self, q: usize) -> Option<u16> {
        self.queues.get(q).map(|queue| queue.size)
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Switches to new guest RAM (after the frontend swapped the memory
    /// table); the queues must still be inside it.
    pub fn set_ram(&mut self, ram: Arc<GuestRam>) {
        self.ram = ram;
    }

    /// Sets how long [`VirtioMmioDriver::wait`] waits.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Whether chains of two buffers or more go into an indirect table
    /// (the default when VIRTIO_RING_F_INDIRECT_DESC was negotiated).
    pub fn set_use_indirect(&mut self, on: bool) {
        self.use_indirect = on;
    }

    /// Notifications sent and suppressed so far.
    pub fn notifications(&self) -> Notifications {
        self.notifications
    }

    /// Writes a chain of descriptors for `bufs` and makes it available,
    /// without notifying. Returns the chain's head index. With indirect
    /// descriptors in use, a chain of two buffers or more takes one ring
    /// descriptor and an indirect table, and may be longer than the queue.
    pub fn submit(&mut self, q: usize, bufs: &[Buffer]) -> Result<u16, Error> {
        let mem = self.ram.memory();
        let queue = self.queues.get_mut(q).ok_or(Error::NoQueue(q))?;
        let indirect = match self.indirect.as_mut() {
            Some(pool) if self.use_indirect && bufs.len() > 1 => {
                if bufs.len() > INDIRECT_ENTRIES {
                    return Err(Error::ChainTooLong(bufs.len()));
                }
                Some((pool.base, pool.free.pop().ok_or(Error::QueueFull(q))?))
            }
            _ => None,
        };
        let ring_descs = if indirect.is_some() { 1 } else { bufs.len() };
        if bufs.is_empty() || queue.free.len() < ring_descs {
            if let (Some(pool), Some((_, t))) = (self.indirect.as_mut(), indirect) {
                pool.free.push(t);
            }
            return Err(Error::QueueFull(q));
        }
        let ids: Vec<u16> = (0..ring_descs).filter_map(|_| queue.free.pop()).collect();
        let write = |at: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(at))
                .map_err(Error::Memory)
        };
        // Direct: descriptors `ids`, linked by index. Indirect: table
        // entries 0..n, linked in order, behind one ring descriptor.
        let table = indirect.map(|(base, t)| base + (t * INDIRECT_ENTRIES * 16) as u64);
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.device_writes { DESC_F_WRITE } else { 0 };
            let (at, next) = match table {
                Some(t) => (t + 16 * i as u64, (i + 1) as u16),
                None => (
                    queue.desc + 16 * u64::from(ids[i]),
                    ids.get(i + 1).copied().unwrap_or(0),
                ),
            };
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            } else if table.is_some() {
                // The last entry links nowhere.
                write(at, b.addr, b.len, flags, 0)?;
                continue;
            }
            write(at, b.addr, b.len, flags, next)?;
        }
        if let Some(t) = table {
            let len =
                u32::try_from(16 * bufs.len()).map_err(|_| Error::ChainTooLong(bufs.len()))?;
            write(
                queue.desc + 16 * u64::from(ids[0]),
                t,
                len,
                DESC_F_INDIRECT,
                0,
            )?;
        }
        let head = ids[0];
        let slot = queue.avail + 4 + 2 * u64::from(queue.avail_idx % queue.size);
        mem.write_obj(head, GuestAddress(slot))
            .map_err(Error::Memory)?;
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        // The ring entry must be visible before the index that publishes it.
        mem.store(
            queue.avail_idx,
            GuestAddress(queue.avail + 2),
            Ordering::Release,
        )
        .map_err(Error::Memory)?;
        queue.in_flight.insert(
            head,
            Held {
                ids,
                table: indirect.map(|(_, t)| t),
            },
        );
        Ok(head)
    }

    /// Guest address of descriptor `index` of queue `q` (for tests that
    /// forge malformed chains).
    pub fn descriptor_address(&self, q: usize, index: u16) -> Option<u64> {
        let queue = self.queues.get(q)?;
        (index < queue.size).then(|| queue.desc + 16 * u64::from(index))
    }

    /// Rings queue `q`'s doorbell (QueueNotify) unless the device said it
    /// need not: the used ring's NO_NOTIFY flag, or with EVENT_IDX an
    /// `avail_event` that the chains made available since the last
    /// decision did not cross (vring_need_event, virtio 1.2 2.7.10).
    pub fn notify(&mut self, q: usize) -> Result<(), Error> {
        let mem = self.ram.memory();
        let event_idx = self.features & F_EVENT_IDX != 0;
        let queue = self.queues.get_mut(q).ok_or(Error::NoQueue(q))?;
        // The avail index must be visible before the device's word is read.
        std::sync::atomic::fence(Ordering::SeqCst);
        let (new, old) = (queue.avail_idx, queue.kicked_idx);
        queue.kicked_idx = new;
        let needed = if event_idx {
            let event: u16 = mem
                .load(GuestAddress(queue.avail_event_addr()), Ordering::Acquire)
                .map_err(Error::Memory)?;
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = mem
                .load(GuestAddress(queue.used), Ordering::Acquire)
                .map_err(Error::Memory)?;
            flags & USED_F_NO_NOTIFY == 0
        };
        if !needed {
            self.notifications.suppressed += 1;
            return Ok(());
        }
        self.notifications.sent += 1;
        self.set_reg(regs::QUEUE_NOTIFY, q as u32)
    }

    /// Rings queue `q`'s doorbell whatever the device asked.
    pub fn notify_always(&mut self, q: usize) -> Result<(), Error> {
        let queue = self.queues.get_mut(q).ok_or(Error::NoQueue(q))?;
        queue.kicked_idx = queue.avail_idx;
        self.notifications.sent += 1;
        self.set_reg(regs::QUEUE_NOTIFY, q as u32)
    }

    /// Sets queue `q`'s `used_event`: with EVENT_IDX the device interrupts
    /// only when its used index passes it.
    pub fn set_used_event(&self, q: usize, value: u16) -> Result<(), Error> {
        let queue = self.queues.get(q).ok_or(Error::NoQueue(q))?;
        self.ram
            .memory()
            .store(
                value,
                GuestAddress(queue.used_event_addr()),
                Ordering::Release,
            )
            .map_err(Error::Memory)
    }

    /// Queue `q`'s `avail_event` as the device last published it.
    pub fn avail_event(&self, q: usize) -> Result<u16, Error> {
        let queue = self.queues.get(q).ok_or(Error::NoQueue(q))?;
        self.ram
            .memory()
            .load(GuestAddress(queue.avail_event_addr()), Ordering::Acquire)
            .map_err(Error::Memory)
    }

    /// Queue `q`'s available index (chains made available so far).
    pub fn avail_idx(&self, q: usize) -> Result<u16, Error> {
        Ok(self.queues.get(q).ok_or(Error::NoQueue(q))?.avail_idx)
    }

    /// Queue `q`'s used index as the device last published it in guest RAM
    /// (chains it used so far, counted modulo 2^16).
    pub fn used_idx(&self, q: usize) -> Result<u16, Error> {
        let queue = self.queues.get(q).ok_or(Error::NoQueue(q))?;
        self.ram
            .memory()
            .load(GuestAddress(queue.used + 2), Ordering::Acquire)
            .map_err(Error::Memory)
    }

    /// Interrupts the device raised so far.
    pub fn interrupts(&self) -> u64 {
        self.irq.count()
    }

    /// Waits until the device raised more than `seen` interrupts; returns
    /// the count, or `None` after `timeout`.
    pub fn wait_interrupt_beyond(&self, seen: u64, timeout: Duration) -> Option<u64> {
        self.irq.wait_beyond(seen, timeout)
    }

    /// Collects chain `head` of queue `q` if the device has used it, without
    /// waiting or looking at interrupts; returns the length it wrote.
    pub fn poll(&mut self, q: usize, head: u16) -> Result<Option<u32>, Error> {
        self.reap(q)?;
        Ok(self.collect(q, head))
    }

    /// Takes a used chain `head` out of queue `q`'s completions.
    fn collect(&mut self, q: usize, head: u16) -> Option<u32> {
        let queue = self.queues.get_mut(q)?;
        let (len, held) = queue.done.remove(&head)?;
        queue.free.extend(held.ids);
        if let (Some(pool), Some(t)) = (self.indirect.as_mut(), held.table) {
            pool.free.push(t);
        }
        Some(len)
    }

    /// Collects completions from the used ring of `q`.
    fn reap(&mut self, q: usize) -> Result<(), Error> {
        let mem = self.ram.memory();
        let queue = self.queues.get_mut(q).ok_or(Error::NoQueue(q))?;
        let used_idx: u16 = mem
            .load(GuestAddress(queue.used + 2), Ordering::Acquire)
            .map_err(Error::Memory)?;
        while queue.used_seen != used_idx {
            let at = queue.used + 4 + 8 * u64::from(queue.used_seen % queue.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).map_err(Error::Memory)?;
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).map_err(Error::Memory)?;
            let head = u16::try_from(id).map_err(|_| Error::BogusUsed(id))?;
            let held = queue.in_flight.remove(&head).ok_or(Error::BogusUsed(id))?;
            queue.done.insert(head, (len, held));
            queue.used_seen = queue.used_seen.wrapping_add(1);
        }
        Ok(())
    }

    /// Waits (sleeping on the interrupt) until chain `head` of queue `q` is
    /// used; returns the length the device wrote.
    pub fn wait(&mut self, q: usize, head: u16) -> Result<u32, Error> {
        let deadline = Instant::now() + self.timeout;
        let event_idx = self.features & F_EVENT_IDX != 0;
        loop {
            if let Some(len) = self.poll(q, head)? {
                return Ok(len);
            }
            if event_idx {
                // Ask for an interrupt at the next used entry, then look
                // once more: one used in between would not interrupt. If
                // that look collected other chains, `used_event` is behind
                // again (a device that already passed it stays quiet):
                // repeat until nothing new was used.
                loop {
                    let seen = self.queues.get(q).ok_or(Error::NoQueue(q))?.used_seen;
                    self.set_used_event(q, seen)?;
                    std::sync::atomic::fence(Ordering::SeqCst);
                    if let Some(len) = self.poll(q, head)? {
                        return Ok(len);
                    }
                    if self.queues.get(q).is_some_and(|x| x.used_seen == seen) {
                        break;
                    }
                }
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or(Error::Timeout)?;
            match self.irq.wait_beyond(self.irq_seen, left) {
                Some(n) => {
                    self.irq_seen = n;
                    let cause = self.reg(regs::INTERRUPT_STATUS)?;
                    self.set_reg(regs::INTERRUPT_ACK, cause)?;
                    // Only a configuration-change interrupt can announce
                    // DEVICE_NEEDS_RESET; a used-buffer one costs no Status read.
                    if cause & regs::INT_CONFIG != 0 {
                        let s = self.status()?;
                        if s & status::NEEDS_RESET != 0 {
                            return Err(Error::NeedsReset(s));
                        }
                    }
                }
                None => return Err(Error::Timeout),
            }
        }
    }

    /// Submits one chain, notifies, and waits for it.
    pub fn request(&mut self, q: usize, bufs: &[Buffer]) -> Result<u32, Error> {
        let head = self.submit(q, bufs)?;
        self.notify(q)?;
        self.wait(q, head)
    }

    /// Resets the device (status 0).
    pub fn reset(&mut self) -> Result<(), Error> {
        self.set_reg(regs::STATUS, 0)
    }
}

mod devices;
mod registers;
mod types;

use registers::regs;
pub use registers::status;
pub use types::{Buffer, DriverOptions, GuestAllocator, Notifications};
use types::{DriverQueue, Held, IndirectPool};

pub use devices::{blk, rng_read, BlkClient};
