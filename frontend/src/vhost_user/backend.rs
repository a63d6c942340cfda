//! [`Backend`]: the vhost-user side of the transport. Its
//! [`TransportDevice`] hooks turn the driver's actions into vhost-user
//! messages, each sent through the watchdog's [`Channel`]. It remembers
//! what the driver set up (features, queues, memory, the inflight region),
//! so that [`Backend::restore`] can replay it on a new connection after the
//! backend was restarted.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use outboard_virtio_mmio::virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
};
use outboard_virtio_mmio::virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use outboard_virtio_mmio::{QueueConfig, TransportDevice};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::reconnect::Link;
use super::watchdog::Channel;
use super::{Error, VirtioType, MAX_QUEUE_SIZE};
use crate::irq::IrqLine;
use crate::memory::GuestRam;

/// The protocol features the frontend uses when the backend offers them.
fn wanted_protocol(restarts: bool) -> VhostUserProtocolFeatures {
    let mut p = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::RESET_DEVICE;
    if restarts {
        // Only a reconnection reads the inflight region back.
        p |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
    }
    p
}

/// What the driver activated: kept until it resets the device, replayed
/// on every new connection.
struct Active {
    /// The driver's features.
    features: u64,
    /// The queues as the driver laid them out.
    queues: Vec<QueueConfig>,
}

