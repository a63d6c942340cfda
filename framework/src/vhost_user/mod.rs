//! Serving a [`VirtioDevice`] over vhost-user instead of ioregionfd.
//!
//! The same device logic that [`crate::virtio::VirtioMmio`] puts behind the
//! virtio-mmio transport is wrapped here for the vhost-user-backend crate, so
//! a VMM that only speaks vhost-user (QEMU, cloud-hypervisor, Outboard's own
//! frontend) can use it. The frontend then owns the virtio transport; this
//! side sees guest memory (SET_MEM_TABLE), vrings, kick eventfds (each queue
//! kick calls [`VirtioDevice::process_queue`]) and call eventfds (signalled
//! when buffers were used).
//!
//! The backend keeps listening on its path: each frontend that connects
//! gets a session of its own (a fresh vhost-user-backend daemon with its
//! own vring threads, the device reset), one session at a time, as the
//! vhost-device backends do; a frontend that reconnects (QEMU's
//! `reconnect-ms`) finds the device again. When the frontend hangs up, the
//! session's vring threads are stopped and the next frontend is accepted.
//!
//! The device's own fds (the console's input socket), registered through
//! its [`EventOps`], become extra listeners in the session's epoll loop.
//!
//! With the INFLIGHT_SHMFD protocol feature (offered to every frontend) the
//! heads each queue has in flight are recorded in a shared area the
//! frontend keeps across reconnections, and a session that is handed an
//! area a previous backend used resubmits them first (`inflight.rs`).
//!
//! vhost-user has no DEVICE_NEEDS_RESET without the STATUS protocol
//! feature, so a queue the device cannot process is logged and left alone
//! (the frontend's driver times out on it) rather than ending the session.
//!
//! The crate never talks to the frontend directly: Outboard accepts the
//! frontend itself and relays its messages through a validating front door
//! ([`relay`]) that refuses what the crate mishandles (more fds than a
//! request takes, unknown requests, oversized payloads), makes vring
//! eventfds nonblocking, and ends the process once the frontend is gone
//! if a crate thread is stuck and the session cannot be wound down.
//! `docs/vhost-user-notes.md` lists what is contained this way and what is
//! left.

mod inflight;
mod link;
pub mod relay;
mod rules;

pub use inflight::Error as InflightError;
pub use link::CONFINED_SESSIONS;
pub use rules::Refusal;

use std::convert::Infallible;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock, VringT,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::events::{EventOps, Watch};
use crate::virtio::{inflight as hook, QueueWorker, VirtioDevice, RING_FEATURES};
use inflight::{Start, Tracking};

