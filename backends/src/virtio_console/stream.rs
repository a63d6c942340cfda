//! The console's host-stream mode (docs/protocol.md, section 11): output
//! numbered by transmit chain, input acknowledged once it is in guest
//! buffers, and the counters that let a restored instance go on exactly
//! where the previous one stopped.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use log::{info, warn};
use outboard::virtio::{inflight, Memory, QueueError};
use outboard::EventOps;
use outboard_protocol::host_stream::{Message, MAX_PAYLOAD};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::{Console, MAX_PENDING, RX, STREAM, STREAM_ROOM, TX};
use crate::host_stream::{HostStream, Received};

/// The stream mode's counters and its socket.
#[derive(Debug)]
pub(super) struct Stream {
    pub(super) host: HostStream,
    pub(super) ops: EventOps,
    /// Reads the host stream (stopped while 1 MiB waits).
    pub(super) reading: bool,
    /// Watches for room: a transmit chain or an acknowledgement waits.
    pub(super) waiting_room: bool,
    /// Ends with the frontend's end of the stream.
    pub(super) closed: bool,
    /// Asks the loop to serve a queue again (work was left for later).
    pub(super) more: EventFd,
    pub(super) more_queues: [bool; 2],
    /// Number of the next transmit chain.
    pub(super) tx_seq: u64,
    /// The transmit queue's used index that goes with `tx_seq`.
    pub(super) tx_used: u16,
    /// Input bytes delivered into guest buffers.
    pub(super) delivered: u64,
    /// Stream offset of the first byte in `pending` (`delivered` once the
    /// counters are reconciled).
    pub(super) pending_at: u64,
    /// The receive queue's used index that goes with `delivered`.
    pub(super) rx_used: u16,
    /// `delivered` as last acknowledged; `None`: not yet.
    pub(super) acked: Option<u64>,
    /// Restored from a previous instance's state.
    pub(super) restored: bool,
    /// The input offsets are known (restored, or taken from the first IN).
    pub(super) numbered: bool,
    /// An OUT has been sent (FRESH goes on the first of a fresh instance).
    pub(super) announced: bool,
    /// The counters still have to be matched with the used rings.
    pub(super) reconcile: [bool; 2],
    /// Buffers each queue used since the state was last saved: at most a
    /// ring's worth, so that the used ring never laps the saved index
    /// (the runtime commits after each event, but one event may serve a
    /// queue more than once).
    pub(super) unsaved: [AtomicU16; 2],
    /// The state has been saved: there is a state area to keep in step with.
    pub(super) saved_once: AtomicBool,
    pub(super) generation: u64,
    pub(super) buf: Vec<u8>,
}

