//! [`MmioTransport`]: the register file and its access rules.

use log::debug;
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK};
use virtio_bindings::virtio_mmio::*;

use crate::device::{QueueConfig, TransportDevice};
use crate::{MAGIC_VALUE, MMIO_SIZE, TRANSPORT_VERSION, VENDOR_ID};

/// The register state of one virtio-mmio device (see the crate docs for the
/// rules it enforces). It holds no device: every method that may reach the
/// device takes it as `dev`.
#[derive(Debug, Clone)]
pub struct MmioTransport {
    pub(crate) queues: Vec<QueueConfig>,
    pub(crate) max_sizes: Vec<u16>,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_sel: u32,
    pub(crate) status: u32,
    pub(crate) interrupt_status: u32,
    pub(crate) config_generation: u32,
}

/// All-ones at an access width of `size` bytes (a full `u64` for sizes
/// that are not 1, 2 or 4).
fn all_ones(size: u64) -> u64 {
    match size {
        1 | 2 | 4 => (1u64 << (size * 8)) - 1,
        _ => u64::MAX,
    }
}

/// True for the access sizes virtio-mmio knows: 1, 2, 4 and 8 bytes.
fn valid_size(size: u64) -> bool {
    matches!(size, 1 | 2 | 4 | 8)
}

impl MmioTransport {
    /// A transport in its reset state for `dev`, whose
    /// [`TransportDevice::queue_max_sizes`] it reads once.
    pub fn new<D: TransportDevice + ?Sized>(dev: &D) -> Self {
        let max_sizes = dev.queue_max_sizes();
        MmioTransport {
            queues: max_sizes.iter().map(|&n| QueueConfig::new(n)).collect(),
            max_sizes,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// Every queue's layout as the driver set it.
    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// The features the driver wrote (negotiated once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The transport's Status bits, without [`TransportDevice::device_status`].
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The latched InterruptStatus bits, without
    /// [`TransportDevice::interrupt_status`].
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    /// ConfigGeneration.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// A guest read of `size` bytes (1, 2, 4 or 8) at `offset` in the
    /// window. Returns the value in the low `size` bytes.
    pub fn read<D: TransportDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        offset: u64,
        size: u64,
    ) -> u64 {
        if !Self::fits(offset, size) {
            debug!("virtio-mmio: {size}-byte read at {offset:#x} outside the window");
            return all_ones(size);
        }
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            let mut buf = [0u8; 8];
            // `size` is at most 8 (checked by `fits`).
            let n = size as usize;
            dev.read_config(offset - config, &mut buf[..n]);
            return u64::from_le_bytes(buf);
        }
        match Self::register(offset, size) {
            Some(reg) => u64::from(self.read_register(dev, reg)),
            None => all_ones(size),
        }
    }

