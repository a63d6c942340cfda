//! What a device model implements: the [`Device`] trait, its
//! [`DeviceDescription`] and the [`Region`]s, [`Doorbell`]s and
//! [`Interrupt`]s it declares.

use std::io;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use outboard_protocol::control::{
    self, DeviceKind, RegionInfo, REGION_FAST_MMIO, REGION_PIO, REGION_POSTED_WRITES,
    REGION_PREFERRED_ADDR, REGION_READ, REGION_WRITE,
};
use outboard_protocol::{Access, AccessSize, Space};

use crate::events::EventOps;

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

    /// Raises the line (edge) or asserts it (level). Never blocks: the
    /// frontend shares the eventfd's open file description and may have
    /// cleared `O_NONBLOCK` and filled the counter; a full counter is an
    /// interrupt still pending, so there is nothing to add.
    pub fn trigger(&self) -> io::Result<()> {
        match outboard_protocol::wait::signal_eventfd(&*self.0) {
            Ok(_) => Ok(()),
            Err(outboard_protocol::wait::Error::Io(e)) => Err(e),
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

/// Why a [`DeviceDescription`] cannot be served.
#[derive(Debug, Error)]
pub enum DescriptionError {
    /// device declares {0} regions, more than the protocol can index
    #[error("device declares {0} regions, more than the protocol can index")]
    TooManyRegions(usize),
    /// device name is invalid
    #[error("device name is invalid")]
    BadName(#[source] control::Error),
    /// device region {index} is invalid
    #[error("device region {index} is invalid")]
    BadRegion {
        /// Index of the offending region.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: control::Error,
    },
    /// device doorbell {0} does not fit its region
    #[error("device doorbell {0} does not fit its region")]
    BadDoorbell(usize),
}

/// Everything the frontend learns about a device, described once by
/// [`Device::describe`]. Indices of regions, doorbells and interrupt lines
/// are their positions in these lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescription {
    /// Human-readable device name (at most 64 bytes).
    pub name: String,
    /// What kind of device this is.
    pub kind: DeviceKind,
    /// The regions the device offers.
    pub regions: Vec<Region>,
    /// Doorbells the device declares.
    pub doorbells: Vec<Doorbell>,
    /// Interrupt lines the device declares.
    pub interrupts: Vec<Interrupt>,
    /// The device reaches guest memory (virtio queues, DMA). Only then does
    /// the runtime offer `F_MEM_TABLE` and call [`Device::set_memory`]: a
    /// device that does not need guest RAM never gets it.
    pub needs_memory: bool,
}

impl DeviceDescription {
    /// A device called `name` of kind [`DeviceKind::OTHER`] with nothing
    /// declared yet.
    pub fn new(name: impl Into<String>) -> Self {
        DeviceDescription {
            name: name.into(),
            kind: DeviceKind::OTHER,
            regions: Vec::new(),
            doorbells: Vec::new(),
            interrupts: Vec::new(),
            needs_memory: false,
        }
    }

    /// Sets the kind.
    pub fn kind(mut self, kind: DeviceKind) -> Self {
        self.kind = kind;
        self
    }

    /// Adds a region (its index is the number of regions before it).
    pub fn region(mut self, region: Region) -> Self {
        self.regions.push(region);
        self
    }

    /// Adds a doorbell.
    pub fn doorbell(mut self, doorbell: Doorbell) -> Self {
        self.doorbells.push(doorbell);
        self
    }

    /// Adds an interrupt line.
    pub fn interrupt(mut self, interrupt: Interrupt) -> Self {
        self.interrupts.push(interrupt);
        self
    }

    /// Declares that the device needs guest memory.
    pub fn needs_memory(mut self) -> Self {
        self.needs_memory = true;
        self
    }

    /// Checks what the protocol requires of a description: valid names,
    /// regions with a size and known access sizes, and doorbells whose
    /// access their region allows (a sizeless one: an offset inside its
    /// region and no datamatch).
    pub fn validate(&self) -> Result<(), DescriptionError> {
        if u32::try_from(self.regions.len()).is_err() {
            return Err(DescriptionError::TooManyRegions(self.regions.len()));
        }
        control::check_name(&self.name, control::DEVICE_NAME_LEN)
            .map_err(DescriptionError::BadName)?;
        for (index, r) in self.regions.iter().enumerate() {
            control::check_name(&r.name, control::REGION_NAME_LEN)
                .map_err(|source| DescriptionError::BadRegion { index, source })?;
            if r.size == 0 || r.access_sizes == 0 || r.access_sizes & !0x0f != 0 {
                return Err(DescriptionError::BadRegion {
                    index,
                    source: control::Error::AccessSizes(r.access_sizes),
                });
            }
        }
        for (i, d) in self.doorbells.iter().enumerate() {
            let fits = self
                .regions
                .get(d.region as usize)
                .is_some_and(|r| match d.size {
                    Some(size) => r.allows(d.offset, size),
                    None => d.offset < r.size,
                });
            if !fits || (d.size.is_none() && d.datamatch.is_some()) {
                return Err(DescriptionError::BadDoorbell(i));
            }
        }
        Ok(())
    }
}

/// A device model served by the Outboard runtime.
///
/// The runtime calls these methods from its single event-loop thread, one at
/// a time, in the order the guest's accesses arrived on each data socket.
/// Accesses that do not fit a region (outside it, a size the region does not
/// allow, or a direction it does not permit) are filtered out before they
/// reach the device: reads of them return all-ones and writes are dropped.
pub trait Device {
    /// The device's name, kind, regions, doorbells, interrupt lines and
    /// whether it needs guest memory. Called once, at start-up.
    fn describe(&self) -> DeviceDescription;

    /// A guest read: `access` names the region, the offset in it, the width
    /// and the vCPU when the frontend said. Returns the value read.
    fn read(&mut self, access: Access) -> u64;

    /// A guest write of `value`, already truncated to `access.size`.
    fn write(&mut self, access: Access, value: u64);

    /// Return to the power-on state.
    fn reset(&mut self);

    /// Called once before serving: register the device's own fds (input
    /// sources, timers) with `ops`, and keep a clone of it to change them
    /// later. An error stops the backend from starting.
    fn init(&mut self, ops: &EventOps) -> io::Result<()> {
        let _ = ops;
        Ok(())
    }

    /// The fd registered as `id` is readable (or hung up).
    fn handle_event(&mut self, id: u32, ops: &EventOps) {
        let _ = (id, ops);
    }

    /// Doorbell `index` rang `count` times since the last call (coalesced).
    fn doorbell(&mut self, index: usize, count: u64) {
        let _ = (index, count);
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

    /// The guest memory handle, given once at start-up to a device whose
    /// description says it needs memory (empty until the frontend sends a
    /// memory table; later tables replace its contents).
    fn set_memory(&mut self, mem: GuestMemory) {
        let _ = mem;
    }

    /// The device's state for a restart or live upgrade (see
    /// [`crate::state`]), or `None` (the default) for a device whose
    /// restart is a fresh instance. Called after every access or event
    /// that moved [`Device::state_generation`], before the access is
    /// answered: keep it small.
    fn save(&self) -> Option<crate::state::DeviceState> {
        None
    }

    /// Takes over state saved by [`Device::save`] (of this device, maybe
    /// by an older binary: check the version). Called after the memory
    /// table, doorbells, interrupt lines and regions were set again.
    fn restore(&mut self, state: &crate::state::DeviceState) -> Result<(), crate::state::Error> {
        let _ = state;
        Err(crate::state::Error::Unsupported)
    }

    /// Stop all work of the device's own (queue threads, timers): a live
    /// upgrade is about to save the state and hand the device to another
    /// process. Only [`Device::save`] is called afterwards.
    fn pause(&mut self) {}

    /// A number that changes whenever the state [`Device::save`] returns
    /// does (a counter is enough); the runtime commits state only then.
    fn state_generation(&self) -> u64 {
        0
    }

    /// System calls (`libc::SYS_*`) the device makes while serving, beyond
    /// the framework's own ([`crate::sandbox::BASE_SYSCALLS`]): the
    /// confined backend's seccomp allowlist adds these and nothing else.
    fn syscalls(&self) -> &'static [i64] {
        &[]
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

    fn described() -> DeviceDescription {
        DeviceDescription::new("dev")
            .region(Region::mmio("regs", 16))
            .doorbell(Doorbell {
                region: 0,
                offset: 8,
                size: Some(AccessSize::B4),
                datamatch: Some(1),
            })
    }

    #[test]
    fn validate_when_well_formed_then_ok() {
        let d = described()
            .interrupt(Interrupt { level: true })
            .needs_memory();
        assert!(d.validate().is_ok());
        assert!(d.needs_memory);
        assert_eq!(d.kind, DeviceKind::OTHER);
    }

    #[test]
    fn validate_when_doorbell_outside_region_or_sizeless_with_datamatch_then_refused() {
        let mut d = described();
        d.doorbells[0].offset = 14;
        assert!(matches!(
            d.validate(),
            Err(DescriptionError::BadDoorbell(0))
        ));
        d.doorbells[0] = Doorbell {
            region: 0,
            offset: 0,
            size: None,
            datamatch: Some(3),
        };
        assert!(matches!(
            d.validate(),
            Err(DescriptionError::BadDoorbell(0))
        ));
        d.doorbells[0].region = 1;
        assert!(matches!(
            d.validate(),
            Err(DescriptionError::BadDoorbell(0))
        ));
    }

    #[test]
    fn validate_when_names_or_regions_bad_then_refused() {
        let long = "x".repeat(65);
        assert!(matches!(
            DeviceDescription::new(long).validate(),
            Err(DescriptionError::BadName(_))
        ));
        let mut d = described();
        d.regions[0].size = 0;
        assert!(matches!(
            d.validate(),
            Err(DescriptionError::BadRegion { index: 0, .. })
        ));
        let mut d = described();
        d.regions[0].access_sizes = 0x10;
        assert!(d.validate().is_err());
    }
}