/// Errors serving over vhost-user.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot create the daemon's exit event
    #[error("cannot create the daemon's exit event")]
    ExitEvent(#[source] io::Error),
    /// vhost-user daemon failed: {0}
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// the device cannot start
    #[error("the device cannot start")]
    DeviceInit(#[source] io::Error),
    /// setting up the session's sockets failed
    #[error("vhost-user setup failed")]
    Setup(#[source] link::Error),
    /// the confinement hook failed
    #[error("cannot confine the backend")]
    Confine(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// the relay refused a message or failed
    #[error("vhost-user relay")]
    Relay(#[source] relay::Error),
}

/// Locks `m`, taking over a lock poisoned by a panicking queue thread (the
/// state behind it is the device's, which stays usable after a reset).
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How one queue is served since the last activation.
enum Worker {
    /// Not asked yet.
    Unasked,
    /// With [`VirtioDevice::process_queue`], under the device lock.
    Device,
    /// With the device's [`QueueWorker`], on the queue's own thread.
    Own(Box<dyn QueueWorker>),
}

/// What every session shares: the device and what it declares.
struct Shared<D> {
    device: Mutex<D>,
    name: String,
    num_queues: usize,
    max_queue_size: usize,
    parallel: bool,
}

impl<D: VirtioDevice> Shared<D> {
    fn new(mut device: D) -> Self {
        let sizes = device.queue_max_sizes();
        let max = sizes.iter().copied().max().unwrap_or(256);
        let max = if max.is_power_of_two() { max } else { 256 };
        // Whether the device serves its queues in parallel; the probe's
        // workers are dropped, real ones are made after activation.
        let parallel =
            sizes.len() > 1 && (0..sizes.len()).all(|i| device.queue_worker(i).is_some());
        Shared {
            parallel,
            name: device.name().to_owned(),
            num_queues: sizes.len(),
            max_queue_size: usize::from(max),
            device: Mutex::new(device),
        }
    }
}

/// A [`VirtioDevice`] as the vhost-user backend of one session. A device
/// that hands out [`QueueWorker`]s gets one vhost-user-backend thread per
/// queue, so its queues are served in parallel; any other device gets one
/// thread for all its queues, served under the device lock.
pub struct Adapter<D: VirtioDevice + Send + 'static> {
    shared: Arc<Shared<D>>,
    workers: Vec<Mutex<Worker>>,
    memory: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap<()>>>>,
    exit: (EventConsumer, EventNotifier),
    ops: Mutex<EventOps>,
    tracking: Arc<Tracking>,
}

impl<D: VirtioDevice + Send + 'static> std::fmt::Debug for Adapter<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("device", &self.shared.name)
            .field("num_queues", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice + Send + 'static> Adapter<D> {
    fn new(shared: Arc<Shared<D>>) -> Result<Self, Error> {
        let exit =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(Error::ExitEvent)?;
        Ok(Adapter {
            workers: (0..shared.num_queues)
                .map(|_| Mutex::new(Worker::Unasked))
                .collect(),
            tracking: Arc::new(Tracking::new(shared.num_queues)),
            shared,
            memory: Mutex::new(None),
            exit,
            ops: Mutex::new(EventOps::detached()),
        })
    }

    /// Serves queue `index` on `vring`; signals the driver if buffers were
    /// used and it wants to know (EVENT_IDX's `used_event`). The first time
    /// after the vring (re)started, the inflight area is consulted first and
    /// the driver is signalled once anyway (a completion the previous
    /// backend put on the used ring may never have been signalled).
    fn process(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = lock(&self.memory).as_ref().map(GuestAddressSpace::memory) else {
            return Ok(());
        };
        let Some(worker) = self.workers.get(index) else {
            return Ok(());
        };
        let mut worker = lock(worker);
        if matches!(*worker, Worker::Unasked) {
            *worker = match lock(&self.shared.device).queue_worker(index) {
                Some(w) => Worker::Own(w),
                None => Worker::Device,
            };
        }
        let mut state = vring.get_mut();
        let queue: &mut Queue = state.get_queue_mut();
        // Held while the queue is served: a new area waits for it.
        let mut slot = self.tracking.slot(index);
        let mut restarted = false;
        if let Some(slot) = slot.as_mut().filter(|s| s.starting && queue.ready()) {
            slot.starting = false;
            restarted = queue
                .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                .is_ok_and(|i| i.0 != 0);
            if let Some(log) = &slot.log {
                self.resume(index, log, queue, &mem);
            }
        }
        let log = slot.as_ref().and_then(|s| s.log.clone());
        let mut serve = || match &mut *worker {
            Worker::Own(w) => w.process(queue, &mem),
            _ => lock(&self.shared.device).process_queue(index, queue, &mem),
        };
        let result = match log {
            Some(log) => hook::with_log(Box::new(log), serve),
            None => serve(),
        };
        drop(slot);
        let name = &self.shared.name;
        let used = match result {
            Ok(used) => used,
            Err(e) => {
                warn!(
                    "{name}: queue {index} stalled: {}",
                    outboard_protocol::error_chain(&e)
                );
                false
            }
        };
        if restarted || (used && state.needs_notification().unwrap_or(true)) {
            state.signal_used_queue()?;
        }
        Ok(())
    }

    /// Consults queue `index`'s inflight area as its vring starts.
    fn resume(
        &self,
        index: usize,
        log: &inflight::QueueLog,
        queue: &mut Queue,
        mem: &crate::virtio::Memory,
    ) {
        let name = &self.shared.name;
        let base = queue.next_avail();
        match log.start(queue, mem) {
            Ok(Start::Fresh) => {}
            Ok(Start::Resumed { used, heads }) if heads.is_empty() => info!(
                "{name}: queue {index} resumes at {used} (SET_VRING_BASE said {base}), \
                 nothing in flight"
            ),
            Ok(Start::Resumed { used, heads }) => info!(
                "{name}: queue {index} resumes at {used} (SET_VRING_BASE said {base}), \
                 resubmitting heads {heads:?}"
            ),
            Ok(Start::Mismatch { used, why }) => warn!(
                "{name}: queue {index}: the inflight area does not match the ring ({why}); \
                 cleared, serving again from {used}"
            ),
            Err(e) => warn!("{name}: queue {index}: cannot read the ring to resume: {e}"),
        }
    }

    /// The global index of the `local`-th queue of thread `thread` (see
    /// [`VhostUserBackend::queues_per_thread`]).
    fn queue_index(&self, thread: usize, local: usize) -> Option<usize> {
        let index = if self.shared.parallel {
            (local == 0).then_some(thread)?
        } else {
            (thread == 0).then_some(local)?
        };
        (index < self.workers.len()).then_some(index)
    }
}

impl<D: VirtioDevice + Send + 'static> VhostUserBackend for Adapter<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.workers.len()
    }

    fn max_queue_size(&self) -> usize {
        self.shared.max_queue_size
    }

    fn features(&self) -> u64 {
        lock(&self.shared.device).features()
            | RING_FEATURES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        lock(&self.shared.device).activate(features);
        for w in &self.workers {
            *lock(w) = Worker::Unasked;
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // INFLIGHT_SHMFD is answered by the relay, never by the crate.
        let base = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        if lock(&self.shared.device).config_size() > 0 {
            base | VhostUserProtocolFeatures::CONFIG
        } else {
            base
        }
    }

    fn reset_device(&self) {
        for w in &self.workers {
            *lock(w) = Worker::Unasked;
        }
        lock(&self.shared.device).reset();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets it on every vring itself.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size as usize];
        lock(&self.shared.device).read_config(u64::from(offset), &mut buf);
        buf
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        lock(&self.shared.device).write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        *lock(&self.memory) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let n = self.workers.len().min(64);
        if self.shared.parallel {
            (0..n).map(|i| 1u64 << i).collect()
        } else {
            vec![u64::MAX >> (64 - n.max(1))]
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let event = usize::from(device_event);
        if event < vrings.len() {
            return match self.queue_index(thread_id, event) {
                Some(q) => self.process(q, &vrings[event]),
                None => Ok(()),
            };
        }
        // Device fds are registered on thread 0, which serves every queue
        // of a serial device and queue 0 of a parallel one.
        let Some(id) = event
            .checked_sub(self.workers.len() + 1)
            .and_then(|id| u32::try_from(id).ok())
        else {
            return Ok(());
        };
        let ops = lock(&self.ops).clone();
        let more = lock(&self.shared.device).handle_event(id, &ops);
        let Some(q) = more else {
            return Ok(());
        };
        let local = if self.shared.parallel {
            q.checked_sub(thread_id)
        } else {
            Some(q)
        };
        match local.and_then(|l| vrings.get(l)) {
            Some(vring) => self.process(q, vring),
            None => {
                warn!(
                    "{}: device event for queue {q} outside its thread",
                    self.shared.name
                );
                Ok(())
            }
        }
    }
}

/// Serves `device` over vhost-user at `path`, one frontend after another,
/// until a setup step fails (returned as the error). Unconfined: see
/// [`serve_confined`].
pub fn serve<D: VirtioDevice + Send + 'static>(device: D, path: &Path) -> Result<(), Error> {
    serve_sessions(device, path, None::<fn() -> Result<(), Infallible>>, None)
}

/// Serves `device` over vhost-user at `path`, one frontend after another,
/// through the validating relay (see [`relay`]); returns after
/// [`CONFINED_SESSIONS`] sessions, or when a setup step fails.
///
/// `confine` is the sandbox hook. It runs while the process is still
/// single-threaded, after `path` is bound and the internal connections of
/// every session are made, before any thread starts (vring workers, the
/// daemon's request thread, the relay) and before the first frontend is
/// accepted. From then on the process opens no file and creates, binds or
/// connects no socket; see `docs/vhost-user-notes.md` for the system calls
/// it still makes.
///
/// A session whose frontend sends a refused message, or which
/// vhost-user-backend ends with an error, is reported on stderr
/// (`PROGRAM: error: ...`) and the next frontend is served. Once a
/// frontend's connection closes, its session must wind down (its vring
/// threads stopped) within [`relay::GRACE`], or the process is ended (exit
/// status [`relay::EXIT_STUCK`], with a message on stderr): a thread stuck
/// in the crate cannot be stopped any other way.
pub fn serve_confined<D, F, E>(device: D, path: &Path, confine: F) -> Result<(), Error>
where
    D: VirtioDevice + Send + 'static,
    F: FnOnce() -> Result<(), E>,
    E: std::error::Error + Send + Sync + 'static,
{
    serve_sessions(device, path, Some(confine), Some(CONFINED_SESSIONS))
}

/// The name this process goes by in messages: its file name, or `name`.
fn program_name(name: &str) -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| name.to_owned())
}