    /// A guest write of `value` (its low `size` bytes) at `offset`.
    pub fn write<D: TransportDevice + ?Sized>(
        &mut self,
        dev: &mut D,
        offset: u64,
        size: u64,
        value: u64,
    ) {
        if !Self::fits(offset, size) {
            debug!("virtio-mmio: {size}-byte write at {offset:#x} outside the window");
            return;
        }
        let config = u64::from(VIRTIO_MMIO_CONFIG);
        if offset >= config {
            let n = size as usize;
            dev.write_config(offset - config, &value.to_le_bytes()[..n]);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        match Self::register(offset, size) {
            Some(reg) => self.write_register(dev, reg, value as u32),
            None => debug!("virtio-mmio: ignored {size}-byte register write at {offset:#x}"),
        }
    }

    /// True when an access of `size` bytes at `offset` lies inside the window.
    fn fits(offset: u64, size: u64) -> bool {
        valid_size(size) && offset.checked_add(size).is_some_and(|end| end <= MMIO_SIZE)
    }

    /// The register an access names: aligned and 32 bits wide, or none.
    fn register(offset: u64, size: u64) -> Option<u32> {
        if size != 4 || !offset.is_multiple_of(4) {
            return None;
        }
        u32::try_from(offset).ok()
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    fn feature_window(features: u64, sel: u32) -> u32 {
        match sel {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    fn read_register<D: TransportDevice + ?Sized>(&mut self, dev: &mut D, reg: u32) -> u32 {
        match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => TRANSPORT_VERSION,
            VIRTIO_MMIO_DEVICE_ID => dev.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                Self::feature_window(Self::offered(dev), self.device_features_sel)
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected().map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => self.selected().map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status | dev.interrupt_status(),
            VIRTIO_MMIO_STATUS => self.status | dev.device_status(),
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register<D: TransportDevice + ?Sized>(&mut self, dev: &mut D, reg: u32, value: u32) {
        // The queue layout and the driver's features are only writable
        // while the driver sets the device up.
        let setting_up = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        let negotiating = self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
        match reg {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES if negotiating => {
                let v = u64::from(value);
                self.driver_features = match self.driver_features_sel {
                    0 => (self.driver_features & !0xffff_ffff) | v,
                    1 => (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => self.driver_features,
                };
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NOTIFY => match u16::try_from(value) {
                Ok(index) => self.notify(dev, index),
                Err(_) => debug!("virtio-mmio: notify of missing queue {value}"),
            },
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status &= !value;
                dev.interrupt_ack(value);
            }
            VIRTIO_MMIO_STATUS => self.set_status(dev, value),
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
                if setting_up =>
            {
                self.write_queue(reg, value)
            }
            _ => debug!("virtio-mmio: ignored write of {value:#x} to register {reg:#x}"),
        }
    }

    fn write_queue(&mut self, reg: u32, value: u32) {
        let Some(q) = self.queues.get_mut(self.queue_sel as usize) else {
            debug!(
                "virtio-mmio: queue register write for missing queue {}",
                self.queue_sel
            );
            return;
        };
        let set_half = |field: &mut u64, high: bool| {
            let v = u64::from(value);
            *field = if high {
                (*field & 0xffff_ffff) | (v << 32)
            } else {
                (*field & !0xffff_ffff) | v
            };
        };
        match reg {
            VIRTIO_MMIO_QUEUE_NUM if q.accepts_size(value) => q.size = value as u16,
            VIRTIO_MMIO_QUEUE_NUM => debug!("virtio-mmio: ignored queue size {value}"),
            VIRTIO_MMIO_QUEUE_READY => q.ready = value == 1,
            VIRTIO_MMIO_QUEUE_DESC_LOW => set_half(&mut q.desc, false),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => set_half(&mut q.desc, true),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => set_half(&mut q.avail, false),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => set_half(&mut q.avail, true),
            VIRTIO_MMIO_QUEUE_USED_LOW => set_half(&mut q.used, false),
            _ => set_half(&mut q.used, true),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdev::{r, setup, w, DRIVER_OK_STATUS};
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

    #[test]
    fn read_when_identity_registers_then_magic_version_device_vendor() {
        let (mut t, mut d) = setup();
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_DEVICE_ID), 4);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
        assert_eq!(r(&mut t, &mut d, 0x0f0), 0, "unknown register");
    }

    #[test]
    fn device_features_when_window_selected_then_halves_with_version_1() {
        let (mut t, mut d) = setup();
        d.features = 0x1_0000_0005;
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_DEVICE_FEATURES), 5);
        w(&mut t, &mut d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = 1 | (1 << (VIRTIO_F_VERSION_1 - 32));
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_DEVICE_FEATURES), high);
        w(&mut t, &mut d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn driver_features_when_windows_written_then_combined_and_locked_after_features_ok() {
        let (mut t, mut d) = setup();
        d.features = 1;
        w(&mut t, &mut d, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(&mut t, &mut d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, &mut d, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(&mut t, &mut d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 5);
        w(&mut t, &mut d, VIRTIO_MMIO_DRIVER_FEATURES, 0xffff);
        assert_eq!(t.driver_features(), (1 << 32) | 1);
        w(
            &mut t,
            &mut d,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_FEATURES_OK,
        );
        w(&mut t, &mut d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(&mut t, &mut d, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(
            t.driver_features(),
            (1 << 32) | 1,
            "locked after FEATURES_OK"
        );
    }

    #[test]
    fn queue_registers_when_written_then_config_follows_and_out_of_range_select_ignored() {
        let (mut t, mut d) = setup();
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NUM_MAX), 64);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x2);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x3000);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_USED_LOW, 0x4000);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_USED_HIGH, 0x5);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_QUEUE_READY), 1);
        let q = t.queues()[1];
        assert_eq!((q.size, q.ready), (16, true));
        assert_eq!(
            (q.desc, q.avail, q.used),
            (0x2_0000_1000, 0x3000, 0x5_0000_4000)
        );
        assert!(!t.queues()[0].ready);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_SEL, 7);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_QUEUE_READY), 0);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(t.queues().len(), 2);
    }

    #[test]
    fn queue_num_when_invalid_size_then_ignored() {
        let (mut t, mut d) = setup();
        for bad in [0, 3, 16, 1 << 16] {
            w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NUM, bad);
            assert_eq!(t.queues()[0].size, 8, "size {bad}");
        }
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NUM, 4);
        assert_eq!(t.queues()[0].size, 4);
    }

    #[test]
    fn queue_layout_when_driver_ok_then_locked() {
        let (mut t, mut d) = setup();
        d.make_active(&mut t);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NUM, 2);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_READY, 0);
        w(&mut t, &mut d, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x9999);
        let q = t.queues()[0];
        assert_eq!((q.size, q.ready, q.desc), (8, true, 0x1000));
        assert_eq!(t.status() & DRIVER_OK_STATUS, DRIVER_OK_STATUS);
    }

    #[test]
    fn register_when_narrow_or_misaligned_then_all_ones_and_write_ignored() {
        let (mut t, mut d) = setup();
        assert_eq!(t.read(&mut d, 0, 1), 0xff);
        assert_eq!(t.read(&mut d, 0, 2), 0xffff);
        assert_eq!(t.read(&mut d, 0, 8), u64::MAX);
        assert_eq!(t.read(&mut d, 2, 4), 0xffff_ffff);
        t.write(&mut d, u64::from(VIRTIO_MMIO_QUEUE_SEL), 2, 1);
        t.write(&mut d, u64::from(VIRTIO_MMIO_QUEUE_SEL) + 1, 4, 1);
        assert_eq!(
            r(&mut t, &mut d, VIRTIO_MMIO_QUEUE_NUM_MAX),
            8,
            "still queue 0"
        );
    }

    #[test]
    fn access_when_outside_window_or_bad_size_then_all_ones_and_ignored() {
        let (mut t, mut d) = setup();
        assert_eq!(t.read(&mut d, MMIO_SIZE, 4), 0xffff_ffff);
        assert_eq!(t.read(&mut d, MMIO_SIZE - 2, 4), 0xffff_ffff);
        assert_eq!(t.read(&mut d, u64::MAX, 8), u64::MAX);
        assert_eq!(t.read(&mut d, 0, 3), u64::MAX);
        t.write(&mut d, MMIO_SIZE - 1, 2, 0xabcd);
        t.write(&mut d, 0x100, 16, 1);
        assert_eq!(d.config, [0u8; 16]);
        assert_eq!(t.config_generation(), 0);
    }

    #[test]
    fn config_when_accessed_then_little_endian_any_size_and_writes_bump_generation() {
        let (mut t, mut d) = setup();
        d.config[..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(t.read(&mut d, 0x100, 8), 0x1122_3344_5566_7788);
        assert_eq!(t.read(&mut d, 0x101, 1), 0x77);
        assert_eq!(t.read(&mut d, 0x102, 2), 0x5566);
        t.write(&mut d, 0x104, 4, 0xdead_beef);
        assert_eq!(&d.config[4..8], &0xdead_beefu32.to_le_bytes());
        t.write(&mut d, 0x108, 1, 0x1ff);
        assert_eq!(d.config[8], 0xff, "only the low byte");
        assert_eq!(r(&mut t, &mut d, VIRTIO_MMIO_CONFIG_GENERATION), 2);
        assert_eq!(
            t.read(&mut d, MMIO_SIZE - 8, 8),
            0,
            "past the device's config"
        );
    }
}

