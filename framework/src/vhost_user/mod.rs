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
//! The device's own fds (the console's input socket), registered through
//! its [`EventOps`], become extra listeners in the daemon's epoll loop.
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
//! even if a crate thread is stuck. `docs/vhost-user-notes.md` lists what
//! is contained this way and what is left.

mod link;
pub mod relay;
mod rules;

pub use rules::Refusal;

use std::convert::Infallible;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock, VringT,
};
use virtio_queue::Queue;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::events::{EventOps, Watch};
use crate::virtio::{QueueWorker, VirtioDevice, RING_FEATURES};

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

type Shared<D> = Arc<Adapter<D>>;

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

/// A [`VirtioDevice`] as a vhost-user backend. A device that hands out
/// [`QueueWorker`]s gets one vhost-user-backend thread per queue, so its
/// queues are served in parallel; any other device gets one thread for all
/// its queues, served under the device lock.
pub struct Adapter<D: VirtioDevice + Send + 'static> {
    device: Mutex<D>,
    name: String,
    workers: Vec<Mutex<Worker>>,
    memory: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap<()>>>>,
    exit: (EventConsumer, EventNotifier),
    ops: Mutex<EventOps>,
    max_queue_size: usize,
    parallel: bool,
}

impl<D: VirtioDevice + Send + 'static> std::fmt::Debug for Adapter<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("device", &self.name)
            .field("num_queues", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice + Send + 'static> Adapter<D> {
    fn new(mut device: D) -> Result<Self, Error> {
        let exit =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(Error::ExitEvent)?;
        let sizes = device.queue_max_sizes();
        let max = sizes.iter().copied().max().unwrap_or(256);
        let max = if max.is_power_of_two() { max } else { 256 };
        // Whether the device serves its queues in parallel; the probe's
        // workers are dropped, real ones are made after activation.
        let parallel =
            sizes.len() > 1 && (0..sizes.len()).all(|i| device.queue_worker(i).is_some());
        Ok(Adapter {
            parallel,
            name: device.name().to_owned(),
            workers: sizes.iter().map(|_| Mutex::new(Worker::Unasked)).collect(),
            max_queue_size: usize::from(max),
            device: Mutex::new(device),
            memory: Mutex::new(None),
            exit,
            ops: Mutex::new(EventOps::detached()),
        })
    }

    /// Serves queue `index` on `vring`; signals the driver if buffers were
    /// used and it wants to know (EVENT_IDX's `used_event`).
    fn process(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(mem) = lock(&self.memory).as_ref().map(GuestAddressSpace::memory) else {
            return Ok(());
        };
        let Some(worker) = self.workers.get(index) else {
            return Ok(());
        };
        let mut worker = lock(worker);
        if matches!(*worker, Worker::Unasked) {
            *worker = match lock(&self.device).queue_worker(index) {
                Some(w) => Worker::Own(w),
                None => Worker::Device,
            };
        }
        let mut state = vring.get_mut();
        let queue: &mut Queue = state.get_queue_mut();
        let result = match &mut *worker {
            Worker::Own(w) => w.process(queue, &mem),
            _ => lock(&self.device).process_queue(index, queue, &mem),
        };
        match result {
            Ok(true) => {
                if state.needs_notification().unwrap_or(true) {
                    state.signal_used_queue()?;
                }
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => {
                warn!(
                    "{}: queue {index} stalled: {}",
                    self.name,
                    outboard_protocol::error_chain(&e)
                );
                Ok(())
            }
        }
    }

    /// The global index of the `local`-th queue of thread `thread` (see
    /// [`VhostUserBackend::queues_per_thread`]).
    fn queue_index(&self, thread: usize, local: usize) -> Option<usize> {
        let index = if self.parallel {
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
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        lock(&self.device).features()
            | RING_FEATURES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        lock(&self.device).activate(features);
        for w in &self.workers {
            *lock(w) = Worker::Unasked;
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let base = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::RESET_DEVICE;
        if lock(&self.device).config_size() > 0 {
            base | VhostUserProtocolFeatures::CONFIG
        } else {
            base
        }
    }

    fn reset_device(&self) {
        for w in &self.workers {
            *lock(w) = Worker::Unasked;
        }
        lock(&self.device).reset();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets it on every vring itself.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size as usize];
        lock(&self.device).read_config(u64::from(offset), &mut buf);
        buf
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        lock(&self.device).write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        *lock(&self.memory) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let n = self.workers.len().min(64);
        if self.parallel {
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
        let more = lock(&self.device).handle_event(id, &ops);
        let Some(q) = more else {
            return Ok(());
        };
        let local = if self.parallel {
            q.checked_sub(thread_id)
        } else {
            Some(q)
        };
        match local.and_then(|l| vrings.get(l)) {
            Some(vring) => self.process(q, vring),
            None => {
                warn!(
                    "{}: device event for queue {q} outside its thread",
                    self.name
                );
                Ok(())
            }
        }
    }
}

/// Serves `device` to the first vhost-user frontend that connects at
/// `path`; returns when it disconnects. Unconfined: see [`serve_confined`].
pub fn serve<D: VirtioDevice + Send + 'static>(device: D, path: &Path) -> Result<(), Error> {
    serve_confined(device, path, || Ok::<(), Infallible>(()))
}

/// Serves `device` to the first vhost-user frontend that connects at
/// `path`, through the validating relay (see [`relay`]); returns when the
/// frontend disconnects, or with [`Error::Relay`] when one of its messages
/// was refused.
///
/// `confine` is the sandbox hook. It runs while the process is still
/// single-threaded, after the frontend is accepted and the internal
/// connection made, and before any thread starts (vring workers, the
/// daemon's request thread, the relay). From then on the process opens no
/// file and creates, binds or connects no socket; see
/// `docs/vhost-user-notes.md` for the system calls it still makes.
///
/// Once the frontend's connection closes, the process ends within
/// [`relay::GRACE`] even if the crate's threads are stuck (exit status
/// [`relay::EXIT_STUCK`], with a message on stderr); returning from here in
/// time disarms that.
pub fn serve_confined<D, F, E>(device: D, path: &Path, confine: F) -> Result<(), Error>
where
    D: VirtioDevice + Send + 'static,
    F: FnOnce() -> Result<(), E>,
    E: std::error::Error + Send + Sync + 'static,
{
    let name = device.name().to_owned();
    let program = std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| name.clone());
    let backend: Shared<D> = Arc::new(Adapter::new(device)?);
    info!("{name}: serving vhost-user on {}", path.display());
    let frontend = link::accept_first(path).map_err(Error::Setup)?;
    let link::Link {
        mut listener,
        relay: relay_end,
    } = link::Link::new().map_err(Error::Setup)?;

    confine().map_err(|e| Error::Confine(Box::new(e)))?;
    // Confined from here on: threads may start, nothing may be opened.

    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let mut daemon = VhostUserDaemon::new(name.clone(), Arc::clone(&backend), mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    if let Some(handler) = daemon.get_epoll_handlers().first() {
        let ops = EventOps::new(Arc::new(Listeners {
            handler: Arc::downgrade(handler),
            first: backend.workers.len() as u64 + 1,
        }));
        *lock(&backend.ops) = ops.clone();
        lock(&backend.device)
            .init(&ops)
            .map_err(Error::DeviceInit)?;
    }
    let mut relay = relay::Relay::start(frontend, relay_end, program).map_err(Error::Relay)?;
    let offered = backend.features();
    let result = daemon
        .start(&mut listener)
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
    drop(listener);
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // The relay's verdict (a refused message) comes first: the crate only
    // saw the connection close.
    let verdict = relay.finish().map_err(Error::Relay);
    info!("{name}: vhost-user frontend disconnected");
    // Dropping the daemon joins the vring threads; if one is stuck, the
    // relay's supervisor ends the process.
    drop(daemon);
    relay.disarm();
    verdict.and(result)
}

/// A device's [`EventOps`] over the daemon's epoll handler: device id `n`
/// is listener `first + n` (the ids up to the number of queues are the
/// daemon's own).
struct Listeners<D: VirtioDevice + Send + 'static> {
    handler: Weak<VringEpollHandler<Shared<D>>>,
    first: u64,
}

impl<D: VirtioDevice + Send + 'static> Listeners<D> {
    fn listener(&self, id: u32) -> io::Result<(Arc<VringEpollHandler<Shared<D>>>, u64)> {
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
    fn add(&self, fd: RawFd, id: u32) -> io::Result<()> {
        let (handler, data) = self.listener(id)?;
        handler.register_listener(fd, EventSet::IN, data)
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
    fn serve_confined_when_frontend_connects_then_confine_runs_before_any_thread() {
        let dir = std::env::temp_dir().join(format!("outboard-vu-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("confine.sock");
        let p = path.clone();
        let client = std::thread::spawn(move || {
            for _ in 0..500 {
                // Connect and hang up at once.
                if UnixStream::connect(&p).is_ok() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            panic!("no listener at {}", p.display());
        });
        let mut seen = None;
        let result = serve_confined(Nop, &path, || {
            seen = Some(thread_names());
            // The frontend hangs up as soon as serving starts.
            Ok::<(), Infallible>(())
        });
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
        assert!(
            !path.exists(),
            "the socket is removed once the frontend is in"
        );
        // Serving returned in time: the supervisor must not end this process.
        std::thread::sleep(relay::GRACE + std::time::Duration::from_millis(300));
        let _ = std::fs::remove_dir(&dir);
    }
}
