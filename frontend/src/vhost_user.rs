//! Attaching standard vhost-user backends beside Outboard ones.
//!
//! A vhost-user backend (QEMU's `qemu-storage-daemon`, rust-vmm's
//! `vhost-device-*`, Outboard's own backends with `--vhost-user`) implements
//! only the virtio device; the transport is the VMM's job. So for such a
//! device the frontend itself implements the virtio-mmio registers
//! ([`VhostUserDevice`] is a [`BusDevice`]) and translates the driver's
//! actions into vhost-user messages with the vhost crate's frontend API:
//!
//! * at attach: GET_FEATURES, GET/SET_PROTOCOL_FEATURES (REPLY_ACK, CONFIG,
//!   MQ, RESET_DEVICE where offered), SET_OWNER, SET_MEM_TABLE with the same
//!   memfds every Outboard backend gets;
//! * configuration-space reads: GET_CONFIG;
//! * DRIVER_OK: SET_FEATURES, then per ready queue SET_VRING_NUM, _BASE,
//!   _ADDR (guest-physical addresses: the memory table maps them 1:1),
//!   _CALL (the device's interrupt eventfd), _KICK (the queue's doorbell
//!   eventfd, which QueueNotify signals) and SET_VRING_ENABLE;
//! * Status = 0: GET_VRING_BASE per started queue (stops it) and RESET_DEVICE.
//!
//! A watchdog thread bounds every vhost-user call with the frontend's
//! timeout (the vhost crate itself would wait forever) and notices a backend
//! that hangs up. Either marks the device failed: the driver then reads
//! DEVICE_NEEDS_RESET in Status, gets a configuration-change interrupt so it
//! stops waiting, and nothing in the frontend hangs.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{info, warn};
use outboard_protocol::virtio_mmio as regs;
use outboard_protocol::{Access, AccessSize, Space};
use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{AccessError, BusDevice};
use crate::health::Health;
use crate::irq::IrqLine;
use crate::memory::GuestRam;
use crate::registrar::{IoEvent, Registrar};

/// Size of the virtio-mmio region the frontend implements for a vhost-user device.
pub const MMIO_SIZE: u64 = regs::MMIO_SIZE;

/// Errors attaching or driving a vhost-user backend.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot connect to {0}
    #[error("cannot connect to {0}")]
    Connect(PathBuf, #[source] io::Error),
    /// vhost-user {op} failed
    #[error("vhost-user {op} failed")]
    Vhost {
        /// The request that failed.
        op: &'static str,
        /// The vhost crate's error.
        #[source]
        source: vhost::Error,
    },
    /// unknown virtio device type {0:?} (use blk, rng, console or a number)
    #[error("unknown virtio device type {0:?} (use blk, rng, console or a number)")]
    UnknownType(String),
    /// the backend offers no queues
    #[error("the backend offers no queues")]
    NoQueues,
    /// cannot create an eventfd or the watchdog
    #[error("cannot create an eventfd or the watchdog")]
    Setup(#[source] io::Error),
    /// no reply within the timeout
    #[error("no reply within the timeout")]
    Timeout,
    /// the backend hung up
    #[error("the backend hung up")]
    HungUp,
}

/// What a vhost-user backend implements, which vhost-user does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioType {
    /// Virtio device ID.
    pub id: u32,
    /// Queues to use when the backend does not report a number (no MQ).
    pub default_queues: usize,
}

impl VirtioType {
    /// Parses `blk`, `rng`, `console` or a numeric virtio device ID.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let (id, default_queues) = match s {
            "blk" | "block" => (2, 1),
            "console" => (3, 2),
            "rng" | "entropy" => (4, 1),
            other => match other.parse::<u32>() {
                Ok(id) => (id, 1),
                Err(_) => return Err(Error::UnknownType(other.to_owned())),
            },
        };
        Ok(VirtioType { id, default_queues })
    }
}

/// Largest queue the frontend sets up for a vhost-user backend.
pub const MAX_QUEUE_SIZE: u16 = 1024;

#[derive(Debug, Clone, Copy, Default)]
struct Queue {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
    started: bool,
}