impl Console {
    /// Sends each transmit chain as OUT messages before completing it; a
    /// full socket leaves the chain in the ring until there is room. At
    /// most one ring's worth of chains per call, so that the used ring
    /// never laps the saved used index between two state commits.
    pub(super) fn transmit_stream(
        &mut self,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        let Some(s) = self.stream.as_mut() else {
            return Ok(false);
        };
        if std::mem::take(&mut s.reconcile[TX]) {
            // Chains the previous instance completed after its last commit
            // took their numbers with them.
            let now = queue.next_used();
            s.tx_seq = s
                .tx_seq
                .wrapping_add(u64::from(now.wrapping_sub(s.tx_used)));
            s.tx_used = now;
        }
        let mut used = false;
        let mut served = 0u16;
        'ring: loop {
            queue.disable_notification(mem).map_err(QueueError::Queue)?;
            loop {
                if served >= queue.size() || s.budget_spent(TX, queue.size()) {
                    s.serve_again(TX);
                    break 'ring;
                }
                let Some(chain) = queue.iter(mem).map_err(QueueError::Queue)?.next() else {
                    break;
                };
                let head = chain.head_index();
                outboard::virtio::validate_chain(&chain, mem)?;
                let mut reader = chain.reader(mem).map_err(QueueError::Buffers)?;
                let mut piece = [0u8; MAX_PAYLOAD];
                let mut offset = 0u64;
                let sent = loop {
                    let n = reader.read(&mut piece).map_err(QueueError::Memory)?;
                    let last = reader.available_bytes() == 0 || n == 0;
                    let m = Message::Out {
                        seq: s.tx_seq,
                        offset,
                        last,
                        fresh: !s.restored && !s.announced,
                        data: &piece[..n],
                    };
                    match s.host.send(&m) {
                        Ok(true) => s.announced = true,
                        Ok(false) => break false,
                        Err(e) => {
                            // The frontend is gone; so is everything it would
                            // have passed on. The device keeps serving.
                            if !s.closed {
                                warn!("host stream: {e}");
                                s.closed = true;
                            }
                        }
                    }
                    offset += n as u64;
                    if last {
                        break true;
                    }
                };
                if !sent {
                    // Back into the ring: served again, from its start,
                    // when the socket has room (the frontend drops the part
                    // it has).
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    s.wait_room();
                    break 'ring;
                }
                inflight::popped(head);
                inflight::add_used(queue, mem, head, 0).map_err(QueueError::Queue)?;
                s.tx_seq += 1;
                s.unsaved[TX].fetch_add(1, Ordering::Relaxed);
                served += 1;
                used = true;
            }
            if !queue.enable_notification(mem).map_err(QueueError::Queue)? {
                break;
            }
        }
        s.tx_used = queue.next_used();
        if used {
            s.generation += 1;
        }
        Ok(used)
    }

    /// Reads what waits on the host stream into `pending`; whether any
    /// input arrived.
    pub(super) fn read_stream(&mut self) -> bool {
        let Some(s) = self.stream.as_mut() else {
            return false;
        };
        let mut got = false;
        while self.pending.len() < MAX_PENDING {
            let n = match s.host.recv(&mut s.buf) {
                Ok(Received::Message(n)) => n,
                Ok(Received::Empty) => return got,
                Ok(Received::Closed) | Err(_) => {
                    info!("host stream closed by the frontend");
                    s.closed = true;
                    s.read(false);
                    return got;
                }
            };
            let bytes = &s.buf[..n.min(s.buf.len())];
            let (offset, data) = match Message::decode(bytes) {
                Ok(Message::In { offset, data }) => (offset, data),
                Ok(other) => {
                    warn!("host stream: ignoring {other:?} from the frontend");
                    continue;
                }
                Err(e) => {
                    warn!("host stream: ignoring a message: {e}");
                    continue;
                }
            };
            if !s.numbered {
                // A fresh instance takes the frontend's numbering.
                s.delivered = offset;
                s.pending_at = offset;
                s.numbered = true;
            }
            let end = s.pending_at + self.pending.len() as u64;
            if offset > end {
                // Only after a restore whose counters the used ring will
                // still move forward (reconcile_rx); anything else is a
                // frontend that skipped input.
                if !self.pending.is_empty() {
                    warn!("host stream: input jumps from offset {end} to {offset}");
                    self.pending.clear();
                }
                s.pending_at = offset;
            }
            let end = s.pending_at + self.pending.len() as u64;
            let skip = usize::try_from(end.saturating_sub(offset)).unwrap_or(usize::MAX);
            if skip < data.len() {
                let room = MAX_PENDING - self.pending.len();
                let take = &data[skip..];
                if take.len() > room {
                    warn!("host stream: the frontend overran the input window");
                }
                self.pending.extend(&take[..take.len().min(room)]);
                got = true;
            }
        }
        // Full: stop reading until the guest drains its input.
        s.read(false);
        got
    }
}

impl Stream {
    /// Whether queue `q` used a ring's worth of buffers since the last
    /// save. When it did, the state is marked changed, so that the runtime
    /// commits it after this event (which resets the count) and the queue
    /// goes on at the next ([`Stream::serve_again`]): the wait never
    /// outlasts one event.
    pub(super) fn budget_spent(&mut self, q: usize, size: u16) -> bool {
        let spent = self.saved_once.load(Ordering::Relaxed)
            && self.unsaved[q].load(Ordering::Relaxed) >= size;
        if spent {
            log::debug!("console: queue {q} waits for the state to be saved");
            self.generation += 1;
        }
        spent
    }

    /// Watches (or stops watching) the host stream for input.
    pub(super) fn read(&mut self, on: bool) {
        if self.reading == on {
            return;
        }
        let r = if on {
            self.ops.add(self.host.input_fd(), STREAM)
        } else {
            self.ops.remove(self.host.input_fd(), STREAM)
        };
        match r {
            Ok(()) => self.reading = on,
            Err(e) => warn!("host stream: cannot change its watch: {e}"),
        }
    }

