//! Guest address spaces: a [`Bus`] maps address ranges to [`BusDevice`]s.
//!
//! One bus per address space (MMIO, PIO). Ranges live in a `BTreeMap` keyed
//! by base address, so finding the range that holds an address is one
//! `range(..=addr).next_back()`: O(log n). Ranges never overlap; removal must
//! name a range exactly.
//!
//! [`Bus::read`] and [`Bus::write`] have master-abort semantics: an access
//! that cannot complete (no range, a failed device, a timeout) reads as
//! all-ones and a write is dropped. [`Bus::try_read`] and [`Bus::try_write`]
//! say why.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, PoisonError, RwLock};

use log::debug;
pub use outboard_protocol::Space;
use outboard_protocol::{ioregionfd, Access, AccessSize};
use thiserror::Error;

/// Why one access did not complete.
#[derive(Debug, Error)]
pub enum AccessError {
    /// no region at {0:#x}
    #[error("no region at {0:#x}")]
    Unmapped(u64),
    /// access of {size} bytes at offset {offset:#x} does not fit the region
    #[error("access of {size} bytes at offset {offset:#x} does not fit the region")]
    OutOfRange {
        /// Offset into the region.
        offset: u64,
        /// Access width in bytes.
        size: u64,
    },
    /// the region does not permit this access
    #[error("the region does not permit this access")]
    Denied,
    /// device {0} has failed
    #[error("device {0} has failed")]
    DeviceFailed(String),
    /// no response within the timeout
    #[error("no response within the timeout")]
    Timeout,
    /// backend closed the data socket
    #[error("backend closed the data socket")]
    BackendGone,
    /// short response: {0} of 32 bytes
    #[error("short response: {0} of 32 bytes")]
    ShortResponse(usize),
    /// garbled response
    #[error("garbled response")]
    Garbled(#[source] ioregionfd::Error),
    /// read response data {data:#x} has bits above the {size}-byte access
    #[error("read response data {data:#x} has bits above the {size}-byte access")]
    Overwide {
        /// The data the backend sent.
        data: u64,
        /// Access width in bytes.
        size: u64,
    },
    /// write response carries data {0:#x}, not zero
    #[error("write response carries data {0:#x}, not zero")]
    WriteData(u64),
    /// data socket I/O failed
    #[error("data socket I/O failed")]
    Io(#[source] io::Error),
    /// the backend corrupted the command ring
    #[error("the backend corrupted the command ring")]
    CorruptRing(#[source] outboard_protocol::ring::Error),
}

/// Why a range could not be added or removed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// {space} range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}
    #[error("{space} range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Address space.
        space: Space,
        /// Base of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
        /// Base of the range already there.
        other_base: u64,
        /// Length of the range already there.
        other_len: u64,
    },
    /// {space} range {base:#x}+{len:#x} is empty or wraps around
    #[error("{space} range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange {
        /// Address space.
        space: Space,
        /// Base of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// no {space} range is exactly {base:#x}+{len:#x}
    #[error("no {space} range is exactly {base:#x}+{len:#x}")]
    NoExactMatch {
        /// Address space.
        space: Space,
        /// Base asked for.
        base: u64,
        /// Length asked for.
        len: u64,
    },
}

/// Something that answers guest accesses to one range.
///
/// The bus hands every access over as an [`Access`]: the offset from the
/// start of the range, the width and the vCPU that made it (when known).
/// The bus does not know region indices and passes 0; a device that serves
/// several ranges substitutes its own.
pub trait BusDevice: Send + Sync {
    /// A read; the result is truncated to the access size by the bus.
    fn read(&self, access: Access) -> Result<u64, AccessError>;
    /// A write of `value` (already truncated to the access size).
    fn write(&self, access: Access, value: u64) -> Result<(), AccessError>;
    /// Returns once every access made before the call has taken effect in
    /// the device (posted writes included). Devices that complete accesses
    /// synchronously have nothing to do.
    fn quiesce(&self) {}
}

#[derive(Clone)]
struct Mapping {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// One guest address space.
pub struct Bus {
    space: Space,
    map: RwLock<BTreeMap<u64, Mapping>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("space", &self.space)
            .field("ranges", &self.ranges())
            .finish()
    }
}

impl Bus {
    /// An empty bus for `space`.
    pub fn new(space: Space) -> Self {
        Bus {
            space,
            map: RwLock::new(BTreeMap::new()),
        }
    }