struct Transport {
    fe: Frontend,
    device_features: u64,
    protocol: VhostUserProtocolFeatures,
    uses_protocol_features: bool,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupts_acked: u64,
    config_acked: bool,
}

/// Bounds vhost-user calls and notices a backend that hangs up.
struct Watchdog {
    deadline: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(sock: UnixStream, health: Arc<Health>, irq: IrqLine) -> io::Result<Self> {
        let deadline: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (Arc::clone(&deadline), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("outboard-vhost-watchdog".into())
            .spawn(move || watch(&sock, &health, &irq, &d, &s))?;
        Ok(Watchdog {
            deadline,
            stop,
            thread: Some(thread),
        })
    }

    fn arm(&self, timeout: Duration) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Instant::now() + timeout);
    }

    fn disarm(&self) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(
    sock: &UnixStream,
    health: &Health,
    irq: &IrqLine,
    deadline: &Mutex<Option<Instant>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: `pfd` is a live pollfd for an fd that `sock` keeps open.
        let n = unsafe { libc::poll(&mut pfd, 1, 20) };
        let hung_up = n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
        let overdue = deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|d| Instant::now() > d);
        if hung_up || overdue {
            let why = if hung_up {
                Error::HungUp
            } else {
                Error::Timeout
            };
            health.fail(&why);
            // Unblock a call in progress, and wake a driver waiting for a completion.
            let _ = sock.shutdown(std::net::Shutdown::Both);
            let _ = irq.eventfd().write(1);
            return;
        }
    }
}

/// A vhost-user backend behind a frontend-implemented virtio-mmio transport.
pub struct VhostUserDevice {
    name: String,
    ty: VirtioType,
    transport: Mutex<Transport>,
    kicks: Vec<EventFd>,
    irq: IrqLine,
    health: Arc<Health>,
    timeout: Duration,
    watchdog: Watchdog,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("name", &self.name)
            .field("type", &self.ty)
            .finish_non_exhaustive()
    }
}

