//! The same device model inside the VMM: an in-process adapter.
//!
//! A [`Device`] written for an Outboard backend can also run in the VMM's
//! own process, with no isolation and no socket: [`InProcess`] wraps it and
//! hands out one [`outboard_frontend::BusDevice`] per region
//! ([`InProcess::region`]), to put on the same bus a `RemoteRegion` would
//! go on. Accesses are checked against the region exactly as the runtime
//! checks them (permissions, size mask, bounds), doorbell writes call
//! [`Device::doorbell`] directly, and the device is called under one mutex,
//! as the backend's single event loop would call it. This is crosvm's
//! `ProxyDevice` idea turned around: one model, either side of the process
//! boundary, with no serialization format in between. The benchmark's
//! in-process baseline is this adapter around the scratch device.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use outboard_frontend::{AccessError, BusDevice};
use outboard_protocol::Access;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::device::{Device, DeviceDescription, InterruptLine};
use crate::events::EventOps;

/// A device model running in the VMM's process.
#[derive(Debug)]
pub struct InProcess<D> {
    device: Arc<Mutex<D>>,
    description: Arc<DeviceDescription>,
}

impl<D: Device + Send + 'static> InProcess<D> {
    /// Wraps `device` (its `init` is called with detached event ops: an
    /// in-process device's own fds belong to the VMM's loop).
    pub fn new(mut device: D) -> std::io::Result<Self> {
        let description = device.describe();
        device.init(&EventOps::detached())?;
        Ok(InProcess {
            device: Arc::new(Mutex::new(device)),
            description: Arc::new(description),
        })
    }

    /// The device's description.
    pub fn description(&self) -> &DeviceDescription {
        &self.description
    }

    /// The bus device for region `index`, if the device has it.
    pub fn region(&self, index: u32) -> Option<Arc<InProcessRegion<D>>> {
        self.description.regions.get(index as usize)?;
        Some(Arc::new(InProcessRegion {
            device: Arc::clone(&self.device),
            description: Arc::clone(&self.description),
            index,
        }))
    }

    /// Gives the device guest memory, if it asked for it.
    pub fn set_memory(&self, mem: GuestMemoryMmap<()>) {
        if self.description.needs_memory {
            self.lock().set_memory(GuestMemoryAtomic::new(mem));
        }
    }

    /// Connects interrupt line `index` to `line`.
    pub fn connect_interrupt(&self, index: usize, line: InterruptLine) {
        self.lock().connect_interrupt(index, line);
    }

    /// The device itself.
    pub fn lock(&self) -> MutexGuard<'_, D> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One region of an [`InProcess`] device, as a bus device.
#[derive(Debug)]
pub struct InProcessRegion<D> {
    device: Arc<Mutex<D>>,
    description: Arc<DeviceDescription>,
    index: u32,
}

impl<D: Device + Send> InProcessRegion<D> {
    fn access(&self, a: Access, write: bool) -> Result<Access, AccessError> {
        let r = &self.description.regions[self.index as usize];
        let permitted = if write { r.writable } else { r.readable };
        if !permitted || !r.allows(a.offset, a.size) {
            return Err(AccessError::Denied);
        }
        Ok(a.in_region(self.index))
    }
}

impl<D: Device + Send> BusDevice for InProcessRegion<D> {
    fn read(&self, access: Access) -> Result<u64, AccessError> {
        let a = self.access(access, false)?;
        let mut d = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(a.size.truncate(d.read(a)))
    }

    fn write(&self, access: Access, value: u64) -> Result<(), AccessError> {
        let a = self.access(access, true)?;
        let mut d = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        let bell = self.description.doorbells.iter().position(|b| {
            b.region == self.index
                && b.offset == a.offset
                && b.size.is_none_or(|s| s == a.size)
                && b.datamatch.is_none_or(|v| v == value)
        });
        match bell {
            Some(i) => d.doorbell(i, 1),
            None if self.description.regions[self.index as usize].fast_mmio => {}
            None => d.write(a, value),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Doorbell, Region};
    use outboard_protocol::AccessSize;

    #[derive(Default)]
    struct Reg {
        value: u64,
        rings: u64,
    }

    impl Device for Reg {
        fn describe(&self) -> DeviceDescription {
            DeviceDescription::new("reg")
                .region(Region::mmio("r", 16).access_sizes(&[AccessSize::B4, AccessSize::B8]))
                .region(Region::mmio("ro", 8).read_only())
                .doorbell(Doorbell {
                    region: 0,
                    offset: 8,
                    size: Some(AccessSize::B4),
                    datamatch: None,
                })
        }
        fn read(&mut self, a: Access) -> u64 {
            if a.region == 1 {
                return 0x77;
            }
            self.value + self.rings
        }
        fn write(&mut self, _: Access, v: u64) {
            self.value = v;
        }
        fn reset(&mut self) {}
        fn doorbell(&mut self, _: usize, count: u64) {
            self.rings += count;
        }
    }

    #[test]
    fn region_when_accessed_then_checked_like_the_runtime_and_doorbells_called() {
        let dev = InProcess::new(Reg::default()).unwrap_or_else(|e| panic!("{e}"));
        let r0 = dev.region(0).unwrap_or_else(|| panic!("region 0"));
        let r1 = dev.region(1).unwrap_or_else(|| panic!("region 1"));
        assert!(dev.region(2).is_none());
        let a = Access::new(0, 0, AccessSize::B4);
        r0.write(a, 40).unwrap_or_else(|e| panic!("{e}"));
        r0.write(Access::new(0, 8, AccessSize::B4), 9)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            r0.read(a).ok(),
            Some(41),
            "the doorbell rang, the value stayed"
        );
        assert!(matches!(
            r0.read(Access::new(0, 0, AccessSize::B2)),
            Err(AccessError::Denied)
        ));
        assert!(matches!(
            r0.read(Access::new(0, 16, AccessSize::B4)),
            Err(AccessError::Denied)
        ));
        assert!(matches!(r1.write(a, 1), Err(AccessError::Denied)));
        assert_eq!(r1.read(a).ok(), Some(0x77), "region index substituted");
        assert_eq!(dev.lock().value, 40);
    }
}
