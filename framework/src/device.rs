//! What a device model implements: the [`Device`] trait and [`Region`] descriptions.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use outboard_protocol::control::{
    DeviceKind, RegionInfo, REGION_FAST_MMIO, REGION_PIO, REGION_POSTED_WRITES,
    REGION_PREFERRED_ADDR, REGION_READ, REGION_WRITE,
};
use outboard_protocol::AccessSize;

/// Which guest address space a region lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// Memory-mapped I/O.
    Mmio,
    /// x86 port I/O.
    Pio,
}

/// One region a device offers: a window of guest address space whose
/// accesses arrive at [`Device::read`] and [`Device::write`] with an offset
/// relative to the region start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Name shown to the frontend and in logs (at most 32 bytes).
    pub name: String,
    /// Address space.
    pub space: Space,
    /// Size in bytes.
    pub size: u64,
    /// The guest may read.
    pub readable: bool,
    /// The guest may write.
    pub writable: bool,
    /// Writes may be posted (the device's writes have no result the guest waits for).
    pub posted_writes: bool,
    /// FAST_MMIO region: write-only, writes only ring doorbells.
    pub fast_mmio: bool,
    /// Allowed access sizes as a mask (bit n = `1 << n` bytes).
    pub access_sizes: u8,
    /// Address the device would like to be placed at, if any.
    pub preferred_addr: Option<u64>,
}

impl Region {
    fn new(name: &str, space: Space, size: u64) -> Self {
        Region {
            name: name.to_owned(),
            space,
            size,
            readable: true,
            writable: true,
            posted_writes: false,
            fast_mmio: false,
            access_sizes: 0x0f,
            preferred_addr: None,
        }
    }

    /// A read-write MMIO region accepting every access size.
    pub fn mmio(name: &str, size: u64) -> Self {
        Region::new(name, Space::Mmio, size)
    }

    /// A read-write port I/O region accepting every access size.
    pub fn pio(name: &str, size: u64) -> Self {
        Region::new(name, Space::Pio, size)
    }

    /// Restricts the access sizes the region accepts.
    pub fn access_sizes(mut self, sizes: &[AccessSize]) -> Self {
        self.access_sizes = sizes.iter().fold(0, |m, s| m | s.mask_bit());
        self
    }

    /// Declares that writes may be posted.
    pub fn posted_writes(mut self) -> Self {
        self.posted_writes = true;
        self
    }

    /// Makes the region read-only.
    pub fn read_only(mut self) -> Self {
        self.writable = false;
        self
    }

    /// Makes the region a FAST_MMIO region: write-only, and its writes only
    /// ever ring doorbells (a write no doorbell matches is dropped by the
    /// frontend). Declare a sizeless [`Doorbell`] in it.
    pub fn fast_mmio(mut self) -> Self {
        self.fast_mmio = true;
        self.readable = false;
        self
    }

    /// Makes the region write-only.
    pub fn write_only(mut self) -> Self {
        self.readable = false;
        self
    }

    /// Asks to be placed at `addr` unless the frontend's configuration says otherwise.
    pub fn preferred_addr(mut self, addr: u64) -> Self {
        self.preferred_addr = Some(addr);
        self
    }

    /// True when an access of `size` at `offset` fits the region and its size mask.
    pub fn allows(&self, offset: u64, size: AccessSize) -> bool {
        self.access_sizes & size.mask_bit() != 0
            && offset
                .checked_add(size.bytes())
                .is_some_and(|end| end <= self.size)
    }

    /// The wire description of this region at `index`.
    pub fn to_info(&self, index: u32) -> RegionInfo {
        let mut flags = 0;
        for (set, bit) in [
            (self.space == Space::Pio, REGION_PIO),
            (self.readable, REGION_READ),
            (self.writable, REGION_WRITE),
            (self.posted_writes, REGION_POSTED_WRITES),
            (self.fast_mmio, REGION_FAST_MMIO),
            (self.preferred_addr.is_some(), REGION_PREFERRED_ADDR),
        ] {
            if set {
                flags |= bit;
            }
        }
        RegionInfo {
            index,
            flags,
            size: self.size,
            preferred_addr: self.preferred_addr.unwrap_or(0),
            access_sizes: self.access_sizes,
            name: self.name.clone(),
        }
    }
}

/// Guest memory as a backend sees it: the frontend's memory table, mapped
/// from its memfds. The runtime swaps in a new table atomically when the
/// frontend sends one; take a fresh `memory()` snapshot per request.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// A doorbell the device declares: a guest write the frontend turns into an
/// eventfd signal (ioeventfd semantics) instead of a data command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Doorbell {
    /// Region the doorbell lives in.
    pub region: u32,
    /// Offset in the region.
    pub offset: u64,
    /// Access size that matches; `None` matches any size and ignores the data.
    pub size: Option<AccessSize>,
    /// Only writes of this value ring the doorbell; others go down the data socket.
    pub datamatch: Option<u64>,
}

/// An interrupt line the device declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupt {
    /// Level-triggered: the frontend hands a resample eventfd that fires
    /// after the guest's end of interrupt (KVM_IRQFD_FLAG_RESAMPLE semantics),
    /// and the device re-raises the line if its condition still holds.
    pub level: bool,
}

