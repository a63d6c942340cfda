//! Interrupts in socket mode: an interrupt sink that consumes backends'
//! irqfd-style eventfds.
//!
//! Each interrupt line a backend declares gets an eventfd (and, for a level
//! line, a resample eventfd, as KVM_IRQFD_FLAG_RESAMPLE does). Where no
//! in-kernel irqchip consumes them, the [`InterruptSink`] does: one thread
//! waits on every line's eventfd, adds the eventfd counter to the line's
//! count, wakes anyone waiting on the line and calls the sink's callback.
//! A test guest waits with [`IrqLine::wait_beyond`] and, for a level line,
//! ends the interrupt with [`IrqLine::end_of_interrupt`].

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Errors setting up interrupt delivery.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot create an eventfd or the sink's event loop
    #[error("cannot create an eventfd or the sink's event loop")]
    Create(#[source] io::Error),
    /// cannot watch the interrupt eventfd
    #[error("cannot watch the interrupt eventfd")]
    Watch(#[source] io::Error),
}

/// Called on every delivery: device name, line index, interrupts delivered.
pub type Callback = Arc<dyn Fn(&str, u32, u64) + Send + Sync>;

/// One interrupt line as the frontend sees it.
#[derive(Debug)]
pub struct LineState {
    device: String,
    index: u32,
    fd: EventFd,
    resample: Option<EventFd>,
    count: Mutex<u64>,
    changed: Condvar,
}

/// Handle to an interrupt line.
#[derive(Debug, Clone)]
pub struct IrqLine(Arc<LineState>);

impl IrqLine {
    /// Device name.
    pub fn device(&self) -> &str {
        &self.0.device
    }

    /// Line index within the device.
    pub fn index(&self) -> u32 {
        self.0.index
    }

    /// Interrupts delivered so far (eventfd counts, summed).
    pub fn count(&self) -> u64 {
        *self.0.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the count exceeds `seen`; returns the new count, or `None`
    /// after `timeout`.
    pub fn wait_beyond(&self, seen: u64, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        let mut count = self.0.count.lock().unwrap_or_else(PoisonError::into_inner);
        while *count <= seen {
            let left = deadline.checked_duration_since(Instant::now())?;
            count = self
                .0
                .changed
                .wait_timeout(count, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Some(*count)
    }

    /// The eventfd the backend signals (for an in-kernel irqchip to consume instead).
    pub fn eventfd(&self) -> &EventFd {
        &self.0.fd
    }

    /// The resample eventfd of a level line.
    pub fn resample_eventfd(&self) -> Option<&EventFd> {
        self.0.resample.as_ref()
    }

    /// Ends a level interrupt (the guest's EOI): the backend re-raises the
    /// line if its condition still holds. Does nothing for an edge line.
    /// Never blocks: the backend shares the resample eventfd and could make
    /// it blocking and fill it; a full counter is an EOI still pending.
    pub fn end_of_interrupt(&self) -> io::Result<()> {
        match &self.0.resample {
            Some(r) => match outboard_protocol::wait::signal_eventfd(r) {
                Ok(_) => Ok(()),
                Err(outboard_protocol::wait::Error::Io(e)) => Err(e),
                Err(e) => Err(io::Error::other(e)),
            },
            None => Ok(()),
        }
    }

    fn deliver(&self) -> Option<u64> {
        match self.0.fd.read() {
            Ok(n) => {
                let mut count = self.0.count.lock().unwrap_or_else(PoisonError::into_inner);
                *count += n;
                self.0.changed.notify_all();
                Some(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                warn!("interrupt {} of {}: {e}", self.0.index, self.0.device);
                None
            }
        }
    }
}

struct Shared {
    lines: Mutex<HashMap<u64, IrqLine>>,
    callback: Mutex<Option<Callback>>,
}

/// Delivers interrupts from backends' eventfds to waiters and a callback.
pub struct InterruptSink {
    epoll: Arc<Epoll>,
    shared: Arc<Shared>,
    stop: EventFd,
    next_token: u64,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for InterruptSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterruptSink").finish_non_exhaustive()
    }
}

const STOP_TOKEN: u64 = 0;

impl InterruptSink {
    /// Starts the sink's thread.
    pub fn new() -> Result<Self, Error> {
        let epoll = Arc::new(Epoll::new().map_err(Error::Create)?);
        let stop = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(Error::Create)?;
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(Error::Watch)?;
        let shared = Arc::new(Shared {
            lines: Mutex::new(HashMap::new()),
            callback: Mutex::new(None),
        });
        let (ep, sh) = (Arc::clone(&epoll), Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("outboard-irq".into())
            .spawn(move || run(&ep, &sh))
            .map_err(Error::Create)?;
        Ok(InterruptSink {
            epoll,
            shared,
            stop,
            next_token: 1,
            thread: Some(thread),
        })
    }

    /// Sets the function called on every delivery.
    pub fn set_callback(&self, callback: Callback) {
        *self
            .shared
            .callback
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(callback);
    }

    /// Creates a line for `device`'s interrupt `index` (with a resample
    /// eventfd if `level`) and starts watching it.
    pub fn add_line(&mut self, device: &str, index: u32, level: bool) -> Result<IrqLine, Error> {
        let flags = EFD_NONBLOCK | libc::EFD_CLOEXEC;
        let fd = EventFd::new(flags).map_err(Error::Create)?;
        let resample = if level {
            Some(EventFd::new(flags).map_err(Error::Create)?)
        } else {
            None
        };
        let line = IrqLine(Arc::new(LineState {
            device: device.to_owned(),
            index,
            fd,
            resample,
            count: Mutex::new(0),
            changed: Condvar::new(),
        }));
        let token = self.next_token;
        self.next_token += 1;
        self.shared
            .lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token, line.clone());
        self.epoll
            .ctl(
                ControlOperation::Add,
                line.0.fd.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(Error::Watch)?;
        Ok(line)
    }

    /// Stops watching line `index` of `device` (an in-kernel irqchip consumes
    /// its eventfd instead).
    pub fn remove_line(&self, device: &str, index: u32) {
        self.remove_where(|l| l.device() == device && l.index() == index);
    }

    /// Stops watching every line of `device`.
    pub fn remove_device(&self, device: &str) {
        self.remove_where(|l| l.device() == device);
    }

    fn remove_where(&self, gone: impl Fn(&IrqLine) -> bool) {
        let mut lines = self
            .shared
            .lines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        lines.retain(|_, l| {
            if !gone(l) {
                return true;
            }
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                l.0.fd.as_raw_fd(),
                EpollEvent::default(),
            );
            false
        });
    }
}

fn run(epoll: &Epoll, shared: &Shared) {
    let mut events = [EpollEvent::default(); 32];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("interrupt sink stopped: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                return;
            }
            let line = shared
                .lines
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&token)
                .cloned();
            if let Some(line) = line {
                if let Some(delivered) = line.deliver() {
                    let cb = shared
                        .callback
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    if let Some(cb) = cb {
                        cb(line.device(), line.index(), delivered);
                    }
                }
            }
        }
    }
}

impl Drop for InterruptSink {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_when_signalled_then_counted_waiters_woken_and_callback_called() {
        let mut sink = InterruptSink::new().unwrap_or_else(|e| panic!("{e}"));
        let seen = Arc::new(Mutex::new(0u64));
        let s2 = Arc::clone(&seen);
        sink.set_callback(Arc::new(move |_, _, n| {
            *s2.lock().unwrap_or_else(PoisonError::into_inner) += n;
        }));
        let line = sink
            .add_line("d", 0, true)
            .unwrap_or_else(|e| panic!("{e}"));
        line.eventfd().write(3).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(line.wait_beyond(0, Duration::from_secs(10)), Some(3));
        assert_eq!(line.wait_beyond(3, Duration::from_millis(10)), None);
        line.end_of_interrupt().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            line.resample_eventfd().map(|r| r.read().unwrap_or(0)),
            Some(1)
        );
        drop(sink);
        assert_eq!(*seen.lock().unwrap_or_else(PoisonError::into_inner), 3);
    }
}