/// The inflight region the backend handed out with GET_INFLIGHT_FD: the
/// frontend keeps it from activation to reset and hands it to every new
/// connection with SET_INFLIGHT_FD. The frontend never maps or reads it:
/// its layout is the backends' business.
struct Inflight {
    info: VhostUserInflight,
    file: File,
}

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
    /// Guest RAM, as last sent in SET_MEM_TABLE.
    ram: Option<Arc<GuestRam>>,
    /// What the driver activated, until it resets the device.
    active: Option<Active>,
    inflight: Option<Inflight>,
    /// The interrupt line's count when the driver last acknowledged VRING.
    interrupts_acked: u64,
    /// The driver acknowledged the configuration-change interrupt of a failure.
    config_acked: bool,
    /// Why the last reset failed, for [`super::VhostUserDevice::reset`].
    reset_error: Option<Error>,
    /// The last configuration read failed because the backend was lost.
    config_lost: bool,
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
    /// A backend over the connected `chan`, before negotiation.
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
            ram: None,
            active: None,
            inflight: None,
            config_acked: false,
            reset_error: None,
            config_lost: false,
        }
    }

    fn link(&self) -> &Arc<Link> {
        self.chan.link()
    }

    /// Tells the link what it needs to judge a loss: guest RAM, the ready
    /// queues the driver activated, whether there is an inflight region.
    fn publish_rings(&self) {
        let queues = self.active.as_ref().map_or_else(Vec::new, |a| {
            a.queues
                .iter()
                .enumerate()
                .filter(|(_, c)| c.ready)
                .map(|(q, c)| (q, c.avail, c.used))
                .collect()
        });
        let inflight = self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        self.link().set_rings(|r| {
            r.ram.clone_from(&self.ram);
            r.queues = queues;
            r.inflight = inflight;
        });
    }

    /// GET_FEATURES, the protocol features, SET_OWNER and (with `ram`) the
    /// memory table. Returns the number of queues.
    pub(super) fn negotiate(&mut self, ram: Option<Arc<GuestRam>>) -> Result<usize, Error> {
        let (features, protocol, queues) = self.handshake()?;
        self.features = features;
        self.protocol = protocol;
        self.publish_rings();
        if let Some(ram) = ram {
            self.set_memory(&ram)?;
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

    /// GET_FEATURES, the protocol features and SET_OWNER on the current
    /// connection: (virtio features, protocol features, queues).
    fn handshake(&mut self) -> Result<(u64, VhostUserProtocolFeatures, usize), Error> {
        let features = self.chan.call("GET_FEATURES", |fe| fe.get_features())?;
        let pf_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.uses_protocol_features = features & pf_bit != 0;
        let mut queues = self.ty.default_queues;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if self.uses_protocol_features {
            let offered = self
                .chan
                .call("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features())?;
            let p = offered & wanted_protocol(self.link().restarts());
            self.chan
                .call("SET_PROTOCOL_FEATURES", |fe| fe.set_protocol_features(p))?;
            protocol = p;
            if p.contains(VhostUserProtocolFeatures::MQ) {
                let n = self.chan.call("GET_QUEUE_NUM", |fe| fe.get_queue_num())?;
                queues = usize::try_from(n).unwrap_or(1).clamp(1, 64);
            }
        }
        self.chan.call("SET_OWNER", |fe| fe.set_owner())?;
        Ok((features & !pf_bit, protocol, queues))
    }

    /// The queues' kick eventfds, one per queue.
    pub(super) fn set_kicks(&mut self, kicks: Arc<[EventFd]>) {
        self.kicks = kicks;
    }

    /// SET_MEM_TABLE with `ram`'s regions. While the backend is being
    /// reconnected the table is only remembered: the new connection gets it.
    pub(super) fn set_memory(&mut self, ram: &Arc<GuestRam>) -> Result<(), Error> {
        self.ram = Some(Arc::clone(ram));
        self.publish_rings();
        self.send_memory().or_else(|e| self.deferred(e))
    }

    fn send_memory(&mut self) -> Result<(), Error> {
        let Some(ram) = self.ram.clone() else {
            return Ok(());
        };
        let regions = mem_regions(&ram);
        self.chan
            .call("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions))
            .map(|_| ())
    }

    /// `e` stopped an action that the recovery replays on the next
    /// connection: success while the backend is being reconnected.
    fn deferred(&self, e: Error) -> Result<(), Error> {
        if self.link().is_down() {
            Ok(())
        } else {
            Err(e)
        }
    }

    /// The error of the last reset, if it failed.
    pub(super) fn take_reset_error(&mut self) -> Option<Error> {
        self.reset_error.take()
    }

    /// True (once) when the last configuration read failed because the
    /// backend was lost: the reader may wait for the reconnection and retry.
    pub(super) fn take_config_lost(&mut self) -> bool {
        std::mem::take(&mut self.config_lost)
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

    /// SET_FEATURES, the inflight region, then every ready queue of what the
    /// driver activated. `restoring`: the queues resume where the guest's
    /// used rings say (a new connection after a crash) rather than at 0.
    fn start(&mut self, restoring: bool) -> Result<(), Error> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        let features = active.features;
        let queues = active.queues.clone();
        let pf = if self.uses_protocol_features {
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        } else {
            0
        };
        self.chan
            .call("SET_FEATURES", |fe| fe.set_features(features | pf))?;
        if self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            self.share_inflight(&queues)?;
        }
        for (q, c) in queues.iter().enumerate().filter(|(_, c)| c.ready) {
            let base = if restoring { self.used_index(q, c)? } else { 0 };
            self.start_queue(q, c, base)?;
        }
        if !self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Without REPLY_ACK the SET_* messages are not acknowledged: a
            // request with a reply proves the backend handled them all, so a
            // kick the driver sends next cannot race the ring's enabling.
            self.chan.call("GET_FEATURES", |fe| fe.get_features())?;
        }
        Ok(())
    }

    /// GET_INFLIGHT_FD once per activation (QEMU's vhost_dev_get_inflight),
    /// then SET_INFLIGHT_FD with that region on this connection.
    fn share_inflight(&mut self, queues: &[QueueConfig]) -> Result<(), Error> {
        if self.inflight.is_none() {
            let num_queues = u16::try_from(self.started.len()).map_err(|_| Error::NoQueues)?;
            let queue_size = queues
                .iter()
                .filter(|c| c.ready)
                .map(|c| c.size)
                .max()
                .unwrap_or(MAX_QUEUE_SIZE);
            let ask = VhostUserInflight::new(0, 0, num_queues, queue_size);
            let (got, file) = self
                .chan
                .call("GET_INFLIGHT_FD", |fe| fe.get_inflight_fd(&ask))?;
            // SAFETY: F_SETFD only changes the flags of a descriptor `file`
            // owns and keeps open; the region must not leak into programs
            // the VMM starts.
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
            let info =
                VhostUserInflight::new(got.mmap_size, got.mmap_offset, num_queues, queue_size);
            self.inflight = Some(Inflight { info, file });
        }
        let Some(inflight) = &self.inflight else {
            return Ok(());
        };
        let (info, fd) = (inflight.info, inflight.file.as_raw_fd());
        self.chan
            .call("SET_INFLIGHT_FD", |fe| fe.set_inflight_fd(&info, fd))
    }

    /// Queue `q`'s used index in guest memory: where a backend that
    /// crashed left it (QEMU's virtio_queue_restore_last_avail_idx). The
    /// new backend resumes there: with the inflight region it finds the
    /// chains the old one had taken and not completed itself; without it,
    /// [`Link::settled`] has made sure there were none.
    fn used_index(&self, q: usize, c: &QueueConfig) -> Result<u16, Error> {
        let ram = self.ram.as_ref().ok_or(Error::NoMemory)?;
        ram.memory()
            .load(GuestAddress(c.used.wrapping_add(2)), Ordering::Acquire)
            .map_err(|source| Error::RingIndex { queue: q, source })
    }

    /// Sets up and enables queue `q` with the driver's layout `c`, the
    /// backend starting at available index `base`.
    fn start_queue(&mut self, q: usize, c: &QueueConfig, base: u16) -> Result<(), Error> {
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
            .call("SET_VRING_BASE", |fe| fe.set_vring_base(q, base))?;
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

    /// Makes `sock` (connection `generation`, to the restarted backend) the
    /// device's connection and replays the device's state on it within one
    /// `timeout`: the handshake (which must find the features and queues
    /// the driver relies on), the memory table and, if the driver had
    /// activated the device, its features, the inflight region and every
    /// ready queue resuming at its used index, with the same kick and call
    /// eventfds. Then each started queue is kicked once (work the driver
    /// queued meanwhile) and the interrupt line raised once (completions
    /// whose interrupt the old backend never sent).
    pub(super) fn restore(
        &mut self,
        sock: UnixStream,
        generation: u64,
        timeout: Duration,
    ) -> Result<(), Error> {
        let link = Arc::clone(self.link());
        let mut chan = Channel::open(sock, Arc::clone(&link), generation, true, timeout)?;
        chan.set_budget(Some(Instant::now() + timeout));
        // The old connection (and its watchdog) goes now.
        self.chan = chan;
        self.started.iter_mut().for_each(|s| *s = false);
        let replayed = self.replay().and_then(|()| {
            self.chan.set_budget(None);
            self.chan.end_probation();
            if link.up(self.chan.generation()) {
                Ok(())
            } else {
                Err(Error::HungUp)
            }
        });
        if let Err(e) = replayed {
            // The new backend may have taken chains from a queue it had
            // been given before it went away too.
            if self.started.iter().any(|&s| s) {
                link.settled()?;
            }
            return Err(e);
        }
        for (q, _) in self.started.iter().enumerate().filter(|&(_, &s)| s) {
            if let Some(k) = self.kicks.get(q) {
                if let Err(e) = outboard_protocol::wait::signal_eventfd(k) {
                    warn!("{}: kick of queue {q} after reconnecting: {e}", self.name);
                }
            }
        }
        if self.active.is_some() {
            if let Err(e) = outboard_protocol::wait::signal_eventfd(self.irq.eventfd()) {
                warn!("{}: interrupt after reconnecting: {e}", self.name);
            }
        }
        Ok(())
    }

    /// The handshake, the memory table and the activation on a new
    /// connection.
    fn replay(&mut self) -> Result<(), Error> {
        let (features, protocol, queues) = self.handshake()?;
        self.check_restorable(features, protocol, queues)?;
        self.send_memory()?;
        self.start(true)
    }

    /// The restarted backend must offer what the driver uses: every
    /// feature it acknowledged, the protocol features negotiated before
    /// (the inflight region among them) and the same queues. A packed ring
    /// keeps no used index in guest memory to resume from.
    fn check_restorable(
        &self,
        features: u64,
        protocol: VhostUserProtocolFeatures,
        queues: usize,
    ) -> Result<(), Error> {
        let driver = self.active.as_ref().map_or(0, |a| a.features);
        if driver & (1 << VIRTIO_F_RING_PACKED) != 0 {
            return Err(Error::PackedRing);
        }
        let missing = driver & !(features | (1 << VIRTIO_F_VERSION_1));
        if missing != 0 {
            return Err(Error::Changed(format!(
                "it no longer offers features {missing:#x}"
            )));
        }
        if protocol != self.protocol {
            return Err(Error::Changed(format!(
                "protocol features {:#x}, before {:#x}",
                protocol.bits(),
                self.protocol.bits()
            )));
        }
        if queues != self.started.len() {
            return Err(Error::Changed(format!(
                "{queues} queues, before {}",
                self.started.len()
            )));
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
            Err(_) if self.link().is_down() => self.config_lost = true,
            Err(e) => warn!("{}: configuration read at {offset:#x}: {e}", self.name),
        }
    }

    /// SET_FEATURES, the inflight region (GET_INFLIGHT_FD, SET_INFLIGHT_FD)
    /// where negotiated, then SET_VRING_NUM, _BASE, _ADDR, _CALL, _KICK and
    /// _ENABLE per ready queue. Remembered for a reconnection; while the
    /// backend is being reconnected, the recovery does it.
    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), Error> {
        self.active = Some(Active {
            features,
            queues: queues.to_vec(),
        });
        self.publish_rings();
        self.start(false).or_else(|e| self.deferred(e))
    }

    /// Stops the queues (GET_VRING_BASE) and resets the backend; the driver
    /// starts afresh, so the activation and the inflight region are
    /// forgotten (QEMU frees its inflight region on reset too). A backend
    /// being reconnected has nothing to stop.
    fn reset(&mut self) {
        self.active = None;
        self.inflight = None;
        self.publish_rings();
        self.reset_error = self.stop().or_else(|e| self.deferred(e)).err();
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
        if self.link().health().is_failed() && !self.config_acked {
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
        if self.link().health().is_failed() {
            VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            0
        }
    }
}
