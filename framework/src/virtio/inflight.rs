//! A hook for recording which descriptor heads are in flight: popped from
//! the available ring and not yet put on the used ring.
//!
//! A transport that keeps such a record outside the process (vhost-user's
//! INFLIGHT_SHMFD region, see `crate::vhost_user`) installs an
//! [`InflightLog`] for the duration of one queue's processing with
//! [`with_log`]; queue helpers that pop and complete chains report to it
//! through [`popped`] and [`add_used`]. Without a log installed both are
//! plain (`add_used` is `Queue::add_used`), so device code calls them
//! unconditionally and stays transport-agnostic: [`super::drain_queue`]
//! does, and so must a device that pops chains itself.
//!
//! The log is per thread: a queue is processed on one thread at a time, and
//! the device calls run synchronously inside [`with_log`].

use std::cell::RefCell;

use virtio_queue::{Queue, QueueT};

use super::Memory;

/// Where in-flight heads are recorded; the three calls follow the order of
/// the vhost-user specification's inflight I/O tracking for split queues.
pub trait InflightLog: Send {
    /// Head `head` was popped from the available ring and is about to be
    /// served.
    fn popped(&mut self, head: u16);
    /// Head `head` is about to be put on the used ring.
    fn completing(&mut self, head: u16);
    /// Head `head` is on the used ring, whose index is now `used_idx`.
    fn completed(&mut self, head: u16, used_idx: u16);
}

thread_local! {
    static LOG: RefCell<Option<Box<dyn InflightLog>>> = const { RefCell::new(None) };
}

/// Runs `f` with `log` receiving this thread's [`popped`] and [`add_used`]
/// reports, then drops the log (a log that keeps state beyond the call
/// shares it with its owner). A log installed already (a nested call) is
/// put back afterwards.
pub fn with_log<R>(log: Box<dyn InflightLog>, f: impl FnOnce() -> R) -> R {
    let outer = LOG.with(|l| l.borrow_mut().replace(log));
    let r = f();
    LOG.with(|l| *l.borrow_mut() = outer);
    r
}

/// Reports that `head` was popped (a no-op without a log).
pub fn popped(head: u16) {
    LOG.with(|l| {
        if let Some(log) = l.borrow_mut().as_mut() {
            log.popped(head);
        }
    });
}

/// `queue.add_used(mem, head, len)`, reported to the log before and after.
pub fn add_used(
    queue: &mut Queue,
    mem: &Memory,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    LOG.with(|l| {
        let mut log = l.borrow_mut();
        if let Some(log) = log.as_mut() {
            log.completing(head);
        }
        queue.add_used(mem, head, len)?;
        if let Some(log) = log.as_mut() {
            log.completed(head, queue.next_used());
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    #[derive(Clone, Default)]
    struct Record(Arc<Mutex<Vec<String>>>);

    impl InflightLog for Record {
        fn popped(&mut self, head: u16) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("pop {head}"));
        }
        fn completing(&mut self, head: u16) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("using {head}"));
        }
        fn completed(&mut self, head: u16, used_idx: u16) {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("used {head} idx {used_idx}"));
        }
    }

    #[test]
    fn drain_queue_when_log_installed_then_each_head_popped_then_used_in_order() {
        use super::super::queue::tests::{desc, memory};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;
        let mem = memory();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        mock.add_desc_chains(
            &[
                desc(0x8000, 8, VRING_DESC_F_WRITE, 0),
                desc(0x9000, 8, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut q: Queue = mock.create_queue().unwrap_or_else(|e| panic!("{e}"));
        let record = Record::default();
        let used = with_log(Box::new(record.clone()), || {
            super::super::drain_queue(&mut q, &mem, |_| Ok(1))
        });
        assert!(matches!(used, Ok(true)), "{used:?}");
        let got = record.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(
            got,
            [
                "pop 0",
                "using 0",
                "used 0 idx 1",
                "pop 1",
                "using 1",
                "used 1 idx 2"
            ]
        );
        // Without a log the same calls only serve the queue.
        assert!(matches!(
            super::super::drain_queue(&mut q, &mem, |_| Ok(1)),
            Ok(false)
        ));
        assert_eq!(record.0.lock().unwrap_or_else(|p| p.into_inner()).len(), 6);
    }
}
