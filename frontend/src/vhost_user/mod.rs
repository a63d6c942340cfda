//! Attaching standard vhost-user backends beside Outboard ones.
//!
//! A vhost-user backend (QEMU's `qemu-storage-daemon`, rust-vmm's
//! `vhost-device-*`, Outboard's own backends with `--vhost-user`) implements
//! only the virtio device; the transport is the VMM's job. So for such a
//! device the frontend itself serves the virtio-mmio registers
//! ([`VhostUserDevice`] is a [`BusDevice`]) with the shared
//! [`outboard_virtio_mmio::MmioTransport`], whose
//! [`outboard_virtio_mmio::TransportDevice`] hooks turn the driver's actions
//! into vhost-user messages with the vhost crate's frontend API:
//!
//! * at attach: GET_FEATURES, GET/SET_PROTOCOL_FEATURES (REPLY_ACK, CONFIG,
//!   MQ, RESET_DEVICE where offered, and INFLIGHT_SHMFD under a restart
//!   policy), SET_OWNER, SET_MEM_TABLE with the same memfds every Outboard
//!   backend gets;
//! * configuration-space reads: GET_CONFIG (zeros without the CONFIG
//!   protocol feature);
//! * DRIVER_OK: SET_FEATURES, with INFLIGHT_SHMFD GET_INFLIGHT_FD (once per
//!   activation) and SET_INFLIGHT_FD, then per ready queue SET_VRING_NUM,
//!   _BASE, _ADDR (guest-physical addresses: the memory table maps them
//!   1:1), _CALL (the device's interrupt eventfd), _KICK (the queue's
//!   doorbell eventfd, which QueueNotify signals) and SET_VRING_ENABLE;
//! * Status = 0: GET_VRING_BASE per started queue (stops it) and
//!   RESET_DEVICE; the inflight region is dropped.
//!
//! The backend signals the interrupt line itself: InterruptStatus shows the
//! used-buffer bit while the line's count exceeds its count at the driver's
//! last acknowledgement.
//!
//! A watchdog thread bounds every vhost-user call with the frontend's
//! timeout (the vhost crate itself would wait forever) and notices a backend
//! that hangs up. Without a restart policy either marks the device failed:
//! the driver then reads DEVICE_NEEDS_RESET in Status, gets a
//! configuration-change interrupt so it stops waiting, and nothing in the
//! frontend hangs.
//!
//! With `restart = "on-failure"` ([`crate::restart::RestartPolicy`]) a
//! backend that hangs up (or whose socket fails a request) is reconnected
//! instead: after the policy's backoff the frontend connects to the same
//! socket path again, negotiates, sends the memory table and, if the driver
//! had activated the device, its features, the inflight region (the same
//! one) and every ready queue, resuming at the used index in guest memory,
//! with the same kick and call eventfds; then it kicks every queue and
//! raises the interrupt line once. Meanwhile the registers keep working
//! (the transport is the frontend's); a configuration read, the one access
//! that needs the backend, waits for the reconnection within the timeout.
//! Resuming is exact only with the inflight region or from settled rings
//! (every chain made available already used when the loss was noticed):
//! otherwise, and when the restarted backend lacks a feature, protocol
//! feature or queue the device uses, when a reply is overdue, when the
//! backend refuses a request, and when it does not come back within the
//! policy's limit, the device fails as above, with the reason logged.
//! docs/architecture.md ("Restart: reconnecting a vhost-user backend") has
//! the details.

mod backend;
mod reconnect;
mod watchdog;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use outboard_protocol::{Access, AccessSize, Space};
use outboard_virtio_mmio::virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_QUEUE_NOTIFY,
};
use outboard_virtio_mmio::MmioTransport;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::backend::Backend;
use self::reconnect::{Link, Recovery, Target};
use self::watchdog::Channel;
use crate::bus::{AccessError, BusDevice};
use crate::health::Health;
use crate::irq::IrqLine;
use crate::memory::GuestRam;
use crate::registrar::{IoEvent, Registrar};
use crate::restart::RestartPolicy;