/// Serves sessions (at most `limit`); `confine`, if any, runs once the
/// sockets are made. A confined process makes its `limit` internal
/// connections beforehand.
fn serve_sessions<D, F, E>(
    device: D,
    path: &Path,
    confine: Option<F>,
    limit: Option<usize>,
) -> Result<(), Error>
where
    D: VirtioDevice + Send + 'static,
    F: FnOnce() -> Result<(), E>,
    E: std::error::Error + Send + Sync + 'static,
{
    let shared = Arc::new(Shared::new(device));
    let name = shared.name.clone();
    let program = program_name(&name);
    let frontends = link::Frontends::bind(path).map_err(Error::Setup)?;
    let mut links = match (&confine, limit) {
        (Some(_), Some(n)) => link::Links::pool(n).map_err(Error::Setup)?,
        _ => link::Links::per_session(),
    };
    if let Some(confine) = confine {
        confine().map_err(|e| Error::Confine(Box::new(e)))?;
    }
    // Confined from here on: threads may start, nothing may be opened.
    info!("{name}: serving vhost-user on {}", path.display());
    let mut served = 0usize;
    loop {
        if limit.is_some_and(|l| served >= l) {
            info!("{name}: served {served} vhost-user sessions, the most this process can");
            return Ok(());
        }
        let Some((listener, relay_end)) = links.next().map_err(Error::Setup)? else {
            info!("{name}: served {served} vhost-user sessions, the most this process can");
            return Ok(());
        };
        let frontend = frontends.accept().map_err(Error::Setup)?;
        served += 1;
        info!("{name}: vhost-user frontend connected (session {served})");
        match session(&shared, &program, frontend, listener, relay_end)? {
            Ok(()) => info!("{name}: vhost-user frontend disconnected"),
            Err(e) => eprintln!("{program}: error: {}", outboard_protocol::error_chain(&e)),
        }
    }
}