/// The driver-visible register state of an [`MmioTransport`], for saving a
/// device and restoring it in another process (InterruptStatus is left
/// out: a restored device raises a used-buffer interrupt instead, which a
/// driver must tolerate as spurious).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registers {
    /// Every queue's layout.
    pub queues: Vec<QueueConfig>,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// DriverFeatures, both halves.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
}

impl MmioTransport {
    /// The register state.
    pub fn registers(&self) -> Registers {
        Registers {
            queues: self.queues.clone(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
        }
    }

    /// Takes over saved register state without calling the device (the
    /// caller activates it). Refused, leaving the transport unchanged,
    /// when the queues do not match this device's: their number, their
    /// maximum sizes, or a size the device would not have accepted.
    pub fn set_registers(&mut self, r: Registers) -> Result<(), &'static str> {
        if r.queues.len() != self.queues.len() {
            return Err("another number of queues");
        }
        for (q, max) in r.queues.iter().zip(&self.max_sizes) {
            let mine = QueueConfig::new(*max);
            if q.max_size != mine.max_size || !mine.accepts_size(u32::from(q.size)) {
                return Err("a queue size this device does not accept");
            }
        }
        self.queues = r.queues;
        self.device_features_sel = r.device_features_sel;
        self.driver_features_sel = r.driver_features_sel;
        self.driver_features = r.driver_features;
        self.queue_sel = r.queue_sel;
        self.status = r.status;
        self.config_generation = r.config_generation;
        self.interrupt_status = 0;
        Ok(())
    }
}
