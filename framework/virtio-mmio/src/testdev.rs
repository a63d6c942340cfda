//! A device for the unit tests: records what the transport asks of it.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;

use crate::{MmioTransport, QueueConfig, TransportDevice};

/// Status after a successful initialization.
pub const DRIVER_OK_STATUS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK;

/// A transport over a dummy with two queues (maximum sizes 8 and 64).
pub fn setup() -> (MmioTransport, Dummy) {
    let dev = Dummy::new(&[8, 64]);
    (MmioTransport::new(&dev), dev)
}

/// A 32-bit register write.
pub fn w(t: &mut MmioTransport, d: &mut Dummy, reg: u32, v: u32) {
    t.write(d, u64::from(reg), 4, u64::from(v));
}

/// A 32-bit register read.
pub fn r(t: &mut MmioTransport, d: &mut Dummy, reg: u32) -> u32 {
    t.read(d, u64::from(reg), 4) as u32
}

/// The error the dummy reports when told to fail.
#[derive(Debug)]
pub struct Failure;

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dummy failure")
    }
}

impl std::error::Error for Failure {}

#[derive(Debug, Default)]
pub struct Dummy {
    pub max_sizes: Vec<u16>,
    pub features: u64,
    pub config: [u8; 16],
    pub activated: Vec<(u64, Vec<QueueConfig>)>,
    pub resets: usize,
    pub notified: Vec<u16>,
    pub interrupts: Vec<u32>,
    pub acked: Vec<u32>,
    pub external_interrupts: u32,
    pub external_status: u32,
    pub fail_activate: bool,
    pub fail_notify: bool,
    pub notify_uses: bool,
}

impl Dummy {
    pub fn new(max_sizes: &[u16]) -> Self {
        Dummy {
            max_sizes: max_sizes.to_vec(),
            ..Dummy::default()
        }
    }

    /// Negotiates VERSION_1, readies queue 0 at 0x1000/0x2000/0x3000 and sets DRIVER_OK.
    pub fn make_active(&mut self, t: &mut MmioTransport) {
        let mut w = |reg: u32, v: u32| t.write(self, u64::from(reg), 4, u64::from(v));
        w(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(VIRTIO_MMIO_DRIVER_FEATURES, 1 << (VIRTIO_F_VERSION_1 - 32));
        w(
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        w(VIRTIO_MMIO_QUEUE_SEL, 0);
        w(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        w(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        w(VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        w(VIRTIO_MMIO_QUEUE_READY, 1);
        w(VIRTIO_MMIO_STATUS, DRIVER_OK_STATUS);
    }
}

impl TransportDevice for Dummy {
    type Error = Failure;

    fn device_type(&self) -> u32 {
        4
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.max_sizes.clone()
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get_mut(o + i))
            {
                *slot = *b;
            }
        }
    }

    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), Failure> {
        self.activated.push((features, queues.to_vec()));
        if self.fail_activate {
            Err(Failure)
        } else {
            Ok(())
        }
    }

    fn reset(&mut self) {
        self.resets += 1;
    }

    fn queue_notify(&mut self, index: u16) -> Result<bool, Failure> {
        self.notified.push(index);
        if self.fail_notify {
            Err(Failure)
        } else {
            Ok(self.notify_uses)
        }
    }

    fn interrupt(&mut self, bits: u32) {
        self.interrupts.push(bits);
    }

    fn interrupt_status(&self) -> u32 {
        self.external_interrupts
    }

    fn interrupt_ack(&mut self, bits: u32) {
        self.acked.push(bits);
        self.external_interrupts &= !bits;
    }

    fn device_status(&self) -> u32 {
        self.external_status
    }
}
