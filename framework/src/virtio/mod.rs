//! Virtio devices: the [`VirtioDevice`] trait and the virtio-mmio transport.
//!
//! A virtio backend implements only its device logic ([`VirtioDevice`]) on
//! virtio-queue [`Queue`]s. [`VirtioMmio`] wraps it into an Outboard
//! [`Device`]: one 4 KiB MMIO region laid out as virtio 1.2 virtio-mmio
//! version 2 (registers below 0x100, device configuration space from 0x100),
//! one doorbell per queue on QueueNotify (offset 0x50, 4 bytes, datamatch =
//! queue index, so notifications never travel as data commands), and one
//! edge-triggered interrupt line for used-buffer and configuration-change
//! notifications (InterruptStatus bits 0 and 1).
//!
//! Error handling follows the virtio specification: a request that cannot
//! be served but can be answered is completed with the device's error
//! status by the device logic; a queue the device cannot make sense of (a
//! descriptor loop, an address outside guest memory, a chain in the wrong
//! direction with nowhere to write a status) sets DEVICE_NEEDS_RESET and
//! raises a configuration-change interrupt. Nothing the guest writes can
//! make the backend touch memory outside the memory table: every guest
//! access goes through vm-memory's checked accessors.

use std::os::fd::RawFd;

use log::{debug, info, warn};
use outboard_protocol::control::DeviceKind;
use outboard_protocol::AccessSize;
use thiserror::Error;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory as _, GuestMemoryMmap};

use crate::device::{
    Device, Doorbell, EventOutcome, GuestMemory, Interrupt, InterruptLine, Region,
};

/// The guest memory type queues are processed against.
pub type Memory = GuestMemoryMmap<()>;

/// Register offsets and constants of the virtio-mmio (version 2) layout.
pub use outboard_protocol::virtio_mmio as regs;
pub use outboard_protocol::virtio_mmio::{INT_CONFIG, INT_VRING, MAGIC, MMIO_SIZE, VENDOR};