/// One session's verdict: what the frontend or the crate did wrong, which
/// ends the session but not the backend.
type Verdict = Result<(), Error>;

/// Serves `frontend` with a fresh daemon whose connection waits on
/// `listener` (its other end is `relay_end`). The outer error is a setup
/// failure, which ends the backend.
fn session<D: VirtioDevice + Send + 'static>(
    shared: &Arc<Shared<D>>,
    program: &str,
    frontend: UnixStream,
    listener: &mut Listener,
    relay_end: UnixStream,
) -> Result<Verdict, Error> {
    let backend = Arc::new(Adapter::new(Arc::clone(shared))?);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let mut daemon = VhostUserDaemon::new(shared.name.clone(), Arc::clone(&backend), mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    if let Some(handler) = daemon.get_epoll_handlers().first() {
        let ops = EventOps::new(Arc::new(Listeners {
            handler: Arc::downgrade(handler),
            first: backend.workers.len() as u64 + 1,
        }));
        *lock(&backend.ops) = ops.clone();
        let mut device = lock(&shared.device);
        device.init(&ops).map_err(Error::DeviceInit)?;
        // Whatever an earlier session left, this one starts from power-on.
        device.reset();
    }
    let inflight = relay::Inflight {
        tracking: Arc::clone(&backend.tracking),
        max_queues: u16::try_from(shared.num_queues).unwrap_or(u16::MAX),
    };
    let mut relay = relay::Relay::start(frontend, relay_end, program.to_owned(), inflight)
        .map_err(Error::Relay)?;
    let offered = backend.features();
    let result = daemon
        .start(listener)
        .and_then(|()| daemon.wait())
        .or_else(|e| match e {
            vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            ) => Ok(()),
            e => Err(e),
        })
        .map_err(|e| match e {
            vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::InvalidParam) => {
                Error::Daemon(format!(
                    "{e}: the frontend sent a request with invalid parameters, such as \
                     SET_FEATURES with bits outside the offered {offered:#x}"
                ))
            }
            e => Error::Daemon(e.to_string()),
        });
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // The relay's verdict (a refused message) comes first: the crate only
    // saw the connection close.
    let verdict = relay.finish().map_err(Error::Relay);
    // Dropping the daemon joins the vring threads; if one is stuck, the
    // relay's supervisor ends the process.
    drop(daemon);
    relay.disarm();
    Ok(match (verdict, result) {
        // The crate ended the session (and closed its end) while the relay
        // was passing it the next message: the crate's reason is the one.
        (Err(Error::Relay(relay::Error::Send(e))), Err(why))
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            Err(why)
        }
        (verdict, result) => verdict.and(result),
    })
}

