//! Queue helpers for device logic: chain validation and draining a queue.

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory as _, GuestMemoryMmap};

/// The guest memory type queues are processed against.
pub type Memory = GuestMemoryMmap<()>;

/// A descriptor chain over the backend's guest memory.
pub type Chain<'a> = DescriptorChain<&'a Memory>;

/// Why a queue could not be processed; the transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, Error)]
pub enum QueueError {
    /// descriptor chain is malformed: {0}
    #[error("descriptor chain is malformed: {0}")]
    Chain(&'static str),
    /// queue {0} layout is invalid (misaligned or unusable ring addresses)
    #[error("queue {0} layout is invalid")]
    Layout(usize),
    /// queue structures are not accessible
    #[error("queue structures are not accessible")]
    Queue(#[source] virtio_queue::Error),
    /// descriptor buffers are not accessible
    #[error("descriptor buffers are not accessible")]
    Buffers(#[source] virtio_queue::Error),
    /// guest memory access failed
    #[error("guest memory access failed")]
    Memory(#[source] std::io::Error),
    /// backing store failed
    #[error("backing store failed")]
    Backend(#[source] std::io::Error),
}

/// Walks `chain` without consuming it and rejects what the device must not
/// serve: no descriptors at all, a chain cut short (a loop that exhausts the
/// queue size, a `next` index out of range, an unreadable descriptor), and a
/// buffer that is not entirely inside guest memory.
pub fn validate_chain(chain: &Chain<'_>, mem: &Memory) -> Result<(), QueueError> {
    let mut last_has_next = None;
    for desc in chain.clone() {
        let access = if desc.is_write_only() {
            vm_memory::Permissions::Write
        } else {
            vm_memory::Permissions::Read
        };
        if !mem.check_range(desc.addr(), desc.len() as usize, access) {
            return Err(QueueError::Chain("buffer outside guest memory"));
        }
        last_has_next = Some(desc.has_next());
    }
    match last_has_next {
        None => Err(QueueError::Chain("no readable descriptor at the head")),
        Some(true) => Err(QueueError::Chain("loop or broken next link")),
        Some(false) => Ok(()),
    }
}

/// Pops every available chain and hands it to `serve`, which returns the
/// number of bytes it wrote into the chain; each chain is then added to the
/// used ring. Returns whether any chain was used. Both steps are reported
/// to the thread's [`super::inflight`] log, if one is installed.
///
/// Notifications are suppressed while the queue is drained (the used
/// ring's NO_NOTIFY flag, or with VIRTIO_RING_F_EVENT_IDX simply by not
/// moving `avail_event`) and enabled again afterwards; chains the driver
/// made available in between are served before returning, so no
/// notification is ever needed for a chain that was already there.
pub fn drain_queue<F>(queue: &mut Queue, mem: &Memory, mut serve: F) -> Result<bool, QueueError>
where
    F: FnMut(Chain<'_>) -> Result<u32, QueueError>,
{
    let mut used = false;
    loop {
        queue.disable_notification(mem).map_err(QueueError::Queue)?;
        loop {
            let chain = queue.iter(mem).map_err(QueueError::Queue)?.next();
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            super::inflight::popped(head);
            validate_chain(&chain, mem)?;
            let len = serve(chain)?;
            super::inflight::add_used(queue, mem, head, len).map_err(QueueError::Queue)?;
            used = true;
        }
        // Publishes avail_event (or clears NO_NOTIFY), then looks at the
        // available index once more: a chain added before the driver could
        // see that is served now instead of waiting for a notification.
        if !queue.enable_notification(mem).map_err(QueueError::Queue)? {
            return Ok(used);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// 1 MiB of guest memory at 0.
    pub(crate) fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)])
            .unwrap_or_else(|e| panic!("guest memory: {e}"))
    }

    pub(crate) fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    fn queue_with(mem: &Memory, descs: &[RawDescriptor]) -> Queue {
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        mock.add_desc_chains(descs, 0)
            .unwrap_or_else(|e| panic!("chain: {e}"));
        mock.create_queue().unwrap_or_else(|e| panic!("queue: {e}"))
    }

    fn first_chain_result(descs: &[RawDescriptor]) -> Result<(), QueueError> {
        let mem = memory();
        let mut q = queue_with(&mem, descs);
        let chain = q
            .iter(&mem)
            .unwrap_or_else(|e| panic!("iter: {e}"))
            .next()
            .unwrap_or_else(|| panic!("no chain"));
        validate_chain(&chain, &mem)
    }

    #[test]
    fn validate_chain_when_buffers_inside_memory_then_ok() {
        let r = first_chain_result(&[
            desc(0x8000, 16, VRING_DESC_F_NEXT, 1),
            desc(0x9000, 512, VRING_DESC_F_WRITE, 0),
        ]);
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn validate_chain_when_buffer_outside_memory_then_error() {
        let r = first_chain_result(&[desc(0xff000, 0x2000, 0, 0)]);
        assert!(matches!(
            r,
            Err(QueueError::Chain("buffer outside guest memory"))
        ));
    }

    #[test]
    fn validate_chain_when_descriptors_loop_then_error() {
        let r = first_chain_result(&[
            desc(0x8000, 16, VRING_DESC_F_NEXT, 1),
            desc(0x9000, 16, VRING_DESC_F_NEXT, 0),
        ]);
        assert!(matches!(
            r,
            Err(QueueError::Chain("loop or broken next link"))
        ));
    }

    #[test]
    fn drain_queue_when_chains_available_then_each_used_with_its_length() {
        let mem = memory();
        let mut q = queue_with(
            &mem,
            &[
                desc(0x8000, 8, VRING_DESC_F_WRITE, 0),
                desc(0x9000, 4, VRING_DESC_F_WRITE, 0),
            ],
        );
        let mut served = 0;
        let used = drain_queue(&mut q, &mem, |chain| {
            served += 1;
            let w = chain.writer(&mem).map_err(QueueError::Buffers)?;
            Ok(w.available_bytes() as u32)
        });
        assert!(matches!(used, Ok(true)), "{used:?}");
        assert_eq!(served, 2);
        let used_ring = q.used_ring();
        let idx: u16 = mem
            .read_obj(GuestAddress(used_ring + 2))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(idx, 2);
        let len1: u32 = mem
            .read_obj(GuestAddress(used_ring + 4 + 8 + 4))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(len1, 4);
        assert!(matches!(drain_queue(&mut q, &mem, |_| Ok(0)), Ok(false)));
    }

    /// Writes `descs` as an indirect table at `at`.
    fn table(mem: &Memory, at: u64, descs: &[RawDescriptor]) {
        for (i, d) in descs.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(at + 16 * i as u64))
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    fn indirect(addr: u64, entries: u32) -> RawDescriptor {
        use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
        desc(addr, 16 * entries, VRING_DESC_F_INDIRECT, 0)
    }

    #[test]
    fn validate_chain_when_indirect_table_longer_than_queue_then_ok() {
        let mem = memory();
        let mut entries: Vec<RawDescriptor> = (0..40u16)
            .map(|i| desc(0x8000 + 512 * u64::from(i), 512, VRING_DESC_F_NEXT, i + 1))
            .collect();
        entries.push(desc(0xf000, 1, VRING_DESC_F_WRITE, 0));
        table(&mem, 0x20000, &entries);
        let mut q = queue_with(&mem, &[indirect(0x20000, 41)]);
        let chain = q
            .iter(&mem)
            .unwrap_or_else(|e| panic!("iter: {e}"))
            .next()
            .unwrap_or_else(|| panic!("no chain"));
        assert!(validate_chain(&chain, &mem).is_ok());
        assert_eq!(
            chain.count(),
            41,
            "41 buffers behind one ring descriptor of 16"
        );
    }

    #[test]
    fn validate_chain_when_indirect_entry_outside_memory_or_nested_then_error() {
        let mem = memory();
        table(
            &mem,
            0x20000,
            &[desc(0xff000, 0x4000, VRING_DESC_F_WRITE, 0)],
        );
        let r = {
            let mut q = queue_with(&mem, &[indirect(0x20000, 1)]);
            let chain = q.iter(&mem).ok().and_then(|mut i| i.next());
            validate_chain(&chain.unwrap_or_else(|| panic!("no chain")), &mem)
        };
        assert!(matches!(
            r,
            Err(QueueError::Chain("buffer outside guest memory"))
        ));
        table(&mem, 0x21000, &[indirect(0x20000, 1)]);
        let mut q = queue_with(&mem, &[indirect(0x21000, 1)]);
        let chain = q.iter(&mem).ok().and_then(|mut i| i.next());
        let r = validate_chain(&chain.unwrap_or_else(|| panic!("no chain")), &mem);
        assert!(r.is_err(), "a table inside a table is refused: {r:?}");
    }

    #[test]
    fn drain_queue_when_event_idx_then_avail_event_published() {
        let mem = memory();
        let mut q = queue_with(
            &mem,
            &[
                desc(0x8000, 8, VRING_DESC_F_WRITE, 0),
                desc(0x9000, 8, VRING_DESC_F_WRITE, 0),
            ],
        );
        q.set_event_idx(true);
        assert!(matches!(drain_queue(&mut q, &mem, |_| Ok(0)), Ok(true)));
        // avail_event follows the 16 used entries of the 16-entry queue.
        let avail_event: u16 = mem
            .read_obj(GuestAddress(q.used_ring() + 4 + 8 * 16))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            avail_event, 2,
            "the device asks to be notified past chain 2"
        );
    }
}