/// The device's end of an interrupt line (irqfd semantics). The device only
/// signals it; whether KVM or a userspace loop consumes it is not its business.
#[derive(Debug, Clone)]
pub struct InterruptLine(Arc<EventFd>);

impl InterruptLine {
    /// Wraps the eventfd the frontend passed for this line.
    pub fn new(fd: EventFd) -> Self {
        InterruptLine(Arc::new(fd))
    }

    /// Raises the line (edge) or asserts it (level).
    pub fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// What the runtime does with a device fd after [`Device::handle_event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// Keep watching the fd.
    Keep,
    /// Stop watching the fd (it reached end of file, say).
    Remove,
    /// The device's set of fds changed (a connection was accepted or
    /// closed): ask [`Device::event_fds`] again and watch exactly those.
    Rescan,
}

/// A device model served by the Outboard runtime.
///
/// The runtime calls these methods from its single event-loop thread, one at
/// a time, in the order the guest's accesses arrived on each data socket.
/// Accesses that do not fit a region (outside it, a size the region does not
/// allow, or a direction it does not permit) are filtered out before they
/// reach the device: reads of them return all-ones and writes are dropped.
pub trait Device {
    /// Human-readable device name (at most 64 bytes).
    fn name(&self) -> &str;

    /// What kind of device this is.
    fn kind(&self) -> DeviceKind {
        DeviceKind::OTHER
    }

    /// The regions the device offers; their indices are positions in this list.
    /// Called once, at start-up.
    fn regions(&self) -> Vec<Region>;

    /// A guest read of `size` bytes at `offset` into region `region`.
    fn read(&mut self, region: u32, offset: u64, size: AccessSize) -> u64;

    /// A guest write of `value` (already truncated to `size`) at `offset` into region `region`.
    fn write(&mut self, region: u32, offset: u64, size: AccessSize, value: u64);

    /// A read by vCPU `vcpu` (`None`: no particular vCPU, or the frontend
    /// did not say). Devices that care which vCPU accesses them (an
    /// interrupt controller's per-CPU banks) override this; the default
    /// forwards to [`Device::read`].
    fn read_from(&mut self, vcpu: Option<u32>, region: u32, offset: u64, size: AccessSize) -> u64 {
        let _ = vcpu;
        self.read(region, offset, size)
    }

    /// A write by vCPU `vcpu`; the default forwards to [`Device::write`].
    fn write_from(
        &mut self,
        vcpu: Option<u32>,
        region: u32,
        offset: u64,
        size: AccessSize,
        value: u64,
    ) {
        let _ = vcpu;
        self.write(region, offset, size, value)
    }

    /// Return to the power-on state.
    fn reset(&mut self);

    /// The device's own fds (input sources, timers) the event loop should
    /// watch for readability. Called at start-up and after
    /// [`EventOutcome::Rescan`].
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// The fd at `index` of [`Device::event_fds`] is readable (or hung up).
    fn handle_event(&mut self, index: usize) -> EventOutcome {
        let _ = index;
        EventOutcome::Remove
    }

    /// True (once) when [`Device::event_fds`] would now return a different
    /// set because of something other than an event on one of them (the
    /// guest drained input the device had stopped reading, say). The runtime
    /// asks after every doorbell and re-watches the new set.
    fn fds_changed(&mut self) -> bool {
        false
    }

    /// Doorbells the device declares, indexed by position. Called once, at start-up.
    fn doorbells(&self) -> Vec<Doorbell> {
        Vec::new()
    }

    /// Doorbell `index` rang `count` times since the last call (coalesced).
    fn doorbell(&mut self, index: usize, count: u64) {
        let _ = (index, count);
    }

    /// Interrupt lines the device declares, indexed by position. Called once, at start-up.
    fn interrupts(&self) -> Vec<Interrupt> {
        Vec::new()
    }

    /// The frontend connected interrupt line `index`; it may do so again
    /// with a new eventfd, which replaces the old one.
    fn connect_interrupt(&mut self, index: usize, line: InterruptLine) {
        let _ = (index, line);
    }

    /// The guest ended a level interrupt on line `index`: re-raise it if its
    /// condition still holds.
    fn resample(&mut self, index: usize) {
        let _ = index;
    }

    /// The guest memory handle, given once at start-up (empty until the
    /// frontend sends a memory table; later tables replace its contents).
    fn set_memory(&mut self, mem: GuestMemory) {
        let _ = mem;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_when_access_crosses_end_then_false() {
        let r = Region::mmio("r", 8).access_sizes(&[AccessSize::B4]);
        assert!(r.allows(4, AccessSize::B4));
        assert!(!r.allows(5, AccessSize::B4));
        assert!(!r.allows(0, AccessSize::B8));
        assert!(!r.allows(u64::MAX, AccessSize::B4));
    }

    #[test]
    fn to_info_when_pio_with_preferred_addr_then_flags_set() {
        let i = Region::pio("uart", 8)
            .access_sizes(&[AccessSize::B1])
            .posted_writes()
            .preferred_addr(0x3f8)
            .to_info(0);
        assert_eq!(
            i.flags,
            REGION_PIO | REGION_READ | REGION_WRITE | REGION_POSTED_WRITES | REGION_PREFERRED_ADDR
        );
        assert_eq!(i.access_sizes, 1);
        assert_eq!(i.preferred_addr, 0x3f8);
    }
}
