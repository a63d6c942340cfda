//! rust-vmm interop: Outboard regions as vm-device devices.
//!
//! A VMM built on vm-device's `IoManager` registers a [`RemoteRegion`] (or
//! any [`BusDevice`]) with `register_mmio_resources`/`register_pio_resources`
//! and dispatches its exits as usual. vm-device hands over bytes; this
//! adapter turns them into one [`Access`] of 1, 2, 4 or 8 bytes (other
//! widths read as all-ones and are dropped on write, as a master abort) and
//! back, little endian as the guest sees them.

use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};

use outboard_protocol::{Access, AccessSize};

use crate::bus::BusDevice;
use crate::remote::RemoteRegion;

fn read(dev: &dyn BusDevice, offset: u64, data: &mut [u8]) {
    let value = AccessSize::from_bytes(data.len() as u64)
        .ok()
        .and_then(|size| {
            dev.read(Access::new(0, offset, size))
                .ok()
                .map(|v| size.truncate(v))
        });
    match value {
        Some(v) => data.copy_from_slice(&v.to_le_bytes()[..data.len()]),
        None => data.fill(0xff),
    }
}

fn write(dev: &dyn BusDevice, offset: u64, data: &[u8]) {
    let Ok(size) = AccessSize::from_bytes(data.len() as u64) else {
        return;
    };
    let mut v = [0u8; 8];
    v[..data.len()].copy_from_slice(data);
    let _ = dev.write(Access::new(0, offset, size), u64::from_le_bytes(v));
}

/// Any Outboard [`BusDevice`] as a vm-device MMIO and PIO device.
#[derive(Debug)]
pub struct VmDevice<T>(pub T);

impl<T: BusDevice> DeviceMmio for VmDevice<T> {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        read(&self.0, offset, data);
    }
    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        write(&self.0, offset, data);
    }
}

impl<T: BusDevice> DevicePio for VmDevice<T> {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        read(&self.0, u64::from(offset), data);
    }
    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        write(&self.0, u64::from(offset), data);
    }
}

impl DeviceMmio for RemoteRegion {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        read(self, offset, data);
    }
    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        write(self, offset, data);
    }
}

impl DevicePio for RemoteRegion {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        read(self, u64::from(offset), data);
    }
    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        write(self, u64::from(offset), data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::AccessError;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use vm_device::device_manager::{IoManager, MmioManager, PioManager};
    use vm_device::resources::Resource;

    #[derive(Default)]
    struct Reg(AtomicU64);
    impl BusDevice for Reg {
        fn read(&self, a: Access) -> Result<u64, AccessError> {
            if a.offset >= 8 {
                return Err(AccessError::Denied);
            }
            Ok(self.0.load(Ordering::SeqCst) >> (8 * a.offset))
        }
        fn write(&self, _: Access, v: u64) -> Result<(), AccessError> {
            self.0.store(v, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn io_manager_when_device_registered_then_bytes_round_trip_little_endian() {
        let dev = Arc::new(VmDevice(Reg::default()));
        let mut io = IoManager::new();
        io.register_mmio_resources(
            dev.clone(),
            &[Resource::MmioAddressRange {
                base: 0x1000,
                size: 0x10,
            }],
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        io.register_pio_resources(
            dev,
            &[Resource::PioAddressRange {
                base: 0x60,
                size: 8,
            }],
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        io.mmio_write(MmioAddress(0x1000), &0x1122_3344u32.to_le_bytes())
            .unwrap_or_else(|e| panic!("{e:?}"));
        let mut b = [0u8; 2];
        io.mmio_read(MmioAddress(0x1001), &mut b)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(u16::from_le_bytes(b), 0x2233);
        let mut odd = [0u8; 3];
        io.pio_read(PioAddress(0x60), &mut odd)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(odd, [0xff; 3], "a 3-byte access is a master abort");
        let mut far = [0u8; 1];
        io.mmio_read(MmioAddress(0x1009), &mut far)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(far, [0xff], "a refused access reads all-ones");
    }
}
