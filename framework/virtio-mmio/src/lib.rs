//! The virtio-mmio (version 2) transport of virtio 1.2, section 4.2.2, as a
//! register state machine with no I/O of its own.
//!
//! Outboard needs this transport twice: a backend serving a virtio device
//! over ioregionfd (`outboard::virtio`), and the frontend putting a
//! vhost-user backend on its bus. Both hold an [`MmioTransport`] for the
//! registers and implement [`TransportDevice`] for what differs: the
//! device's identity and features, its configuration space, what activation
//! and a queue notification do, and where interrupts go.
//!
//! ```text
//!   guest access ──▶ MmioTransport::read / write ──▶ TransportDevice hooks
//!   (offset, size)     magic, version, features,       device_type, features,
//!                      queue select and layout,        read/write_config,
//!                      Status, InterruptStatus/ACK,     activate(features, queues),
//!                      config generation               queue_notify, reset, interrupt
//! ```
//!
//! The transport owns the register state: the feature windows, the driver's
//! features, the selected queue and each queue's [`QueueConfig`], Status,
//! the latched InterruptStatus bits and the configuration generation. It
//! enforces the driver's side of the protocol:
//!
//! * FEATURES_OK is refused (it reads back clear) unless the driver's
//!   features are a subset of the offered ones and include
//!   `VIRTIO_F_VERSION_1`, which the transport always offers.
//! * DRIVER_OK is refused without FEATURES_OK. Setting it calls
//!   [`TransportDevice::activate`] with the negotiated features and every
//!   queue's configuration; from then on the queue layout is read-only.
//! * Status bits stay set until the driver writes 0 to Status, which resets
//!   the transport and calls [`TransportDevice::reset`].
//! * DEVICE_NEEDS_RESET belongs to the device side: the transport sets it
//!   when activation or a queue notification fails (or when asked with
//!   [`MmioTransport::set_needs_reset`]) and raises a configuration-change
//!   interrupt; a device can also report it, and any other Status bit,
//!   through [`TransportDevice::device_status`] (a failed vhost-user peer).
//! * QueueNotify, and [`MmioTransport::notify`] for notifications that
//!   arrive by another path (a doorbell eventfd), reach
//!   [`TransportDevice::queue_notify`] only for an existing, ready queue
//!   while DRIVER_OK is set and DEVICE_NEEDS_RESET is clear.
//!
//! Register accesses must be aligned 32-bit accesses: others read as
//! all-ones at their width and are ignored when written. Unknown registers
//! read as zero and ignore writes. The shared-memory length registers read
//! all-ones (no shared memory regions). The device configuration space
//! starts at `VIRTIO_MMIO_CONFIG` (0x100), takes accesses of 1, 2, 4 or 8
//! bytes in little-endian order, and every write to it increments
//! ConfigGeneration. Accesses outside the [`MMIO_SIZE`] window read as
//! all-ones and are ignored when written.
//!
//! Register offsets and status and feature bits come from
//! [`virtio_bindings`] (`virtio_mmio`, `virtio_config`), re-exported here.

#![deny(missing_docs)]

mod device;
mod lifecycle;
mod transport;

#[cfg(test)]
mod testdev;

pub use device::{QueueConfig, TransportDevice, MAX_QUEUE_SIZE};
pub use transport::{MmioTransport, Registers};
pub use virtio_bindings;

/// Size of a virtio-mmio window: registers below 0x100, configuration space above.
pub const MMIO_SIZE: u64 = 0x1000;
/// MagicValue: "virt" in little endian (virtio 1.2, 4.2.2).
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version this crate implements (Version register).
pub const TRANSPORT_VERSION: u32 = 2;
/// VendorID reported by Outboard devices ("OBRD" in little endian).
pub const VENDOR_ID: u32 = 0x4452_424f;