/// Size of the virtio-mmio region the frontend implements for a vhost-user device.
pub const MMIO_SIZE: u64 = outboard_virtio_mmio::MMIO_SIZE;

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
    /// the backend is being reconnected
    #[error("the backend is being reconnected")]
    Reconnecting,
    /// the device has failed
    #[error("the device has failed")]
    Failed,
    /// gave up reconnecting after {attempts} attempts
    #[error("gave up reconnecting after {attempts} attempts")]
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// Why the last one failed.
        #[source]
        last: Box<Error>,
    },
    /// the restarted backend cannot resume the device: {0}
    #[error("the restarted backend cannot resume the device: {0}")]
    Changed(String),
    /// a packed ring cannot be resumed after a crash (no used index in guest memory)
    #[error("a packed ring cannot be resumed after a crash (no used index in guest memory)")]
    PackedRing,
    /// chains were in flight on queue {queue} (available {avail}, used {used}) and the backend keeps no inflight region (INFLIGHT_SHMFD)
    #[error(
        "chains were in flight on queue {queue} (available {avail}, used {used}) and the backend keeps no inflight region (INFLIGHT_SHMFD)"
    )]
    InFlight {
        /// Queue index.
        queue: usize,
        /// The driver's available index.
        avail: u16,
        /// The used index.
        used: u16,
    },
    /// the device has queues but no guest memory
    #[error("the device has queues but no guest memory")]
    NoMemory,
    /// cannot read queue {queue}'s ring indices
    #[error("cannot read queue {queue}'s ring indices")]
    RingIndex {
        /// Queue index.
        queue: usize,
        /// The guest memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// How the frontend drives one vhost-user backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOptions {
    /// Longest wait for any one reply; also how long a configuration read
    /// waits for a reconnection, and the bound on each reconnection's
    /// connect and replay.
    pub timeout: Duration,
    /// What happens when the backend goes away.
    pub restart: RestartPolicy,
}

impl ConnectOptions {
    /// `timeout`, and no restart.
    pub fn new(timeout: Duration) -> Self {
        ConnectOptions {
            timeout,
            restart: RestartPolicy::default(),
        }
    }
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

/// The transport's registers and the vhost-user side its hooks drive.
struct Inner {
    transport: MmioTransport,
    backend: Backend,
}

/// A vhost-user backend behind a frontend-implemented virtio-mmio transport.
pub struct VhostUserDevice {
    name: String,
    ty: VirtioType,
    inner: Arc<Mutex<Inner>>,
    kicks: Arc<[EventFd]>,
    health: Arc<Health>,
    link: Arc<Link>,
    timeout: Duration,
    /// The reconnecting thread (with `restart = "on-failure"`); dropped first.
    _recovery: Option<Recovery>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("name", &self.name)
            .field("type", &self.ty)
            .finish_non_exhaustive()
    }
}

