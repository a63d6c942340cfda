//! The virtio-mmio (version 2) register layout of virtio 1.2, section 4.2.2.
//!
//! Outboard speaks it on both sides: backends implement it
//! (`outboard::virtio`), the frontend implements it for vhost-user backends,
//! and the test guest's driver uses it. All registers are 32 bits wide,
//! little endian; the device configuration space starts at [`CONFIG`].

/// "virt" in little endian.
pub const MAGIC_VALUE: u64 = 0x000;
/// Transport version (2).
pub const VERSION: u64 = 0x004;
/// Virtio device ID.
pub const DEVICE_ID: u64 = 0x008;
/// Vendor ID.
pub const VENDOR_ID: u64 = 0x00c;
/// Device features, 32 bits selected by DEVICE_FEATURES_SEL.
pub const DEVICE_FEATURES: u64 = 0x010;
/// Selects the device feature word.
pub const DEVICE_FEATURES_SEL: u64 = 0x014;
/// Driver features, 32 bits selected by DRIVER_FEATURES_SEL.
pub const DRIVER_FEATURES: u64 = 0x020;
/// Selects the driver feature word.
pub const DRIVER_FEATURES_SEL: u64 = 0x024;
/// Selects the queue the QUEUE_* registers address.
pub const QUEUE_SEL: u64 = 0x030;
/// Largest size of the selected queue.
pub const QUEUE_NUM_MAX: u64 = 0x034;
/// Size of the selected queue.
pub const QUEUE_NUM: u64 = 0x038;
/// The selected queue is ready.
pub const QUEUE_READY: u64 = 0x044;
/// Queue notification (a doorbell): the value is the queue index.
pub const QUEUE_NOTIFY: u64 = 0x050;
/// Pending interrupt causes.
pub const INTERRUPT_STATUS: u64 = 0x060;
/// Acknowledges interrupt causes.
pub const INTERRUPT_ACK: u64 = 0x064;
/// Device status.
pub const STATUS: u64 = 0x070;
/// Descriptor table address, low 32 bits (high 32 bits at +4).
pub const QUEUE_DESC_LOW: u64 = 0x080;
/// Descriptor table address, high 32 bits.
pub const QUEUE_DESC_HIGH: u64 = 0x084;
/// Available (driver) ring address, low 32 bits.
pub const QUEUE_AVAIL_LOW: u64 = 0x090;
/// Available (driver) ring address, high 32 bits.
pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
/// Used (device) ring address, low 32 bits.
pub const QUEUE_USED_LOW: u64 = 0x0a0;
/// Used (device) ring address, high 32 bits.
pub const QUEUE_USED_HIGH: u64 = 0x0a4;
/// Shared memory region select.
pub const SHM_SEL: u64 = 0x0ac;
/// Shared memory region length, low 32 bits (all-ones: no such region).
pub const SHM_LEN_LOW: u64 = 0x0b0;
/// Shared memory region length, high 32 bits.
pub const SHM_LEN_HIGH: u64 = 0x0b4;
/// Configuration generation counter.
pub const CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device configuration space.
pub const CONFIG: u64 = 0x100;

/// Size of a virtio-mmio region.
pub const MMIO_SIZE: u64 = 0x1000;
/// `MagicValue`.
pub const MAGIC: u32 = 0x7472_6976;
/// Vendor ID reported by Outboard devices ("OBRD").
pub const VENDOR: u32 = 0x4452_424f;
/// InterruptStatus bit: a queue has used buffers.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration (or device status) changed.
pub const INT_CONFIG: u32 = 2;

/// Status: the guest noticed the device.
pub const S_ACKNOWLEDGE: u32 = 1;
/// Status: the guest has a driver for it.
pub const S_DRIVER: u32 = 2;
/// Status: the driver is ready.
pub const S_DRIVER_OK: u32 = 4;
/// Status: feature negotiation is complete.
pub const S_FEATURES_OK: u32 = 8;
/// Status: the device hit an error and needs a reset.
pub const S_NEEDS_RESET: u32 = 0x40;
/// Status: the driver gave up on the device.
pub const S_FAILED: u32 = 0x80;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
