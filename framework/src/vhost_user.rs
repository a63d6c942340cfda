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

use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use log::{info, warn};
use thiserror::Error;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{
    VhostUserBackendMut, VhostUserDaemon, VringEpollHandler, VringRwLock, VringT,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::events::{EventOps, Watch};
use crate::virtio::VirtioDevice;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

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
}

type Shared<D> = Arc<Mutex<Adapter<D>>>;

/// A [`VirtioDevice`] as a vhost-user backend.
pub struct Adapter<D: VirtioDevice + Send + Sync + 'static> {
    device: D,
    memory: Option<GuestMemoryAtomic<GuestMemoryMmap<()>>>,
    exit: (EventConsumer, EventNotifier),
    ops: EventOps,
    num_queues: usize,
    max_queue_size: usize,
}

impl<D: VirtioDevice + Send + Sync + 'static> std::fmt::Debug for Adapter<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("device", &self.device.name())
            .field("num_queues", &self.num_queues)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice + Send + Sync + 'static> Adapter<D> {
    fn new(device: D) -> Result<Self, Error> {
        let exit =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).map_err(Error::ExitEvent)?;
        let sizes = device.queue_max_sizes();
        let max = sizes.iter().copied().max().unwrap_or(256);
        let max = if max.is_power_of_two() { max } else { 256 };
        Ok(Adapter {
            num_queues: sizes.len(),
            max_queue_size: usize::from(max),
            device,
            memory: None,
            exit,
            ops: EventOps::detached(),
        })
    }

    fn process(&mut self, queue: usize, vrings: &[VringRwLock]) -> io::Result<()> {
        let Some(mem) = self.memory.as_ref().map(GuestAddressSpace::memory) else {
            return Ok(());
        };
        let Some(vring) = vrings.get(queue) else {
            return Ok(());
        };
        let mut state = vring.get_mut();
        match self
            .device
            .process_queue(queue, state.get_queue_mut(), &mem)
        {
            Ok(true) => state.signal_used_queue(),
            Ok(false) => Ok(()),
            Err(e) => {
                warn!("{}: queue {queue} stalled: {e}", self.device.name());
                Ok(())
            }
        }
    }
}

impl<D: VirtioDevice + Send + Sync + 'static> VhostUserBackendMut for Adapter<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        self.device.features()
            | (1 << VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.device.activate(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&mut self) {
        self.device.reset();
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size as usize];
        self.device.read_config(u64::from(offset), &mut buf);
        buf
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.device.write_config(u64::from(offset), buf);
        Ok(())
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        self.memory = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let event = usize::from(device_event);
        if event < self.num_queues {
            return self.process(event, vrings);
        }
        let Some(id) = event
            .checked_sub(self.num_queues + 1)
            .and_then(|id| u32::try_from(id).ok())
        else {
            return Ok(());
        };
        let ops = self.ops.clone();
        match self.device.handle_event(id, &ops) {
            Some(q) => self.process(q, vrings),
            None => Ok(()),
        }
    }
}

/// Serves `device` to the first vhost-user frontend that connects at
/// `path`; returns when it disconnects.
pub fn serve<D: VirtioDevice + Send + Sync + 'static>(device: D, path: &Path) -> Result<(), Error> {
    let name = device.name().to_owned();
    let backend: Shared<D> = Arc::new(Mutex::new(Adapter::new(device)?));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
    let mut daemon = VhostUserDaemon::new(name.clone(), Arc::clone(&backend), mem)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    if let Some(handler) = daemon.get_epoll_handlers().first() {
        let mut adapter = backend.lock().unwrap_or_else(PoisonError::into_inner);
        let ops = EventOps::new(Arc::new(Listeners {
            handler: Arc::downgrade(handler),
            first: adapter.num_queues as u64 + 1,
        }));
        adapter.ops = ops.clone();
        adapter.device.init(&ops).map_err(Error::DeviceInit)?;
    }
    info!("{name}: serving vhost-user on {}", path.display());
    let result = daemon.serve(path).map_err(|e| Error::Daemon(e.to_string()));
    info!("{name}: vhost-user frontend disconnected");
    result
}

/// A device's [`EventOps`] over the daemon's epoll handler: device id `n`
/// is listener `first + n` (the ids up to the number of queues are the
/// daemon's own).
struct Listeners<D: VirtioDevice + Send + Sync + 'static> {
    handler: Weak<VringEpollHandler<Shared<D>>>,
    first: u64,
}

impl<D: VirtioDevice + Send + Sync + 'static> Listeners<D> {
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

impl<D: VirtioDevice + Send + Sync + 'static> Watch for Listeners<D> {
    fn add(&self, fd: RawFd, id: u32) -> io::Result<()> {
        let (handler, data) = self.listener(id)?;
        handler.register_listener(fd, EventSet::IN, data)
    }

    fn remove(&self, fd: RawFd, id: u32) -> io::Result<()> {
        let (handler, data) = self.listener(id)?;
        handler.unregister_listener(fd, EventSet::IN, data)
    }
}
