//! Whether a device still works: one [`Health`] shared by every region,
//! doorbell and transport of a device.
//!
//! The first failure is logged once and remembered with its reason; every
//! later access to the device fails fast without touching its sockets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use log::error;

/// Whether a device still works; shared by all its regions.
#[derive(Debug)]
pub struct Health {
    name: String,
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Health {
    /// A healthy device called `name`.
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Health {
            name: name.to_owned(),
            failed: AtomicBool::new(false),
            reason: Mutex::new(None),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True once the device has failed.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Why the device failed, if it has.
    pub fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Marks the device failed; the first call logs `why`, later calls do nothing.
    pub fn fail(&self, why: &dyn std::error::Error) {
        self.fail_ended(why, None);
    }

    /// Like [`Health::fail`], with how the backend process ended (if it
    /// has) put first: `backend ended (signal: 31 (SIGSYS)): PROGRAM:
    /// error: sandbox: blocked system call openat (257); WHY`.
    pub fn fail_ended(&self, why: &dyn std::error::Error, ended: Option<String>) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            let chain = outboard_protocol::error_chain(why);
            let text = match ended {
                Some(e) => format!("{e}; {chain}"),
                None => chain,
            };
            error!("device {} failed: {text}", self.name);
            *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_when_called_twice_then_first_reason_kept() {
        let h = Health::new("d");
        assert!(!h.is_failed());
        h.fail(&std::io::Error::other("first"));
        h.fail(&std::io::Error::other("second"));
        assert!(h.is_failed());
        assert_eq!(h.reason().as_deref(), Some("first"));
        assert_eq!(h.name(), "d");
    }
}