    pub(super) fn wait_room(&mut self) {
        if !self.waiting_room {
            match self.ops.add_writable(self.host.room_fd(), STREAM_ROOM) {
                Ok(()) => self.waiting_room = true,
                Err(e) => warn!("host stream: cannot watch for room: {e}"),
            }
        }
    }

    pub(super) fn serve_again(&mut self, queue: usize) {
        self.more_queues[queue] = true;
        if let Err(e) = self.more.write(1) {
            warn!("console: cannot schedule more work: {e}");
        }
    }

    /// Tells the frontend how much input the guest's buffers hold.
    pub(super) fn acknowledge(&mut self) {
        if !self.numbered || self.closed || self.reconcile[RX] || self.acked == Some(self.delivered)
        {
            return;
        }
        match self.host.send(&Message::Ack {
            delivered: self.delivered,
        }) {
            Ok(true) => self.acked = Some(self.delivered),
            Ok(false) => self.wait_room(),
            Err(e) => {
                warn!("host stream: {e}");
                self.closed = true;
            }
        }
    }

    /// After a restore: chains the previous instance used after its last
    /// commit carry their lengths in the used ring (which only the device
    /// writes, and which cannot have lapped: at most a ring's worth of
    /// chains is used between two commits).
    pub(super) fn reconcile_rx(&mut self, queue: &Queue, mem: &Memory, pending: &mut VecDeque<u8>) {
        let now = queue.next_used();
        let since = now.wrapping_sub(self.rx_used);
        if since > queue.size() {
            warn!(
                "console: used ring moved {since} entries past the saved state; input may repeat"
            );
        } else {
            let ring = queue.used_ring();
            for i in 0..since {
                let slot = u64::from(self.rx_used.wrapping_add(i) % queue.size());
                let at = GuestAddress(ring + 4 + 8 * slot + 4);
                match mem.read_obj::<u32>(at) {
                    Ok(len) => self.delivered += u64::from(len),
                    Err(e) => warn!("console: cannot read the used ring: {e}"),
                }
            }
        }
        self.rx_used = now;
        // Input that arrived before the counters were known and that the
        // guest already has.
        let behind = self.delivered.saturating_sub(self.pending_at);
        let drop = usize::try_from(behind)
            .unwrap_or(usize::MAX)
            .min(pending.len());
        pending.drain(..drop);
        self.pending_at += drop as u64;
        if self.pending_at != self.delivered {
            if self.pending_at > self.delivered {
                warn!(
                    "host stream: input resumes at offset {} past the {} delivered",
                    self.pending_at, self.delivered
                );
            }
            self.pending_at = self.pending_at.max(self.delivered);
            self.delivered = self.pending_at;
        }
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{memory, queue};
    use super::super::{STATE_LEN, STATE_VERSION};
    use super::*;
    use outboard::virtio::VirtioDevice;
    use outboard_protocol::host_stream::MAX_MESSAGE;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn stream_pair() -> (Console, HostStream) {
        let (a, b) = outboard_protocol::host_stream::pair().unwrap_or_else(|e| panic!("{e}"));
        let c = Console::with_stream(HostStream::from_owned(a).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
        (
            c,
            HostStream::from_owned(b).unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn next_message(frontend: &HostStream, buf: &mut [u8]) -> usize {
        match frontend.recv(buf) {
            Ok(Received::Message(n)) => n,
            other => panic!("no message: {other:?}"),
        }
    }

    /// A queue at 0x1000 whose first `used` chains the previous instance
    /// used (with these lengths), with the device at that point.
    fn resumed_queue(mem: &Memory, flags: u32, chains: u16, used: &[u32]) -> Queue {
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        let descs: Vec<RawDescriptor> = (0..chains)
            .map(|i| {
                RawDescriptor::from(Descriptor::new(
                    0x8000 + 0x1000 * u64::from(i),
                    16,
                    flags as u16,
                    0,
                ))
            })
            .collect();
        mock.add_desc_chains(&descs, 0)
            .unwrap_or_else(|e| panic!("{e}"));
        for (i, len) in used.iter().enumerate() {
            let elem = mock.used_addr().unchecked_add(4 + 8 * i as u64);
            mem.write_obj(i as u32, elem)
                .unwrap_or_else(|e| panic!("{e}"));
            mem.write_obj(*len, elem.unchecked_add(4))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        mem.write_obj(used.len() as u16, mock.used_addr().unchecked_add(2))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q: Queue = mock.create_queue().unwrap_or_else(|e| panic!("{e}"));
        q.set_next_avail(used.len() as u16);
        q.set_next_used(used.len() as u16);
        q
    }

    #[test]
    fn stream_when_chain_transmitted_then_sent_as_numbered_pieces_before_completion() {
        let (mut c, frontend) = stream_pair();
        let mem = memory();
        let text: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        mem.write_slice(&text, GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q = queue(&mem, 0, 5000);
        assert!(c
            .process_queue(TX, &mut q, &mem)
            .unwrap_or_else(|e| panic!("{e}")));
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let n = next_message(&frontend, &mut buf);
        assert_eq!(
            Message::decode(&buf[..n]),
            Ok(Message::Out {
                seq: 0,
                offset: 0,
                last: false,
                fresh: true,
                data: &text[..MAX_PAYLOAD]
            })
        );
        let n = next_message(&frontend, &mut buf);
        assert_eq!(
            Message::decode(&buf[..n]),
            Ok(Message::Out {
                seq: 0,
                offset: MAX_PAYLOAD as u64,
                last: true,
                fresh: false,
                data: &text[MAX_PAYLOAD..]
            })
        );
        let state = c.save_state();
        assert_eq!(state.len(), STATE_LEN);
        assert_eq!(
            &state[1..11],
            &[1, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            "chain 1 next, used 1"
        );
    }

    #[test]
    fn stream_when_restored_after_unsaved_completions_then_counters_follow_the_used_rings() {
        let (mut c, frontend) = stream_pair();
        let mut state = vec![STATE_VERSION];
        state.extend_from_slice(&5u64.to_le_bytes()); // next chain
        state.extend_from_slice(&0u16.to_le_bytes()); // transmit used index
        state.extend_from_slice(&100u64.to_le_bytes()); // input delivered
        state.extend_from_slice(&0u16.to_le_bytes()); // receive used index
        c.restore_state(&state).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.restore_state(&state[..5]).is_err(), "cut short");
        c.init(&EventOps::detached())
            .unwrap_or_else(|e| panic!("{e}"));
        // The frontend sends again from what it saw acknowledged (98); the
        // previous instance had delivered 3 bytes after its last commit.
        let mut buf = vec![0u8; MAX_MESSAGE + 1];
        let mut msg = Vec::new();
        Message::In {
            offset: 98,
            data: b"xyabcdef",
        }
        .encode(&mut msg);
        let mut frontend = frontend;
        assert!(frontend
            .send(&Message::decode(&msg).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(c.handle_event(STREAM, &EventOps::detached()), Some(RX));
        let mem = memory();
        let mut rx = resumed_queue(&mem, VRING_DESC_F_WRITE, 2, &[3]);
        assert!(c
            .process_queue(RX, &mut rx, &mem)
            .unwrap_or_else(|e| panic!("{e}")));
        let mut got = [0u8; 3];
        mem.read_slice(&mut got, GuestAddress(0x9000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"def", "each byte once");
        let n = next_message(&frontend, &mut buf);
        assert_eq!(
            Message::decode(&buf[..n]),
            Ok(Message::Ack { delivered: 106 })
        );
        // Two transmit chains completed after the commit: the next is 7.
        let mut tx = resumed_queue(&mem, 0, 3, &[0, 0]);
        assert!(c
            .process_queue(TX, &mut tx, &mem)
            .unwrap_or_else(|e| panic!("{e}")));
        let n = next_message(&frontend, &mut buf);
        let Ok(Message::Out { seq, fresh, .. }) = Message::decode(&buf[..n]) else {
            panic!("no output");
        };
        assert_eq!((seq, fresh), (7, false));
        let saved = c.save_state();
        assert_eq!(&saved[1..9], &8u64.to_le_bytes());
        assert_eq!(&saved[11..19], &106u64.to_le_bytes());
        assert_eq!(&saved[19..21], &2u16.to_le_bytes());
    }
}