fn vhost<T>(op: &'static str, r: vhost::Result<T>) -> Result<T, Error> {
    r.map_err(|source| Error::Vhost { op, source })
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

impl VhostUserDevice {
    /// Connects to the backend at `socket` (retrying while it starts, within
    /// `timeout`), negotiates, and sends the memory table. `irq` is the line
    /// the backend's call eventfds signal.
    pub fn connect(
        name: &str,
        socket: &Path,
        ty: VirtioType,
        ram: Option<&GuestRam>,
        irq: IrqLine,
        health: Arc<Health>,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let sock = crate::backend::connect_retrying(socket, timeout)
            .map_err(|e| Error::Connect(socket.to_path_buf(), e))?;
        let killer = sock.try_clone().map_err(Error::Setup)?;
        let watchdog =
            Watchdog::start(killer, Arc::clone(&health), irq.clone()).map_err(Error::Setup)?;
        let fe = Frontend::from_stream(sock, 64);
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let dev = VhostUserDevice {
            name: name.to_owned(),
            ty,
            transport: Mutex::new(Transport {
                fe,
                device_features: 0,
                protocol: VhostUserProtocolFeatures::empty(),
                uses_protocol_features: false,
                queues: Vec::new(),
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                queue_sel: 0,
                status: 0,
                interrupts_acked: 0,
                config_acked: false,
            }),
            kicks: Vec::new(),
            irq,
            health,
            timeout,
            watchdog,
        };
        let queues = dev.negotiate(ram)?;
        let kicks = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<io::Result<Vec<_>>>()
            .map_err(Error::Setup)?;
        Ok(VhostUserDevice { kicks, ..dev })
    }

    /// Runs one vhost-user exchange under the watchdog; a failure marks the device failed.
    fn call<T>(&self, op: &'static str, f: impl FnOnce() -> vhost::Result<T>) -> Result<T, Error> {
        if self.health.is_failed() {
            return Err(Error::HungUp);
        }
        self.watchdog.arm(self.timeout);
        let r = f();
        self.watchdog.disarm();
        let r = vhost(op, r);
        if let Err(e) = &r {
            self.health.fail(e);
        }
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Transport> {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn negotiate(&self, ram: Option<&GuestRam>) -> Result<usize, Error> {
        let mut t = self.lock();
        let t = &mut *t;
        let features = self.call("GET_FEATURES", || t.fe.get_features())?;
        let pf_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        t.device_features = features & !pf_bit;
        t.uses_protocol_features = features & pf_bit != 0;
        let mut queues = self.ty.default_queues;
        if t.uses_protocol_features {
            let offered = self.call("GET_PROTOCOL_FEATURES", || t.fe.get_protocol_features())?;
            let wanted = VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::RESET_DEVICE;
            t.protocol = offered & wanted;
            let p = t.protocol;
            self.call("SET_PROTOCOL_FEATURES", || t.fe.set_protocol_features(p))?;
            if t.protocol.contains(VhostUserProtocolFeatures::MQ) {
                let n = self.call("GET_QUEUE_NUM", || t.fe.get_queue_num())?;
                queues = usize::try_from(n).unwrap_or(1).clamp(1, 64);
            }
        }
        self.call("SET_OWNER", || t.fe.set_owner())?;
        if let Some(ram) = ram {
            let regions = mem_regions(ram);
            self.call("SET_MEM_TABLE", || t.fe.set_mem_table(&regions))?;
        }
        if queues == 0 {
            return Err(Error::NoQueues);
        }
        t.queues = vec![Queue::default(); queues];
        info!(
            "{}: vhost-user {} device, features {:#x}, protocol {:#x}, {queues} queues",
            self.name,
            self.ty.id,
            t.device_features,
            t.protocol.bits()
        );
        Ok(queues)
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The virtio device type.
    pub fn virtio_type(&self) -> VirtioType {
        self.ty
    }

    /// The device's shared health.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Registers (`on`) or unregisters every queue's kick eventfd as the
    /// doorbell QueueNotify == queue index of the region at `base`.
    pub fn register_kicks(&self, registrar: &dyn Registrar, base: u64, on: bool) -> io::Result<()> {
        for (q, kick) in self.kicks.iter().enumerate() {
            let ev = IoEvent {
                space: Space::Mmio,
                addr: base + regs::QUEUE_NOTIFY,
                size: Some(AccessSize::B4),
                datamatch: Some(q as u64),
            };
            if on {
                registrar.register_ioevent(&ev, kick)?;
            } else {
                registrar.unregister_ioevent(&ev, kick)?;
            }
        }
        Ok(())
    }

    /// Queue `q`'s kick eventfd (QueueNotify signals it; a KVM frontend would
    /// register it as an ioeventfd).
    pub fn kick_eventfd(&self, q: usize) -> Option<&EventFd> {
        self.kicks.get(q)
    }

    /// Sends a new memory table (after the frontend swapped guest RAM).
    pub fn set_memory(&self, ram: &GuestRam) -> Result<(), Error> {
        let t = self.lock();
        let regions = mem_regions(ram);
        self.call("SET_MEM_TABLE", || t.fe.set_mem_table(&regions))
            .map(|_| ())
    }

    /// Resets the device as a Status write of 0 would.
    pub fn reset(&self) -> Result<(), Error> {
        let mut t = self.lock();
        self.reset_locked(&mut t)
    }

    fn reset_locked(&self, t: &mut Transport) -> Result<(), Error> {
        for q in 0..t.queues.len() {
            if t.queues[q].started {
                self.call("GET_VRING_BASE", || t.fe.get_vring_base(q))?;
            }
            t.queues[q] = Queue::default();
        }
        if t.protocol.contains(VhostUserProtocolFeatures::RESET_DEVICE) {
            self.call("RESET_DEVICE", || t.fe.reset_device())?;
        }
        t.status = 0;
        t.driver_features = 0;
        t.device_features_sel = 0;
        t.driver_features_sel = 0;
        t.queue_sel = 0;
        t.interrupts_acked = self.irq.count();
        t.config_acked = false;
        Ok(())
    }

    fn start(&self, t: &mut Transport) -> Result<(), Error> {
        let pf = if t.uses_protocol_features {
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        } else {
            0
        };
        let features = t.driver_features | pf;
        self.call("SET_FEATURES", || t.fe.set_features(features))?;
        for q in 0..t.queues.len() {
            let queue = t.queues[q];
            if !queue.ready {
                continue;
            }
            let config = VringConfigData {
                queue_max_size: MAX_QUEUE_SIZE,
                queue_size: queue.size,
                flags: 0,
                desc_table_addr: queue.desc,
                used_ring_addr: queue.used,
                avail_ring_addr: queue.avail,
                log_addr: None,
            };
            let kick = self.kicks.get(q).ok_or(Error::NoQueues)?;
            self.call("SET_VRING_NUM", || t.fe.set_vring_num(q, queue.size))?;
            self.call("SET_VRING_BASE", || t.fe.set_vring_base(q, 0))?;
            self.call("SET_VRING_ADDR", || t.fe.set_vring_addr(q, &config))?;
            self.call("SET_VRING_CALL", || {
                t.fe.set_vring_call(q, self.irq.eventfd())
            })?;
            self.call("SET_VRING_KICK", || t.fe.set_vring_kick(q, kick))?;
            if t.uses_protocol_features {
                self.call("SET_VRING_ENABLE", || t.fe.set_vring_enable(q, true))?;
            }
            t.queues[q].started = true;
        }
        if !t.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Without REPLY_ACK the SET_* messages are not acknowledged: a
            // request with a reply proves the backend handled them all, so a
            // kick the driver sends next cannot race the ring's enabling.
            self.call("GET_FEATURES", || t.fe.get_features())?;
        }
        Ok(())
    }

    fn set_status(&self, t: &mut Transport, value: u32) {
        if value == 0 {
            if let Err(e) = self.reset_locked(t) {
                warn!("{}: reset: {e}", self.name);
            }
            return;
        }
        let mut value = value
            & (regs::S_ACKNOWLEDGE
                | regs::S_DRIVER
                | regs::S_DRIVER_OK
                | regs::S_FEATURES_OK
                | regs::S_FAILED);
        let newly = value & !t.status;
        if newly & regs::S_FEATURES_OK != 0 {
            let offered = t.device_features | regs::F_VERSION_1;
            if t.driver_features & !offered != 0 || t.driver_features & regs::F_VERSION_1 == 0 {
                value &= !regs::S_FEATURES_OK;
            }
        }
        if newly & regs::S_DRIVER_OK != 0 {
            if value & regs::S_FEATURES_OK == 0 {
                value &= !regs::S_DRIVER_OK;
            } else if let Err(e) = self.start(t) {
                warn!("{}: cannot start the device: {e}", self.name);
            }
        }
        t.status = value;
    }

    fn read_register(&self, t: &mut Transport, offset: u64) -> u32 {
        let failed = self.health.is_failed();
        let q = t.queues.get(t.queue_sel as usize).copied();
        match offset {
            regs::MAGIC_VALUE => regs::MAGIC,
            regs::VERSION => 2,
            regs::DEVICE_ID => self.ty.id,
            regs::VENDOR_ID => regs::VENDOR,
            regs::DEVICE_FEATURES => {
                let f = t.device_features | regs::F_VERSION_1;
                match t.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            regs::QUEUE_NUM_MAX => q.map_or(0, |_| u32::from(MAX_QUEUE_SIZE)),
            regs::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready)),
            regs::INTERRUPT_STATUS => {
                let mut s = 0;
                if self.irq.count() > t.interrupts_acked {
                    s |= regs::INT_VRING;
                }
                if failed && !t.config_acked {
                    s |= regs::INT_CONFIG;
                }
                s
            }
            regs::STATUS => t.status | if failed { regs::S_NEEDS_RESET } else { 0 },
            regs::SHM_LEN_LOW | regs::SHM_LEN_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_register(&self, t: &mut Transport, offset: u64, value: u32) {
        let setting_up = t.status & regs::S_DRIVER_OK == 0;
        let sel = t.queue_sel as usize;
        match offset {
            regs::DEVICE_FEATURES_SEL => t.device_features_sel = value,
            regs::DRIVER_FEATURES_SEL => t.driver_features_sel = value,
            regs::DRIVER_FEATURES if t.status & regs::S_FEATURES_OK == 0 => {
                match t.driver_features_sel {
                    0 => t.driver_features = (t.driver_features & !0xffff_ffff) | u64::from(value),
                    1 => {
                        t.driver_features =
                            (t.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            regs::QUEUE_SEL => t.queue_sel = value,
            regs::QUEUE_NUM if setting_up => {
                if let Some(q) = t.queues.get_mut(sel) {
                    if value > 0 && value <= u32::from(MAX_QUEUE_SIZE) && value.is_power_of_two() {
                        q.size = value as u16;
                    }
                }
            }
            regs::QUEUE_READY if setting_up => {
                if let Some(q) = t.queues.get_mut(sel) {
                    q.ready = value == 1 && q.size > 0;
                }
            }
            regs::QUEUE_DESC_LOW
            | regs::QUEUE_DESC_HIGH
            | regs::QUEUE_AVAIL_LOW
            | regs::QUEUE_AVAIL_HIGH
            | regs::QUEUE_USED_LOW
            | regs::QUEUE_USED_HIGH
                if setting_up =>
            {
                if let Some(q) = t.queues.get_mut(sel) {
                    let field = match offset & !4 {
                        regs::QUEUE_DESC_LOW => &mut q.desc,
                        regs::QUEUE_AVAIL_LOW => &mut q.avail,
                        _ => &mut q.used,
                    };
                    *field = if offset & 4 == 0 {
                        (*field & !0xffff_ffff) | u64::from(value)
                    } else {
                        (*field & 0xffff_ffff) | (u64::from(value) << 32)
                    };
                }
            }
            regs::QUEUE_NOTIFY => {
                if let Some(k) = self.kicks.get(value as usize) {
                    if let Err(e) = k.write(1) {
                        warn!("{}: kick of queue {value}: {e}", self.name);
                    }
                }
            }
            regs::INTERRUPT_ACK => {
                if value & regs::INT_VRING != 0 {
                    t.interrupts_acked = self.irq.count();
                }
                if value & regs::INT_CONFIG != 0 {
                    t.config_acked = true;
                }
            }
            regs::STATUS => self.set_status(t, value),
            _ => {}
        }
    }

    fn read_config(
        &self,
        t: &mut Transport,
        offset: u64,
        size: AccessSize,
    ) -> Result<u64, AccessError> {
        if !t.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(0);
        }
        let n = size.bytes() as u32;
        let off = u32::try_from(offset).map_err(|_| AccessError::Denied)?;
        let buf = vec![0u8; n as usize];
        let (_, data) = self
            .call("GET_CONFIG", || {
                t.fe.get_config(off, n, VhostUserConfigFlags::empty(), &buf)
            })
            .map_err(|e| AccessError::Io(io::Error::other(e.to_string())))?;
        let mut v = [0u8; 8];
        let len = data.len().min(8);
        v[..len].copy_from_slice(&data[..len]);
        Ok(u64::from_le_bytes(v))
    }
}

impl BusDevice for VhostUserDevice {
    fn read(&self, access: Access) -> Result<u64, AccessError> {
        let Access { offset, size, .. } = access;
        let mut t = self.lock();
        if offset >= regs::CONFIG {
            if self.health.is_failed() {
                return Err(AccessError::DeviceFailed(self.name.clone()));
            }
            return self.read_config(&mut t, offset - regs::CONFIG, size);
        }
        if size != AccessSize::B4 || !offset.is_multiple_of(4) {
            return Err(AccessError::Denied);
        }
        Ok(u64::from(self.read_register(&mut t, offset)))
    }

    fn write(&self, access: Access, value: u64) -> Result<(), AccessError> {
        let Access { offset, size, .. } = access;
        if offset >= regs::CONFIG {
            // Configuration writes are not needed by the supported devices.
            return Ok(());
        }
        if size != AccessSize::B4 || !offset.is_multiple_of(4) {
            return Err(AccessError::Denied);
        }
        let mut t = self.lock();
        self.write_register(&mut t, offset, value as u32);
        Ok(())
    }
}
