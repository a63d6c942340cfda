//! How placement keeps a hypervisor in sync: the [`Registrar`] trait.
//!
//! Doorbells (ioeventfd semantics) and interrupt lines (irqfd semantics) can
//! be consumed in a kernel instead of in the frontend: KVM signals a
//! doorbell's eventfd on a matching guest write without an exit, and injects
//! an interrupt when a backend signals a line's eventfd. Whoever owns the
//! hypervisor implements [`Registrar`]; the frontend calls it whenever a
//! region is placed, moved or removed and whenever a device is attached or
//! detached, so the registrations always describe the current address map.
//! `outboard_frontend::kvm::Machine` implements it for KVM; a VMM on another
//! hypervisor implements it for its own.

use std::io;
use std::sync::{Mutex, PoisonError};

use outboard_protocol::{AccessSize, Space};
use vmm_sys_util::eventfd::EventFd;

/// One doorbell at its current guest address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoEvent {
    /// Address space.
    pub space: Space,
    /// Guest address of the doorbell (region base + doorbell offset).
    pub addr: u64,
    /// Access size that matches; `None` matches any size.
    pub size: Option<AccessSize>,
    /// Only writes of this value match.
    pub datamatch: Option<u64>,
}

/// Registers doorbells and interrupt lines with whatever consumes them in
/// the kernel. Every call names the eventfd, so a registration can be
/// removed exactly.
pub trait Registrar: Send + Sync {
    /// A guest write matching `event` now signals `fd` (KVM_IOEVENTFD).
    fn register_ioevent(&self, event: &IoEvent, fd: &EventFd) -> io::Result<()>;
    /// Undoes [`Registrar::register_ioevent`] for exactly this event and fd.
    fn unregister_ioevent(&self, event: &IoEvent, fd: &EventFd) -> io::Result<()>;
    /// Signals on `fd` now inject interrupt `gsi` (KVM_IRQFD); `resample`
    /// is signalled at the guest's end of interrupt for a level line.
    fn register_irqfd(&self, gsi: u32, fd: &EventFd, resample: Option<&EventFd>) -> io::Result<()>;
    /// Undoes [`Registrar::register_irqfd`].
    fn unregister_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()>;
}

/// What a [`RecordingRegistrar`] saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registration {
    /// [`Registrar::register_ioevent`].
    IoEvent(IoEvent),
    /// [`Registrar::unregister_ioevent`].
    NoIoEvent(IoEvent),
    /// [`Registrar::register_irqfd`].
    Irqfd(u32),
    /// [`Registrar::unregister_irqfd`].
    NoIrqfd(u32),
}

/// A registrar that only records calls: for tests and for VMMs that want to
/// see what Outboard would register.
#[derive(Debug, Default)]
pub struct RecordingRegistrar {
    log: Mutex<Vec<Registration>>,
}

impl RecordingRegistrar {
    /// Every call so far.
    pub fn calls(&self) -> Vec<Registration> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The ioevents registered now (registrations minus unregistrations).
    pub fn live_ioevents(&self) -> Vec<IoEvent> {
        let mut live = Vec::new();
        for c in self.calls() {
            match c {
                Registration::IoEvent(e) => live.push(e),
                Registration::NoIoEvent(e) => {
                    if let Some(i) = live.iter().position(|x| *x == e) {
                        live.remove(i);
                    }
                }
                _ => {}
            }
        }
        live
    }

    fn push(&self, r: Registration) {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(r);
    }
}

impl Registrar for RecordingRegistrar {
    fn register_ioevent(&self, event: &IoEvent, _: &EventFd) -> io::Result<()> {
        self.push(Registration::IoEvent(*event));
        Ok(())
    }
    fn unregister_ioevent(&self, event: &IoEvent, _: &EventFd) -> io::Result<()> {
        self.push(Registration::NoIoEvent(*event));
        Ok(())
    }
    fn register_irqfd(&self, gsi: u32, _: &EventFd, _: Option<&EventFd>) -> io::Result<()> {
        self.push(Registration::Irqfd(gsi));
        Ok(())
    }
    fn unregister_irqfd(&self, gsi: u32, _: &EventFd) -> io::Result<()> {
        self.push(Registration::NoIrqfd(gsi));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_when_registered_then_unregistered_then_not_live() {
        let r = RecordingRegistrar::default();
        let fd = EventFd::new(0).unwrap_or_else(|e| panic!("{e}"));
        let e = IoEvent {
            space: Space::Mmio,
            addr: 0x1000,
            size: Some(AccessSize::B4),
            datamatch: Some(1),
        };
        r.register_ioevent(&e, &fd)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.live_ioevents(), vec![e]);
        r.unregister_ioevent(&e, &fd)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.live_ioevents().is_empty());
        r.register_irqfd(5, &fd, None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.calls().len(), 3);
    }
}