/// Why a queue could not be processed; the transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, Error)]
pub enum QueueError {
    /// descriptor chain is malformed: {0}
    #[error("descriptor chain is malformed: {0}")]
    Chain(&'static str),
    /// queue structures are not accessible
    #[error("queue structures are not accessible")]
    Queue(#[source] virtio_queue::Error),
    /// descriptor buffers are not accessible
    #[error("descriptor buffers are not accessible")]
    Buffers(#[source] virtio_queue::Error),
    /// guest memory access failed
    #[error("guest memory access failed")]
    Memory(#[source] std::io::Error),
    /// backing store failed
    #[error("backing store failed")]
    Backend(#[source] std::io::Error),
}

/// A descriptor chain over the backend's guest memory.
pub type Chain<'a> = DescriptorChain<&'a Memory>;

/// Walks `chain` without consuming it and rejects what the device must not
/// serve: no descriptors at all, a chain cut short (a loop that exhausts the
/// queue size, a `next` index out of range, an unreadable descriptor), and a
/// buffer that is not entirely inside guest memory.
pub fn validate_chain(chain: &Chain<'_>, mem: &Memory) -> Result<(), QueueError> {
    let mut last_has_next = None;
    for desc in chain.clone() {
        let access = if desc.is_write_only() {
            vm_memory::Permissions::Write
        } else {
            vm_memory::Permissions::Read
        };
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(QueueError::Chain("buffer outside guest memory"));
        }
        last_has_next = Some(desc.has_next());
    }
    match last_has_next {
        None => Err(QueueError::Chain("no readable descriptor at the head")),
        Some(true) => Err(QueueError::Chain("loop or broken next link")),
        Some(false) => Ok(()),
    }
}

/// Pops every available chain and hands it to `serve`, which returns the
/// number of bytes it wrote into the chain; each chain is then added to the
/// used ring. Returns whether any chain was used.
pub fn drain_queue<F>(queue: &mut Queue, mem: &Memory, mut serve: F) -> Result<bool, QueueError>
where
    F: FnMut(Chain<'_>) -> Result<u32, QueueError>,
{
    let mut used = false;
    loop {
        let chain = queue.iter(mem).map_err(QueueError::Queue)?.next();
        let Some(chain) = chain else {
            return Ok(used);
        };
        let head = chain.head_index();
        validate_chain(&chain, mem)?;
        let len = serve(chain)?;
        queue.add_used(mem, head, len).map_err(QueueError::Queue)?;
        used = true;
    }
}

/// The device logic of a virtio device, independent of the transport.
pub trait VirtioDevice {
    /// Name shown to the frontend.
    fn name(&self) -> &str;

    /// Virtio device ID (2 = block, 3 = console, 4 = entropy, ...).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Feature bits the device offers (the transport adds VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;

    /// Reads `data.len()` bytes of configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

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
    /// buffer was used (the transport then notifies the driver).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError>;

    /// The device's own fds (console input, say), watched by the runtime.
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// True (once) when [`VirtioDevice::event_fds`] would now return a
    /// different set; see [`Device::fds_changed`].
    fn fds_changed(&mut self) -> bool {
        false
    }

    /// The fd at `index` of [`VirtioDevice::event_fds`] is readable. Returns
    /// whether to keep watching it and which queue, if any, now has work.
    fn handle_event(&mut self, index: usize) -> (EventOutcome, Option<usize>) {
        let _ = index;
        (EventOutcome::Remove, None)
    }
}

/// A [`VirtioDevice`] behind the virtio-mmio transport.
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    queues: Vec<Queue>,
    memory: Option<GuestMemory>,
    irq: Option<InterruptLine>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioMmio<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMmio")
            .field("device", &self.device.name())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> VirtioMmio<D> {
    /// Wraps `device`. Queue sizes that are zero, above 32768 or not a power
    /// of two are clamped to a valid size.
    pub fn new(device: D) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(|n| {
                let n = if n.is_power_of_two() && n <= 32768 {
                    n
                } else {
                    256
                };
                // A power of two up to 32768 is always a valid maximum.
                Queue::new(n).unwrap_or_else(|_| unreachable_queue())
            })
            .collect();
        VirtioMmio {
            device,
            queues,
            memory: None,
            irq: None,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
        }
    }

    /// The device logic.
    pub fn inner(&self) -> &D {
        &self.device
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn raise(&mut self, cause: u32) {
        self.interrupt_status |= cause;
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.trigger() {
                warn!("{}: cannot raise the interrupt: {e}", self.device.name());
            }
        }
    }

    fn needs_reset(&mut self, why: &dyn std::error::Error) {
        if self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
            warn!("{}: device needs reset: {why}", self.device.name());
            self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
            self.raise(INT_CONFIG);
        }
    }

    fn reset_transport(&mut self) {
        info!("{}: reset", self.device.name());
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset_transport();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.offered_features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                warn!(
                    "{}: refusing features {:#x} (offered {:#x})",
                    self.device.name(),
                    self.driver_features,
                    offered
                );
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        let mut activated = false;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            if value & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
                warn!("{}: DRIVER_OK without FEATURES_OK", self.device.name());
                value &= !VIRTIO_CONFIG_S_DRIVER_OK;
            } else {
                activated = true;
                debug!(
                    "{}: driver ready, features {:#x}",
                    self.device.name(),
                    self.driver_features
                );
                self.device.activate(self.driver_features);
            }
        }
        // The device owns NEEDS_RESET; the driver cannot clear it but by reset.
        let keep = self.status & VIRTIO_CONFIG_S_NEEDS_RESET;
        let known = VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_FAILED;
        self.status = (value & known) | keep;
        if activated {
            // A notify rides its own eventfd and may have overtaken the
            // posted DRIVER_OK write; serve whatever is already queued.
            for q in 0..self.queues.len() {
                self.kick(q);
            }
        }
    }

    fn driver_ok(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    /// Serves queue `index` if the driver is ready; notifies on used buffers.
    fn kick(&mut self, index: usize) {
        if !self.driver_ok() {
            debug!(
                "{}: notify of queue {index} before DRIVER_OK",
                self.device.name()
            );
            return;
        }
        let Some(mem) = self.memory.as_ref().map(GuestAddressSpace::memory) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(index) else {
            debug!("{}: notify of missing queue {index}", self.device.name());
            return;
        };
        if !queue.ready() {
            return;
        }
        if !queue.is_valid(&*mem) {
            self.needs_reset(&QueueError::Chain("queue rings outside guest memory"));
            return;
        }
        match self.device.process_queue(index, queue, &mem) {
            Ok(true) => {
                let notify = queue.needs_notification(&*mem).unwrap_or(true);
                if notify {
                    self.raise(INT_VRING);
                }
            }
            Ok(false) => {}
            Err(e) => self.needs_reset(&e),
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        use regs::*;
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => 2,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt_status,
            STATUS => self.status,
            SHM_LEN_LOW | SHM_LEN_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        use regs::*;
        // Queue layout may only change while the driver is setting up.
        let setting_up = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            QUEUE_READY if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_AVAIL_LOW | QUEUE_AVAIL_HIGH
            | QUEUE_USED_LOW | QUEUE_USED_HIGH
                if setting_up =>
            {
                let high = offset & 4 != 0;
                let (lo, hi) = if high {
                    (None, Some(value))
                } else {
                    (Some(value), None)
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            QUEUE_NOTIFY => self.kick(value as usize),
            INTERRUPT_ACK => self.interrupt_status &= !value,
            STATUS => self.set_status(value),
            SHM_SEL => {}
            _ => debug!(
                "{}: ignored write of {value:#x} to register {offset:#x}",
                self.device.name()
            ),
        }
    }
}

fn unreachable_queue() -> Queue {
    // Queue::new only fails for sizes that are zero, above 32768 or not a
    // power of two; 256 is none of those.
    match Queue::new(256) {
        Ok(q) => q,
        Err(_) => std::process::abort(),
    }
}

impl<D: VirtioDevice> Device for VirtioMmio<D> {
    fn name(&self) -> &str {
        self.device.name()
    }

    fn kind(&self) -> DeviceKind {
        DeviceKind(DeviceKind::VIRTIO_BASE + self.device.device_type())
    }

    fn regions(&self) -> Vec<Region> {
        vec![Region::mmio("virtio-mmio", MMIO_SIZE).posted_writes()]
    }

    fn read(&mut self, _region: u32, offset: u64, size: AccessSize) -> u64 {
        if offset >= regs::CONFIG {
            let mut buf = [0u8; 8];
            let n = size.bytes() as usize;
            self.device
                .read_config(offset - regs::CONFIG, &mut buf[..n]);
            return u64::from_le_bytes(buf);
        }
        if size != AccessSize::B4 || !offset.is_multiple_of(4) {
            return size.all_ones();
        }
        u64::from(self.read_register(offset))
    }

    fn write(&mut self, _region: u32, offset: u64, size: AccessSize, value: u64) {
        if offset >= regs::CONFIG {
            let n = size.bytes() as usize;
            self.device
                .write_config(offset - regs::CONFIG, &value.to_le_bytes()[..n]);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if size != AccessSize::B4 || !offset.is_multiple_of(4) {
            debug!(
                "{}: ignored {}-byte register write",
                self.device.name(),
                size.bytes()
            );
            return;
        }
        self.write_register(offset, value as u32);
    }

    fn reset(&mut self) {
        self.reset_transport();
    }

    fn doorbells(&self) -> Vec<Doorbell> {
        (0..self.queues.len())
            .map(|q| Doorbell {
                region: 0,
                offset: regs::QUEUE_NOTIFY,
                size: Some(AccessSize::B4),
                datamatch: Some(q as u64),
            })
            .collect()
    }

    fn doorbell(&mut self, index: usize, _count: u64) {
        // However many notifies were coalesced, one pass drains the queue.
        self.kick(index);
    }

    fn interrupts(&self) -> Vec<Interrupt> {
        vec![Interrupt { level: false }]
    }

    fn connect_interrupt(&mut self, index: usize, line: InterruptLine) {
        if index == 0 {
            self.irq = Some(line);
        }
    }

    fn set_memory(&mut self, mem: GuestMemory) {
        self.memory = Some(mem);
    }

    fn event_fds(&self) -> Vec<RawFd> {
        self.device.event_fds()
    }

    fn handle_event(&mut self, index: usize) -> EventOutcome {
        let (outcome, queue) = self.device.handle_event(index);
        if let Some(q) = queue {
            self.kick(q);
        }
        outcome
    }

    fn fds_changed(&mut self) -> bool {
        self.device.fds_changed()
    }
}