    /// The address space this bus serves.
    pub fn space(&self) -> Space {
        self.space
    }

    fn end(base: u64, len: u64) -> Option<u64> {
        if len == 0 {
            return None;
        }
        base.checked_add(len - 1)
    }

    /// Checks that `base..base+len` is valid and free.
    pub fn check_free(&self, base: u64, len: u64) -> Result<(), BusError> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        self.check_free_in(&map, base, len)
    }

    fn check_free_in(
        &self,
        map: &BTreeMap<u64, Mapping>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let last = Self::end(base, len).ok_or(BusError::BadRange {
            space: self.space,
            base,
            len,
        })?;
        let overlap = |(&b, m): (&u64, &Mapping)| BusError::Overlap {
            space: self.space,
            base,
            len,
            other_base: b,
            other_len: m.len,
        };
        if let Some((b, m)) = map.range(..=last).next_back() {
            // The closest range starting at or below our last byte must end before our base.
            if b.saturating_add(m.len - 1) >= base {
                return Err(overlap((b, m)));
            }
        }
        Ok(())
    }

    /// Adds a range; fails if it overlaps one already there.
    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        self.check_free_in(&map, base, len)?;
        map.insert(base, Mapping { len, device });
        Ok(())
    }

    /// Removes the range that is exactly `base..base+len`.
    pub fn remove(&self, base: u64, len: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if map.get(&base).is_some_and(|m| m.len == len) {
            if let Some(m) = map.remove(&base) {
                return Ok(m.device);
            }
        }
        Err(BusError::NoExactMatch {
            space: self.space,
            base,
            len,
        })
    }

    /// Every range as `(base, len)`, lowest first.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        map.iter().map(|(&b, m)| (b, m.len)).collect()
    }

    /// The device and offset for an access of `size` bytes at `addr`.
    fn resolve(
        &self,
        addr: u64,
        size: AccessSize,
    ) -> Result<(Arc<dyn BusDevice>, u64), AccessError> {
        let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
        let (base, m) = map
            .range(..=addr)
            .next_back()
            .ok_or(AccessError::Unmapped(addr))?;
        let offset = addr - base;
        if offset >= m.len {
            return Err(AccessError::Unmapped(addr));
        }
        if offset
            .checked_add(size.bytes())
            .is_none_or(|end| end > m.len)
        {
            return Err(AccessError::OutOfRange {
                offset,
                size: size.bytes(),
            });
        }
        Ok((Arc::clone(&m.device), offset))
    }

    /// Reads `size` bytes at `addr`, saying why if it cannot.
    pub fn try_read(&self, addr: u64, size: AccessSize) -> Result<u64, AccessError> {
        self.try_read_by(None, addr, size)
    }

    /// Writes `size` bytes of `value` at `addr`, saying why if it cannot.
    pub fn try_write(&self, addr: u64, size: AccessSize, value: u64) -> Result<(), AccessError> {
        self.try_write_by(None, addr, size, value)
    }

    /// Reads on behalf of vCPU `vcpu` (a KVM exit), saying why if it cannot.
    pub fn try_read_by(
        &self,
        vcpu: Option<u32>,
        addr: u64,
        size: AccessSize,
    ) -> Result<u64, AccessError> {
        let (dev, offset) = self.resolve(addr, size)?;
        dev.read(Access::new(0, offset, size).by(vcpu))
            .map(|v| size.truncate(v))
    }

    /// Writes on behalf of vCPU `vcpu` (a KVM exit), saying why if it cannot.
    pub fn try_write_by(
        &self,
        vcpu: Option<u32>,
        addr: u64,
        size: AccessSize,
        value: u64,
    ) -> Result<(), AccessError> {
        let (dev, offset) = self.resolve(addr, size)?;
        dev.write(Access::new(0, offset, size).by(vcpu), size.truncate(value))
    }

    /// Waits until every device on the bus has served the accesses made so
    /// far ([`BusDevice::quiesce`]); a VMM calls it when the guest stops.
    pub fn quiesce(&self) {
        let devices: Vec<Arc<dyn BusDevice>> = {
            let map = self.map.read().unwrap_or_else(PoisonError::into_inner);
            map.values().map(|m| Arc::clone(&m.device)).collect()
        };
        for d in devices {
            d.quiesce();
        }
    }

    /// Reads `size` bytes at `addr`; all-ones if the access cannot complete.
    pub fn read(&self, addr: u64, size: AccessSize) -> u64 {
        self.try_read(addr, size).unwrap_or_else(|e| {
            debug!(
                "{} read of {} bytes at {addr:#x}: {e}",
                self.space,
                size.bytes()
            );
            size.all_ones()
        })
    }

    /// Writes `size` bytes of `value` at `addr`; dropped if it cannot complete.
    pub fn write(&self, addr: u64, size: AccessSize, value: u64) {
        if let Err(e) = self.try_write(addr, size, value) {
            debug!(
                "{} write of {} bytes at {addr:#x}: {e}",
                self.space,
                size.bytes()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Reg(AtomicU64);
    impl BusDevice for Reg {
        fn read(&self, a: Access) -> Result<u64, AccessError> {
            Ok(self.0.load(Ordering::SeqCst) + a.offset)
        }
        fn write(&self, _: Access, v: u64) -> Result<(), AccessError> {
            self.0.store(v, Ordering::SeqCst);
            Ok(())
        }
    }

    fn reg() -> Arc<dyn BusDevice> {
        Arc::new(Reg(AtomicU64::new(0)))
    }

    #[test]
    fn insert_when_overlapping_then_rejected() {
        let bus = Bus::new(Space::Mmio);
        assert_eq!(bus.insert(0x1000, 0x100, reg()), Ok(()));
        for (b, l) in [(0x1000, 1), (0x10ff, 1), (0xf00, 0x101), (0x0, 0x10000)] {
            assert!(
                matches!(bus.insert(b, l, reg()), Err(BusError::Overlap { .. })),
                "{b:#x}+{l:#x}"
            );
        }
        assert_eq!(bus.insert(0x1100, 0x100, reg()), Ok(()));
        assert_eq!(bus.insert(0xf00, 0x100, reg()), Ok(()));
        assert!(matches!(
            bus.insert(5, 0, reg()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, reg()),
            Err(BusError::BadRange { .. })
        ));
        assert_eq!(bus.insert(u64::MAX, 1, reg()), Ok(()));
    }

    #[test]
    fn remove_when_not_exact_then_rejected() {
        let bus = Bus::new(Space::Pio);
        assert_eq!(bus.insert(0x3f8, 8, reg()), Ok(()));
        assert!(bus.remove(0x3f8, 4).is_err());
        assert!(bus.remove(0x3f9, 8).is_err());
        assert!(bus.remove(0x3f8, 8).is_ok());
        assert!(bus.ranges().is_empty());
    }

    #[test]
    fn access_when_mapped_then_offset_relative_and_unmapped_all_ones() {
        let bus = Bus::new(Space::Mmio);
        assert_eq!(bus.insert(0x1000, 0x10, reg()), Ok(()));
        bus.write(0x1000, AccessSize::B4, 100);
        assert_eq!(bus.read(0x1004, AccessSize::B4), 104);
        assert_eq!(bus.read(0x2000, AccessSize::B2), 0xffff);
        assert!(matches!(
            bus.try_read(0xfff, AccessSize::B1),
            Err(AccessError::Unmapped(0xfff))
        ));
        assert!(matches!(
            bus.try_read(0x100e, AccessSize::B4),
            Err(AccessError::OutOfRange { .. })
        ));
    }

    struct Probe(AtomicU64);
    impl BusDevice for Probe {
        fn read(&self, a: Access) -> Result<u64, AccessError> {
            Ok(u64::from(a.vcpu.unwrap_or(99)))
        }
        fn write(&self, _: Access, _: u64) -> Result<(), AccessError> {
            Ok(())
        }
        fn quiesce(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn quiesce_when_devices_mapped_then_each_quiesced_and_vcpu_passed_through() {
        let bus = Bus::new(Space::Pio);
        let p = Arc::new(Probe(AtomicU64::new(0)));
        assert_eq!(bus.insert(0x10, 4, p.clone()), Ok(()));
        assert_eq!(bus.insert(0x20, 4, p.clone()), Ok(()));
        bus.quiesce();
        assert_eq!(p.0.load(Ordering::SeqCst), 2);
        assert_eq!(bus.try_read_by(Some(3), 0x10, AccessSize::B1).ok(), Some(3));
        assert_eq!(bus.try_read(0x20, AccessSize::B1).ok(), Some(99));
    }
}