impl VhostUserDevice {
    /// Connects to the backend at `socket` (retrying while it starts, within
    /// `options.timeout`), negotiates, and sends the memory table. `irq` is
    /// the line the backend's call eventfds signal. With
    /// `options.restart` on-failure a lost backend is reconnected (see the
    /// module documentation).
    pub fn connect(
        name: &str,
        socket: &Path,
        ty: VirtioType,
        ram: Option<Arc<GuestRam>>,
        irq: IrqLine,
        health: Arc<Health>,
        options: ConnectOptions,
    ) -> Result<Self, Error> {
        let timeout = options.timeout;
        let sock = crate::backend::connect_retrying(socket, timeout)
            .map_err(|e| Error::Connect(socket.to_path_buf(), e))?;
        let link = Link::new(name, options.restart, Arc::clone(&health), irq.clone());
        let chan = Channel::open(sock, Arc::clone(&link), 0, false, timeout)?;
        let mut backend = Backend::new(name, ty, chan, irq);
        let queues = backend.negotiate(ram)?;
        let kicks: Arc<[EventFd]> = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<io::Result<Vec<_>>>()
            .map_err(Error::Setup)?
            .into();
        backend.set_kicks(Arc::clone(&kicks));
        let transport = MmioTransport::new(&backend);
        let inner = Arc::new(Mutex::new(Inner { transport, backend }));
        let recovery = if link.restarts() {
            let target = Target {
                socket: socket.to_path_buf(),
                inner: Arc::clone(&inner),
                timeout,
            };
            Some(Recovery::start(Arc::clone(&link), target).map_err(Error::Setup)?)
        } else {
            None
        };
        Ok(VhostUserDevice {
            name: name.to_owned(),
            ty,
            inner,
            kicks,
            health,
            link,
            timeout,
            _recovery: recovery,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// How often the frontend reconnected to a restarted backend.
    pub fn reconnects(&self) -> u32 {
        self.link.reconnects()
    }

    /// True when the backend keeps an inflight region for the frontend
    /// (INFLIGHT_SHMFD, negotiated only with `restart = "on-failure"`), so
    /// a restarted one resumes even with requests in flight.
    pub fn keeps_inflight(&self) -> bool {
        self.link.inflight()
    }

    /// True while the frontend is reconnecting to a lost backend.
    pub fn is_reconnecting(&self) -> bool {
        self.link.is_down()
    }

    /// Registers (`on`) or unregisters every queue's kick eventfd as the
    /// doorbell QueueNotify == queue index of the region at `base`.
    pub fn register_kicks(&self, registrar: &dyn Registrar, base: u64, on: bool) -> io::Result<()> {
        for (q, kick) in self.kicks.iter().enumerate() {
            let ev = IoEvent {
                space: Space::Mmio,
                addr: base + u64::from(VIRTIO_MMIO_QUEUE_NOTIFY),
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
    pub fn set_memory(&self, ram: &Arc<GuestRam>) -> Result<(), Error> {
        self.lock().backend.set_memory(ram)
    }

    /// Resets the device as a Status write of 0 would.
    pub fn reset(&self) -> Result<(), Error> {
        let mut inner = self.lock();
        let Inner { transport, backend } = &mut *inner;
        let _ = backend.take_reset_error();
        transport.reset(backend);
        backend.take_reset_error().map_or(Ok(()), Err)
    }

    /// The failure to report for a configuration access of a failed device.
    fn failed(&self) -> AccessError {
        AccessError::DeviceFailed(self.name.clone())
    }
}

impl BusDevice for VhostUserDevice {
    /// Registers are the frontend's and answer at once, reconnection or
    /// not. A configuration read needs the backend: while it is being
    /// reconnected the read waits (within the timeout) and then asks the
    /// new one.
    fn read(&self, access: Access) -> Result<u64, AccessError> {
        let Access { offset, size, .. } = access;
        let config = offset >= u64::from(VIRTIO_MMIO_CONFIG);
        let deadline = Instant::now() + self.timeout;
        loop {
            if config {
                match self.link.wait_up(deadline) {
                    Ok(()) => {}
                    Err(Error::Reconnecting) => return Err(AccessError::Timeout),
                    Err(_) => return Err(self.failed()),
                }
            }
            let mut inner = self.lock();
            let Inner { transport, backend } = &mut *inner;
            let value = transport.read(backend, offset, size.bytes());
            if config && backend.take_config_lost() {
                // The backend went away during GET_CONFIG: wait for the next one.
                continue;
            }
            if config && self.health.is_failed() {
                // GET_CONFIG failed: the value is not the device's.
                return Err(self.failed());
            }
            return Ok(value);
        }
    }

    fn write(&self, access: Access, value: u64) -> Result<(), AccessError> {
        let Access { offset, size, .. } = access;
        let mut inner = self.lock();
        let Inner { transport, backend } = &mut *inner;
        transport.write(backend, offset, size.bytes(), value);
        Ok(())
    }
}
