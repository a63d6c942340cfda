//! The device side of the transport: [`TransportDevice`] and the queue
//! layout the driver programs ([`QueueConfig`]).

/// Largest queue size a split virtqueue may have (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Queue size used when a device declares an invalid maximum.
const FALLBACK_QUEUE_SIZE: u16 = 256;

/// One queue as the driver set it up through the QueueSel window.
///
/// Addresses are guest-physical. The driver may change everything but
/// `max_size` until it sets DRIVER_OK; [`TransportDevice::activate`] sees
/// the final layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// QueueNumMax: the largest size the device supports (a power of two).
    pub max_size: u16,
    /// QueueNum: the size the driver chose; `max_size` until it writes one.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc: the descriptor table.
    pub desc: u64,
    /// QueueDriver: the available ring.
    pub avail: u64,
    /// QueueDevice: the used ring.
    pub used: u64,
}

impl QueueConfig {
    /// A queue in its reset state. A `max_size` that is zero, not a power
    /// of two or above [`MAX_QUEUE_SIZE`] becomes 256.
    pub fn new(max_size: u16) -> Self {
        let max_size = if Self::valid_max(max_size) {
            max_size
        } else {
            log::warn!("virtio-mmio: invalid queue size {max_size}; using {FALLBACK_QUEUE_SIZE}");
            FALLBACK_QUEUE_SIZE
        };
        QueueConfig {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    fn valid_max(n: u16) -> bool {
        n.is_power_of_two() && n <= MAX_QUEUE_SIZE
    }

    /// True when the driver may set QueueNum to `size`: a power of two no
    /// larger than `max_size` (split virtqueues need a power of two).
    pub fn accepts_size(&self, size: u32) -> bool {
        size.is_power_of_two() && size <= u32::from(self.max_size)
    }
}

/// What a device behind an [`crate::MmioTransport`] provides.
///
/// The transport calls these methods from inside
/// [`crate::MmioTransport::read`], [`crate::MmioTransport::write`] and its
/// other methods taking the device; none of them may call back into the
/// transport. Hooks with default bodies are optional.
pub trait TransportDevice {
    /// Why activation or a queue notification failed; the transport logs it
    /// with its causes and sets DEVICE_NEEDS_RESET.
    type Error: std::error::Error;

    /// DeviceID: the virtio device type (2 block, 3 console, 4 entropy, ...).
    fn device_type(&self) -> u32;

    /// DeviceFeatures. The transport adds `VIRTIO_F_VERSION_1` itself.
    fn device_features(&self) -> u64;

    /// QueueNumMax of each queue; the length is the number of queues. Read
    /// once, when the transport is created.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Fills `data` from configuration space at `offset` (relative to 0x100).
    fn read_config(&mut self, offset: u64, data: &mut [u8]);

    /// A driver write to configuration space at `offset`. The transport
    /// increments ConfigGeneration afterwards. Ignored by default.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// The driver set DRIVER_OK after negotiating `features`; `queues` is
    /// the layout of every queue (use the ready ones). An error sets
    /// DEVICE_NEEDS_RESET and raises a configuration-change interrupt.
    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), Self::Error>;

    /// Back to the power-on state: the driver wrote 0 to Status or the
    /// owner called [`crate::MmioTransport::reset`]. The transport has
    /// already reset its own registers.
    fn reset(&mut self);

    /// The driver notified queue `index` (an existing, ready queue while
    /// the device is active). `Ok(true)` means buffers were used and the
    /// driver wants to know: the transport latches the used-buffer
    /// interrupt and calls [`TransportDevice::interrupt`]. An error sets
    /// DEVICE_NEEDS_RESET.
    fn queue_notify(&mut self, index: u16) -> Result<bool, Self::Error>;

    /// The transport latched InterruptStatus `bits`
    /// (`VIRTIO_MMIO_INT_VRING`, `VIRTIO_MMIO_INT_CONFIG`): signal the
    /// guest, typically by writing the interrupt eventfd.
    fn interrupt(&mut self, bits: u32) {
        let _ = bits;
    }

    /// InterruptStatus bits pending outside the transport, ORed into the
    /// register: a device whose queues signal the guest directly (a
    /// vhost-user call eventfd) derives them from its own counters.
    fn interrupt_status(&self) -> u32 {
        0
    }

    /// The driver acknowledged `bits` through InterruptACK. The transport
    /// has cleared them from its latched bits; clear them from
    /// [`TransportDevice::interrupt_status`]'s sources too.
    fn interrupt_ack(&mut self, bits: u32) {
        let _ = bits;
    }

    /// Status bits the device side reports beyond the transport's, ORed into
    /// the register (`VIRTIO_CONFIG_S_NEEDS_RESET` from a peer that failed).
    /// Notifications are dropped while it includes DEVICE_NEEDS_RESET.
    fn device_status(&self) -> u32 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_when_max_size_invalid_then_fallback_size() {
        assert_eq!(QueueConfig::new(0).max_size, 256);
        assert_eq!(QueueConfig::new(100).max_size, 256);
        assert_eq!(QueueConfig::new(65535).max_size, 256);
        let q = QueueConfig::new(MAX_QUEUE_SIZE);
        assert_eq!(
            (q.max_size, q.size, q.ready),
            (MAX_QUEUE_SIZE, MAX_QUEUE_SIZE, false)
        );
    }

    #[test]
    fn accepts_size_when_not_power_of_two_or_too_big_then_false() {
        let q = QueueConfig::new(256);
        assert!(q.accepts_size(1));
        assert!(q.accepts_size(256));
        assert!(!q.accepts_size(0));
        assert!(!q.accepts_size(3));
        assert!(!q.accepts_size(512));
        assert!(!q.accepts_size(1 << 20));
    }
}
