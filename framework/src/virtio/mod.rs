//! Virtio devices: the [`VirtioDevice`] trait and the virtio-mmio transport.
//!
//! A virtio backend implements only its device logic ([`VirtioDevice`]) on
//! virtio-queue [`Queue`]s. [`VirtioMmio`] wraps it into an Outboard
//! [`Device`](crate::Device): one 4 KiB MMIO region laid out as virtio 1.2
//! virtio-mmio version 2 (the registers are [`transport::MmioTransport`],
//! shared with the frontend), one doorbell per queue on QueueNotify
//! (offset 0x50, 4 bytes, datamatch = queue index, so notifications never
//! travel as data commands), and one edge-triggered interrupt line for
//! used-buffer and configuration-change notifications (InterruptStatus
//! bits 0 and 1).
//!
//! Error handling follows the virtio specification: a request that cannot
//! be served but can be answered is completed with the device's error
//! status by the device logic; a queue the device cannot make sense of (a
//! descriptor loop, an address outside guest memory, a chain in the wrong
//! direction with nowhere to write a status) sets DEVICE_NEEDS_RESET and
//! raises a configuration-change interrupt. Nothing the guest writes can
//! make the backend touch memory outside the memory table: every guest
//! access goes through vm-memory's checked accessors.
//!
//! Both transports (this one and [`crate::vhost_user`]) offer the ring
//! features in [`RING_FEATURES`] on top of the device's own:
//! VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC (virtio-queue walks
//! indirect tables; [`validate_chain`] checks them like direct chains) and
//! VIRTIO_RING_F_EVENT_IDX. Notification suppression is honoured by
//! [`drain_queue`] (NO_NOTIFY or `avail_event` while draining) and
//! interrupt suppression by the transports (VRING_AVAIL_F_NO_INTERRUPT is
//! not honoured by virtio-queue; `used_event` is). A driver that accepts a
//! feature the device did not offer is refused: FEATURES_OK reads back
//! clear on virtio-mmio, SET_FEATURES fails on vhost-user.
//!
//! Queues are served in the backend's event loop unless the device hands
//! out a [`QueueWorker`] for them ([`VirtioDevice::queue_worker`]): then
//! each runs on a thread of its own, in parallel (virtio-blk with several
//! queues).

use std::io;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::Queue;

use crate::events::EventOps;

pub mod inflight;
mod mmio;
mod queue;
mod saved;
mod worker;

pub use mmio::VirtioMmio;
pub use outboard_virtio_mmio as transport;
pub use outboard_virtio_mmio::MMIO_SIZE;
pub use queue::{drain_queue, validate_chain, Chain, Memory, QueueError};
pub use worker::QueueWorker;

/// Feature bits every Outboard virtio device offers on both transports,
/// beyond its own: VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC and
/// VIRTIO_RING_F_EVENT_IDX.
pub const RING_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// The device logic of a virtio device, independent of the transport.
pub trait VirtioDevice {
    /// Name shown to the frontend.
    fn name(&self) -> &str;

    /// Virtio device ID (2 = block, 3 = console, 4 = entropy, ...).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Device-specific feature bits the device offers (the transports add
    /// [`RING_FEATURES`]).
    fn features(&self) -> u64;

    /// Reads `data.len()` bytes of configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Bytes of configuration space the device defines (0: none). Over
    /// vhost-user the CONFIG protocol feature is offered only when it is
    /// not 0 (QEMU warns about CONFIG on devices it has no use for it).
    fn config_size(&self) -> usize {
        0
    }

    /// System calls the device makes while serving, beyond the framework's;
    /// see [`crate::device::Device::syscalls`].
    fn syscalls(&self) -> &'static [i64] {
        &[]
    }

    /// The device's own state beyond the transport's (console buffers, say)
    /// for a restart or live upgrade; empty (the default) when it has none.
    /// See [`crate::Device::save`].
    fn save_state(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Takes over what [`VirtioDevice::save_state`] returned, after the
    /// transport's registers; the default accepts only an empty state.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::state::Error> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(crate::state::Error::Invalid(
                "device state where none is kept",
            ))
        }
    }

    /// Changes whenever [`VirtioDevice::save_state`] would return something
    /// new (a counter is enough).
    fn state_generation(&self) -> u64 {
        0
    }

    /// Writes configuration space; most devices ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// The driver set DRIVER_OK with these negotiated features.
    fn activate(&mut self, features: u64) {
        let _ = features;
    }

    /// Back to the power-on state (queues are reset by the transport).
    fn reset(&mut self);

    /// Serves the available buffers of queue `index`. Returns whether any
    /// buffer was used (the transport then notifies the driver). A device
    /// that pops chains itself instead of through [`drain_queue`] reports
    /// them with [`inflight::popped`] and completes them with
    /// [`inflight::add_used`], so a transport that tracks requests in
    /// flight (vhost-user's INFLIGHT_SHMFD) sees them.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError>;

    /// A worker that serves queue `index` on a thread of its own, in
    /// parallel with the other queues, or `None` (the default) to serve it
    /// with [`VirtioDevice::process_queue`] in the backend's event loop.
    /// Asked at every activation that readies two queues or more
    /// (virtio-mmio; a single queue is served in the event loop) or at the
    /// queue's first notification after one (vhost-user, where a device that
    /// gives a worker for every queue gets a thread per queue); dropped at
    /// reset.
    fn queue_worker(&mut self, index: usize) -> Option<Box<dyn QueueWorker>> {
        let _ = index;
        None
    }

    /// Called before serving: once over ioregionfd, and at the start of
    /// every session over vhost-user (a backend serves one frontend after
    /// another, each session with its own loop; [`VirtioDevice::reset`]
    /// follows). Register the device's own fds (the console's input
    /// socket) with `ops`, and keep a clone of it to change them later;
    /// fds registered with an earlier session's ops left with that session.
    /// An error stops the backend.
    fn init(&mut self, ops: &EventOps) -> io::Result<()> {
        let _ = ops;
        Ok(())
    }

    /// The fd registered as `id` is readable. Returns the queue that now
    /// has work, if any; the transport then serves it as if notified.
    fn handle_event(&mut self, id: u32, ops: &EventOps) -> Option<usize> {
        let _ = (id, ops);
        None
    }
}
