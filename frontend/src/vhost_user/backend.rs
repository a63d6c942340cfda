//! [`Backend`]: the vhost-user side of the transport. Its
//! [`TransportDevice`] hooks turn the driver's actions into vhost-user
//! messages, each sent through the watchdog's [`Channel`].

use std::sync::Arc;

use log::{info, warn};
use outboard_virtio_mmio::virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use outboard_virtio_mmio::virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use outboard_virtio_mmio::{QueueConfig, TransportDevice};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::watchdog::Channel;
use super::{Error, VirtioType, MAX_QUEUE_SIZE};
use crate::irq::IrqLine;
use crate::memory::GuestRam;

/// The vhost-user connection and what the transport's hooks need: the
/// negotiated features, the queues' kick eventfds and the interrupt line the
/// backend's call eventfds signal.
pub(super) struct Backend {
    name: String,
    ty: VirtioType,
    chan: Channel,
    /// The backend's virtio features, without VHOST_USER_F_PROTOCOL_FEATURES.
    features: u64,
    protocol: VhostUserProtocolFeatures,
    uses_protocol_features: bool,
    /// Per queue: the backend runs it (GET_VRING_BASE stops it).
    started: Vec<bool>,
    kicks: Arc<[EventFd]>,
    irq: IrqLine,
    /// The interrupt line's count when the driver last acknowledged VRING.
    interrupts_acked: u64,
    /// The driver acknowledged the configuration-change interrupt of a failure.
    config_acked: bool,
    /// Why the last reset failed, for [`super::VhostUserDevice::reset`].
    reset_error: Option<Error>,
}

fn mem_regions(ram: &GuestRam) -> Vec<VhostUserMemoryRegionInfo> {
    let (table, fds) = ram.table();
    table
        .regions
        .iter()
        .zip(fds)
        .map(|(r, fd)| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.guest_addr,
            memory_size: r.size,
            // Identity: vring addresses are then plain guest-physical addresses.
            userspace_addr: r.guest_addr,
            mmap_offset: r.fd_offset,
            mmap_handle: fd,
        })
        .collect()
}

impl Backend {
    /// A backend over the connected `fe`, before negotiation.
    pub(super) fn new(name: &str, ty: VirtioType, chan: Channel, irq: IrqLine) -> Self {
        Backend {
            name: name.to_owned(),
            ty,
            chan,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            uses_protocol_features: false,
            started: Vec::new(),
            kicks: Arc::from(Vec::new()),
            interrupts_acked: irq.count(),
            irq,
            config_acked: false,
            reset_error: None,
        }
    }

    /// GET_FEATURES, the protocol features, SET_OWNER and (with `ram`) the
    /// memory table. Returns the number of queues.
    pub(super) fn negotiate(&mut self, ram: Option<&GuestRam>) -> Result<usize, Error> {
        let features = self.chan.call("GET_FEATURES", |fe| fe.get_features())?;
        let pf_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.features = features & !pf_bit;
        self.uses_protocol_features = features & pf_bit != 0;
        let mut queues = self.ty.default_queues;
        if self.uses_protocol_features {
            let offered = self
                .chan
                .call("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features())?;
            let wanted = VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::RESET_DEVICE;
            let p = offered & wanted;
            self.chan
                .call("SET_PROTOCOL_FEATURES", |fe| fe.set_protocol_features(p))?;
            self.protocol = p;
            if p.contains(VhostUserProtocolFeatures::MQ) {
                let n = self.chan.call("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
                queues = usize::try_from(n).unwrap_or(1).clamp(1, 64);
            }
        }
        self.chan.call("SET_OWNER", |fe| fe.set_owner())?;
        if let Some(ram) = ram {
            self.set_memory(ram)?;
        }
        if queues == 0 {
            return Err(Error::NoQueues);
        }
        self.started = vec![false; queues];
        info!(
            "{}: vhost-user {} device, features {:#x}, protocol {:#x}, {queues} queues",
            self.name,
            self.ty.id,
            self.features,
            self.protocol.bits()
        );
        Ok(queues)
    }

    /// The queues' kick eventfds, one per queue.
    pub(super) fn set_kicks(&mut self, kicks: Arc<[EventFd]>) {
        self.kicks = kicks;
    }

    /// SET_MEM_TABLE with `ram`'s regions.
    pub(super) fn set_memory(&mut self, ram: &GuestRam) -> Result<(), Error> {
        let regions = mem_regions(ram);
        self.chan
            .call("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions))
            .map(|_| ())
    }

    /// The error of the last reset, if it failed.
    pub(super) fn take_reset_error(&mut self) -> Option<Error> {
        self.reset_error.take()
    }

    /// GET_VRING_BASE per started queue (stops it), then RESET_DEVICE
    /// where negotiated. Every queue counts as stopped afterwards.
    fn stop(&mut self) -> Result<(), Error> {
        let stopped = vec![false; self.started.len()];
        let started = std::mem::replace(&mut self.started, stopped);
        for (q, _) in started.iter().enumerate().filter(|&(_, &s)| s) {
            self.chan
                .call("GET_VRING_BASE", |fe| fe.get_vring_base(q))?;
        }
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.chan.call("RESET_DEVICE", |fe| fe.reset_device())?;
        }
        Ok(())
    }

    /// Sets up and enables queue `q` with the driver's layout `c`.
    fn start_queue(&mut self, q: usize, c: &QueueConfig) -> Result<(), Error> {
        let config = VringConfigData {
            queue_max_size: c.max_size,
            queue_size: c.size,
            flags: 0,
            desc_table_addr: c.desc,
            used_ring_addr: c.used,
            avail_ring_addr: c.avail,
            log_addr: None,
        };
        let kick = self.kicks.get(q).ok_or(Error::NoQueues)?;
        self.chan
            .call("SET_VRING_NUM", |fe| fe.set_vring_num(q, c.size))?;
        self.chan
            .call("SET_VRING_BASE", |fe| fe.set_vring_base(q, 0))?;
        self.chan
            .call("SET_VRING_ADDR", |fe| fe.set_vring_addr(q, &config))?;
        self.chan.call("SET_VRING_CALL", |fe| {
            fe.set_vring_call(q, self.irq.eventfd())
        })?;
        self.chan
            .call("SET_VRING_KICK", |fe| fe.set_vring_kick(q, kick))?;
        if self.uses_protocol_features {
            self.chan
                .call("SET_VRING_ENABLE", |fe| fe.set_vring_enable(q, true))?;
        }
        if let Some(s) = self.started.get_mut(q) {
            *s = true;
        }
        Ok(())
    }
}

impl TransportDevice for Backend {
    type Error = Error;

    fn device_type(&self) -> u32 {
        self.ty.id
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![MAX_QUEUE_SIZE; self.started.len()]
    }

    /// GET_CONFIG when the backend offers the CONFIG protocol feature; zeros otherwise.
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return;
        }
        let (Ok(off), Ok(n)) = (u32::try_from(offset), u32::try_from(data.len())) else {
            return;
        };
        let buf = vec![0u8; data.len()];
        let reply = self.chan.call("GET_CONFIG", |fe| {
            fe.get_config(off, n, VhostUserConfigFlags::empty(), &buf)
        });
        match reply {
            Ok((_, bytes)) => {
                let len = bytes.len().min(data.len());
                data[..len].copy_from_slice(&bytes[..len]);
            }
            Err(e) => warn!("{}: configuration read at {offset:#x}: {e}", self.name),
        }
    }