/// A session daemon's epoll handler.
type Handler<D> = VringEpollHandler<Arc<Adapter<D>>>;

/// A device's [`EventOps`] over the daemon's epoll handler: device id `n`
/// is listener `first + n` (the ids up to the number of queues are the
/// daemon's own).
struct Listeners<D: VirtioDevice + Send + 'static> {
    handler: Weak<Handler<D>>,
    first: u64,
}

impl<D: VirtioDevice + Send + 'static> Listeners<D> {
    fn listener(&self, id: u32) -> io::Result<(Arc<Handler<D>>, u64)> {
        let handler = self
            .handler
            .upgrade()
            .ok_or_else(|| io::Error::other("the vhost-user daemon has stopped"))?;
        // vhost-user-backend reports listeners as 16-bit device events.
        let data = self.first + u64::from(id);
        if data > u64::from(u16::MAX) {
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        }
        Ok((handler, data))
    }
}

impl<D: VirtioDevice + Send + 'static> Watch for Listeners<D> {
    fn add(&self, fd: RawFd, id: u32, writable: bool) -> io::Result<()> {
        let (handler, data) = self.listener(id)?;
        let set = if writable {
            EventSet::OUT
        } else {
            EventSet::IN
        };
        handler.register_listener(fd, set, data)
    }

    fn remove(&self, fd: RawFd, id: u32) -> io::Result<()> {
        let (handler, data) = self.listener(id)?;
        handler.unregister_listener(fd, EventSet::IN, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{Memory, QueueError};
    use std::os::unix::net::UnixStream;

    struct Nop;

    impl VirtioDevice for Nop {
        fn name(&self) -> &str {
            "vu-nop"
        }
        fn device_type(&self) -> u32 {
            4
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
        fn reset(&mut self) {}
        fn process_queue(
            &mut self,
            _index: usize,
            _queue: &mut Queue,
            _mem: &Memory,
        ) -> Result<bool, QueueError> {
            Ok(false)
        }
    }

    /// Names of this process's threads.
    fn thread_names() -> Vec<String> {
        let tasks = std::fs::read_dir("/proc/self/task").unwrap_or_else(|e| panic!("{e}"));
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .map(|n| n.trim().to_owned())
            .collect()
    }

    #[test]
    fn serve_when_confined_and_frontends_come_and_go_then_confine_first_and_each_served() {
        let dir = std::env::temp_dir().join(format!("outboard-vu-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("confine.sock");
        let p = path.clone();
        let client = std::thread::spawn(move || {
            for _ in 0..2 {
                let mut tries = 0;
                let mut s = loop {
                    match UnixStream::connect(&p) {
                        Ok(s) => break s,
                        Err(_) if tries < 500 => {
                            tries += 1;
                            std::thread::sleep(std::time::Duration::from_millis(10));
                        }
                        Err(e) => panic!("no listener at {}: {e}", p.display()),
                    }
                };
                // GET_FEATURES, answered by this session's daemon; then hang up.
                use std::io::{Read, Write};
                s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
                    .unwrap_or_else(|e| panic!("{e}"));
                let mut reply = [0u8; 20];
                s.read_exact(&mut reply).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(reply[0], 1, "a GET_FEATURES reply");
            }
        });
        let mut seen = None;
        let result = serve_sessions(
            Nop,
            &path,
            Some(|| {
                seen = Some(thread_names());
                Ok::<(), Infallible>(())
            }),
            Some(2),
        );
        client.join().unwrap_or_else(|_| panic!("client panicked"));
        assert!(result.is_ok(), "{result:?}");
        let seen = seen.unwrap_or_else(|| panic!("confine never ran"));
        for ours in [
            "vring_worker",
            "vu-relay",
            "vu-replies",
            "vu-supervisor",
            "vu-nop",
        ] {
            assert!(
                !seen.iter().any(|n| n == ours),
                "{ours} before confine: {seen:?}"
            );
        }
        assert!(!path.exists(), "the socket is removed when serving ends");
        // Every session wound down in time: the supervisors must not end
        // this process.
        std::thread::sleep(relay::GRACE + std::time::Duration::from_millis(300));
        let _ = std::fs::remove_dir(&dir);
    }
}
