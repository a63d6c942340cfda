//! Queues served on threads of their own: [`QueueWorker`] and, for the
//! virtio-mmio transport, the thread that runs one.
//!
//! A device whose queues are independent (virtio-blk's request queues)
//! hands out one [`QueueWorker`] per queue through
//! [`super::VirtioDevice::queue_worker`]; each then runs on its own thread,
//! in parallel with the other queues and with the backend's event loop.
//!
//! Over ioregionfd, the event loop still receives every doorbell and
//! forwards it to the queue's thread through an eventfd (one extra
//! wake-up per notification batch; with EVENT_IDX or NO_NOTIFY the driver
//! notifies only while the thread sleeps). The thread raises used-buffer
//! interrupts itself: it sets the InterruptStatus bit in [`Signals`], which
//! the transport ORs into the register, then writes the interrupt eventfd.
//! A queue the thread cannot process sets DEVICE_NEEDS_RESET the same way.
//! Over vhost-user, vhost-user-backend already runs one thread per queue
//! and polls the kick eventfds itself (see `crate::vhost_user`).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use log::warn;
use outboard_virtio_mmio::virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::{Memory, QueueError};
use crate::device::{GuestMemory, InterruptLine};

/// Serves one queue, on a thread of its own.
pub trait QueueWorker: Send {
    /// Serves the available buffers of the queue, as
    /// [`super::VirtioDevice::process_queue`] does. Returns whether any
    /// buffer was used.
    fn process(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, QueueError>;
}

/// What queue threads share with the transport: the interrupt line, the
/// InterruptStatus bits they raised, and whether one of them failed.
#[derive(Debug, Default)]
pub(crate) struct Signals {
    irq: Mutex<Option<InterruptLine>>,
    isr: AtomicU32,
    failed: AtomicBool,
}

impl Signals {
    /// Connects (or replaces) the interrupt line.
    pub(crate) fn connect(&self, line: InterruptLine) {
        *self.irq.lock().unwrap_or_else(PoisonError::into_inner) = Some(line);
    }

    /// Writes the interrupt eventfd, if connected.
    pub(crate) fn trigger(&self, name: &str) {
        let irq = self.irq.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(irq) = irq.as_ref() {
            if let Err(e) = irq.trigger() {
                warn!("{name}: cannot raise the interrupt: {e}");
            }
        }
    }

    /// Latches InterruptStatus `bits` and raises the interrupt. The bits
    /// are visible before the eventfd is written, so the guest's interrupt
    /// handler reads them (SeqCst: the eventfd write is a syscall, but the
    /// guest's read happens on another thread of the backend).
    fn raise(&self, name: &str, bits: u32) {
        self.isr.fetch_or(bits, Ordering::SeqCst);
        self.trigger(name);
    }

    /// Marks the device failed and raises a configuration interrupt, once.
    fn fail(&self, name: &str, index: usize, e: &QueueError) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            warn!(
                "{name}: queue {index} failed: {}",
                outboard_protocol::error_chain(e)
            );
            self.raise(name, VIRTIO_MMIO_INT_CONFIG);
        }
    }

    /// InterruptStatus bits raised by queue threads.
    pub(crate) fn isr(&self) -> u32 {
        self.isr.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`.
    pub(crate) fn ack(&self, bits: u32) {
        self.isr.fetch_and(!bits, Ordering::SeqCst);
    }

    /// True once a queue thread failed, until [`Signals::clear`].
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Back to the reset state (every queue thread has been stopped).
    pub(crate) fn clear(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.failed.store(false, Ordering::SeqCst);
    }
}

/// A queue served by a [`QueueWorker`] on its own thread. Dropping it stops
/// and joins the thread (a request being served completes first).
#[derive(Debug)]
pub(crate) struct QueueThread {
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// Everything a queue thread owns.
struct Job {
    name: String,
    index: usize,
    queue: Queue,
    worker: Box<dyn QueueWorker>,
    memory: GuestMemory,
    signals: Arc<Signals>,
    kick: Arc<EventFd>,
    stop: Arc<AtomicBool>,
}

impl QueueThread {
    /// Starts serving `queue` (index `index` of device `name`) with `worker`.
    pub(crate) fn spawn(
        name: &str,
        index: usize,
        queue: Queue,
        worker: Box<dyn QueueWorker>,
        memory: GuestMemory,
        signals: Arc<Signals>,
    ) -> io::Result<Self> {
        // Blocking: the thread sleeps in read() until kicked.
        let kick = Arc::new(EventFd::new(libc::EFD_CLOEXEC)?);
        let stop = Arc::new(AtomicBool::new(false));
        let job = Job {
            name: name.to_owned(),
            index,
            queue,
            worker,
            memory,
            signals,
            kick: Arc::clone(&kick),
            stop: Arc::clone(&stop),
        };
        let handle = std::thread::Builder::new()
            .name(format!("{name}-q{index}"))
            .spawn(move || job.run())?;
        Ok(QueueThread {
            kick,
            stop,
            handle: Some(handle),
        })
    }

    /// The driver notified the queue.
    pub(crate) fn kick(&self) {
        if let Err(e) = self.kick.write(1) {
            warn!("cannot wake a queue thread: {e}");
        }
    }
}

impl Drop for QueueThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                warn!("a queue thread panicked");
            }
        }
    }
}

impl Job {
    fn run(mut self) {
        loop {
            if let Err(e) = self.kick.read() {
                warn!("{}: queue {} cannot wait: {e}", self.name, self.index);
                return;
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if self.signals.failed() {
                continue;
            }
            if let Err(e) = self.serve() {
                self.signals.fail(&self.name, self.index, &e);
            }
        }
    }

    fn serve(&mut self) -> Result<(), QueueError> {
        let mem = self.memory.memory();
        if !self.queue.is_valid(&*mem) {
            return Err(QueueError::Chain("queue rings outside guest memory"));
        }
        let used = self.worker.process(&mut self.queue, &mem)?;
        if used && self.queue.needs_notification(&*mem).unwrap_or(true) {
            self.signals.raise(&self.name, VIRTIO_MMIO_INT_VRING);
        }
        Ok(())
    }
}