    /// SET_FEATURES, then SET_VRING_NUM, _BASE, _ADDR, _CALL, _KICK and
    /// _ENABLE per ready queue.
    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), Error> {
        let pf = if self.uses_protocol_features {
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        } else {
            0
        };
        self.chan
            .call("SET_FEATURES", |fe| fe.set_features(features | pf))?;
        for (q, c) in queues.iter().enumerate().filter(|(_, c)| c.ready) {
            self.start_queue(q, c)?;
        }
        if !self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Without REPLY_ACK the SET_* messages are not acknowledged: a
            // request with a reply proves the backend handled them all, so a
            // kick the driver sends next cannot race the ring's enabling.
            self.chan.call("GET_FEATURES", |fe| fe.get_features())?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.reset_error = self.stop().err();
        if let Some(e) = &self.reset_error {
            warn!("{}: reset: {e}", self.name);
        }
        self.interrupts_acked = self.irq.count();
        self.config_acked = false;
    }

    /// Signals the queue's kick eventfd; the backend signals the call
    /// eventfd itself when it uses buffers.
    fn queue_notify(&mut self, index: u16) -> Result<bool, Error> {
        if let Some(k) = self.kicks.get(usize::from(index)) {
            // Never blocks on a kick eventfd the backend made blocking and filled.
            if let Err(e) = outboard_protocol::wait::signal_eventfd(k) {
                warn!("{}: kick of queue {index}: {e}", self.name);
            }
        }
        Ok(false)
    }

    /// The transport latched an interrupt of its own (a failed activation's
    /// configuration change): signal the line the backend's calls use.
    fn interrupt(&mut self, bits: u32) {
        if let Err(e) = outboard_protocol::wait::signal_eventfd(self.irq.eventfd()) {
            warn!("{}: interrupt {bits:#x}: {e}", self.name);
        }
    }

    fn interrupt_status(&self) -> u32 {
        let mut s = 0;
        if self.irq.count() > self.interrupts_acked {
            s |= VIRTIO_MMIO_INT_VRING;
        }
        if self.chan.health().is_failed() && !self.config_acked {
            s |= VIRTIO_MMIO_INT_CONFIG;
        }
        s
    }

    fn interrupt_ack(&mut self, bits: u32) {
        if bits & VIRTIO_MMIO_INT_VRING != 0 {
            self.interrupts_acked = self.irq.count();
        }
        if bits & VIRTIO_MMIO_INT_CONFIG != 0 {
            self.config_acked = true;
        }
    }

    fn device_status(&self) -> u32 {
        if self.chan.health().is_failed() {
            VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            0
        }
    }
}
