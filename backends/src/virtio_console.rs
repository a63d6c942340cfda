//! `outboard-virtio-console`: a single-port virtio console (virtio device ID 3).
//!
//! Queue 0 (receiveq) carries input to the guest, queue 1 (transmitq) its
//! output. Two ways to reach the host:
//!
//! * `--output stdout|PATH` and `--input-socket PATH`: output goes to
//!   stdout or a file, input comes from a Unix socket the backend listens
//!   on (one client at a time). Both die with the backend.
//! * `--host-stream-fd N`: a host stream the frontend owns
//!   (docs/protocol.md, section 11; the frontend's `host_stream` device
//!   setting). Output and input travel over it exactly once across backend
//!   restarts and live upgrades: output is numbered by transmit chain, so
//!   the frontend drops what a replaced backend sends again; input is
//!   acknowledged once it is in the guest's buffers, so the frontend sends
//!   again only what no guest buffer holds. The device keeps its counters
//!   in the state area and, after a restart, reconciles them with the used
//!   rings, which the previous instance may have moved after its last
//!   commit.
//!
//! At most 1 MiB of input waits for buffers; beyond that the backend stops
//! reading until the guest catches up.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use log::{info, warn};
use outboard::virtio::{drain_queue, inflight, Memory, QueueError, VirtioDevice};
use outboard::EventOps;
use outboard_protocol::host_stream::{Message, MAX_MESSAGE, MAX_PAYLOAD};
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::host_stream::{HostStream, Received};
use crate::input::Input;

/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
const MAX_PENDING: usize = 1 << 20;
/// Bytes read from the input per event.
const CHUNK: usize = 4096;
/// Event id of the host stream's input.
const STREAM: u32 = 16;
/// Event id of room on the host stream.
const STREAM_ROOM: u32 = 17;
/// Event id of the "serve again" eventfd.
const MORE: u32 = 18;
/// Format version of the stream mode's saved state.
const STATE_VERSION: u8 = 1;
const STATE_LEN: usize = 1 + 8 + 2 + 8 + 2;

/// `outboard-virtio-console`: a single-port virtio console.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// Where the guest's output goes: "stdout" or a file path (appended to).
    #[arg(long, value_name = "stdout|PATH", default_value = "stdout")]
    pub output: String,
    /// Listen on this Unix socket; bytes a client sends become guest input.
    #[arg(long, value_name = "PATH")]
    pub input_socket: Option<PathBuf>,
    /// Output and input over the host stream the frontend passes as this fd
    /// (exactly once across restarts; instead of --output/--input-socket).
    #[arg(long, value_name = "N", conflicts_with_all = ["output", "input_socket", "vhost_user"])]
    pub host_stream_fd: Option<RawFd>,
}

/// The stream mode's counters and its socket.
#[derive(Debug)]
struct Stream {
    host: HostStream,
    ops: EventOps,
    /// Reads the host stream (stopped while 1 MiB waits).
    reading: bool,
    /// Watches for room: a transmit chain or an acknowledgement waits.
    waiting_room: bool,
    /// Ends with the frontend's end of the stream.
    closed: bool,
    /// Asks the loop to serve a queue again (work was left for later).
    more: EventFd,
    more_queues: [bool; 2],
    /// Number of the next transmit chain.
    tx_seq: u64,
    /// The transmit queue's used index that goes with `tx_seq`.
    tx_used: u16,
    /// Input bytes delivered into guest buffers.
    delivered: u64,
    /// Stream offset of the first byte in `pending` (`delivered` once the
    /// counters are reconciled).
    pending_at: u64,
    /// The receive queue's used index that goes with `delivered`.
    rx_used: u16,
    /// `delivered` as last acknowledged; `None`: not yet.
    acked: Option<u64>,
    /// Restored from a previous instance's state.
    restored: bool,
    /// The input offsets are known (restored, or taken from the first IN).
    numbered: bool,
    /// An OUT has been sent (FRESH goes on the first of a fresh instance).
    announced: bool,
    /// The counters still have to be matched with the used rings.
    reconcile: [bool; 2],
    /// Buffers each queue used since the state was last saved: at most a
    /// ring's worth, so that the used ring never laps the saved index
    /// (the runtime commits after each event, but one event may serve a
    /// queue more than once).
    unsaved: [AtomicU16; 2],
    /// The state has been saved: there is a state area to keep in step with.
    saved_once: AtomicBool,
    generation: u64,
    buf: Vec<u8>,
}

/// The console device logic.
pub struct Console {
    out: Box<dyn Write + Send + Sync>,
    input: Input,
    pending: VecDeque<u8>,
    stream: Option<Stream>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("pending", &self.pending.len())
            .field("stream", &self.stream.is_some())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console configured from the command line.
    pub fn from_args(args: ConsoleArgs) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        if let Some(fd) = args.host_stream_fd {
            return Ok(Console::with_stream(HostStream::take(fd)?)?);
        }
        let out = crate::open_output(&args.output)?;
        let input = match &args.input_socket {
            Some(p) => Input::socket(p)?,
            None => Input::none(),
        };
        Ok(Console::new(out, input))
    }

    /// A console writing guest output to `out`, with guest input from `input`.
    pub fn new(out: Box<dyn Write + Send + Sync>, input: Input) -> Self {
        Console {
            out,
            input,
            pending: VecDeque::new(),
            stream: None,
        }
    }

    /// A console whose output and input travel over the host stream `host`.
    pub fn with_stream(host: HostStream) -> io::Result<Self> {
        let mut c = Console::new(Box::new(io::sink()), Input::none());
        c.stream = Some(Stream {
            host,
            ops: EventOps::detached(),
            reading: false,
            waiting_room: false,
            closed: false,
            more: EventFd::new(EFD_NONBLOCK)?,
            more_queues: [false; 2],
            tx_seq: 0,
            tx_used: 0,
            delivered: 0,
            pending_at: 0,
            rx_used: 0,
            acked: None,
            restored: false,
            numbered: false,
            announced: false,
            reconcile: [false; 2],
            unsaved: [AtomicU16::new(0), AtomicU16::new(0)],
            saved_once: AtomicBool::new(false),
            generation: 0,
            buf: vec![0; MAX_MESSAGE + 1],
        });
        Ok(c)
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, QueueError> {
        if self.stream.is_some() {
            return self.transmit_stream(queue, mem);
        }
        let out = &mut self.out;
        let used = drain_queue(queue, mem, |chain| {
            let mut reader = chain.reader(mem).map_err(QueueError::Buffers)?;
            let mut buf = [0u8; 4096];
            while reader.available_bytes() > 0 {
                let n = reader.read(&mut buf).map_err(QueueError::Memory)?;
                if n == 0 {
                    break;
                }
                if let Err(e) = out.write_all(&buf[..n]) {
                    warn!("console output: {e}");
                }
            }
            if let Err(e) = out.flush() {
                warn!("console output: {e}");
            }
            Ok(0)
        })?;
        Ok(used)
    }

    /// Sends each transmit chain as OUT messages before completing it; a
    /// full socket leaves the chain in the ring until there is room. At
    /// most one ring's worth of chains per call, so that the used ring
    /// never laps the saved used index between two state commits.
    fn transmit_stream(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, QueueError> {
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

    fn receive(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, QueueError> {
        if let Some(s) = self.stream.as_mut() {
            if std::mem::take(&mut s.reconcile[RX]) {
                s.reconcile_rx(queue, mem, &mut self.pending);
            }
        }
        let mut used = false;
        let mut served = 0u16;
        while !self.pending.is_empty() {
            if let Some(s) = self.stream.as_mut() {
                if served >= queue.size() || s.budget_spent(RX, queue.size()) {
                    s.serve_again(RX);
                    break;
                }
            }
            let Some(chain) = queue.iter(mem).map_err(QueueError::Queue)?.next() else {
                // Out of buffers with input waiting: ask to be notified of
                // the next one (publishes avail_event under EVENT_IDX), and
                // take one the driver added meanwhile.
                if queue.enable_notification(mem).map_err(QueueError::Queue)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            inflight::popped(head);
            outboard::virtio::validate_chain(&chain, mem)?;
            let mut writer = chain.writer(mem).map_err(QueueError::Buffers)?;
            let n = writer.available_bytes().min(self.pending.len());
            let bytes: Vec<u8> = self.pending.drain(..n).collect();
            writer.write_all(&bytes).map_err(QueueError::Memory)?;
            inflight::add_used(queue, mem, head, n as u32).map_err(QueueError::Queue)?;
            if let Some(s) = self.stream.as_mut() {
                s.delivered += n as u64;
                s.pending_at += n as u64;
                s.unsaved[RX].fetch_add(1, Ordering::Relaxed);
            }
            served += 1;
            used = true;
        }
        match self.stream.as_mut() {
            Some(s) => {
                s.rx_used = queue.next_used();
                if used {
                    s.generation += 1;
                }
                s.acknowledge();
                if !s.reading && !s.closed && self.pending.len() < MAX_PENDING / 2 {
                    s.read(true);
                }
            }
            None if self.input.is_paused() && self.pending.len() < MAX_PENDING / 2 => {
                // Room again: read the input once more.
                self.input.resume();
            }
            None => {}
        }
        Ok(used)
    }

    /// Reads what waits on the host stream into `pending`; whether any
    /// input arrived.
    fn read_stream(&mut self) -> bool {
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
    fn budget_spent(&mut self, q: usize, size: u16) -> bool {
        let spent = self.saved_once.load(Ordering::Relaxed)
            && self.unsaved[q].load(Ordering::Relaxed) >= size;
        if spent {
            log::debug!("console: queue {q} waits for the state to be saved");
            self.generation += 1;
        }
        spent
    }

    /// Watches (or stops watching) the host stream for input.
    fn read(&mut self, on: bool) {
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

    fn wait_room(&mut self) {
        if !self.waiting_room {
            match self.ops.add_writable(self.host.room_fd(), STREAM_ROOM) {
                Ok(()) => self.waiting_room = true,
                Err(e) => warn!("host stream: cannot watch for room: {e}"),
            }
        }
    }

    fn serve_again(&mut self, queue: usize) {
        self.more_queues[queue] = true;
        if let Err(e) = self.more.write(1) {
            warn!("console: cannot schedule more work: {e}");
        }
    }

    /// Tells the frontend how much input the guest's buffers hold.
    fn acknowledge(&mut self) {
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
    fn reconcile_rx(&mut self, queue: &Queue, mem: &Memory, pending: &mut VecDeque<u8>) {
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

impl VirtioDevice for Console {
    fn syscalls(&self) -> &'static [i64] {
        // Accepting a client on the input socket.
        &[libc::SYS_accept4]
    }

    fn name(&self) -> &str {
        "virtio-console"
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 256]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn reset(&mut self) {
        match self.stream.as_mut() {
            // Input waits for the next driver: the frontend has it
            // acknowledged only once it is delivered. The counters go on;
            // the rings start again at 0.
            Some(s) => {
                s.tx_used = 0;
                s.rx_used = 0;
                s.reconcile = [false; 2];
                s.generation += 1;
            }
            None => {
                self.pending.clear();
                self.input.resume();
            }
        }
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &Memory,
    ) -> Result<bool, QueueError> {
        match index {
            RX => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            _ => Ok(false),
        }
    }

    fn init(&mut self, ops: &EventOps) -> io::Result<()> {
        match self.stream.as_mut() {
            Some(s) => {
                s.ops = ops.clone();
                // SAFETY: `more` is open and lives in `s`, beyond this call
                // (the borrow ends with it; epoll keeps no reference).
                let more = unsafe { BorrowedFd::borrow_raw(s.more.as_raw_fd()) };
                ops.add(more, MORE)?;
                s.reading = false;
                s.read(true);
                Ok(())
            }
            None => self.input.init(ops),
        }
    }

    fn handle_event(&mut self, id: u32, _ops: &EventOps) -> Option<usize> {
        if let Some(s) = self.stream.as_mut() {
            return match id {
                STREAM => self.read_stream().then_some(RX),
                STREAM_ROOM => {
                    if let Err(e) = s.ops.remove(s.host.room_fd(), STREAM_ROOM) {
                        warn!("host stream: {e}");
                    }
                    s.waiting_room = false;
                    s.acknowledge();
                    Some(TX)
                }
                MORE => {
                    let _ = s.more.read();
                    let [rx, tx] = std::mem::take(&mut s.more_queues);
                    if rx && tx {
                        // One queue per event: ask again for the other.
                        s.serve_again(TX);
                    }
                    if rx {
                        Some(RX)
                    } else if tx {
                        Some(TX)
                    } else {
                        None
                    }
                }
                _ => None,
            };
        }
        let mut buf = [0u8; CHUNK];
        let room = MAX_PENDING.saturating_sub(self.pending.len()).min(CHUNK);
        let n = self.input.on_event(id, &mut buf[..room]);
        self.pending.extend(&buf[..n]);
        if self.pending.len() >= MAX_PENDING {
            // Stop reading until the guest drains its input.
            self.input.pause();
        }
        (n > 0).then_some(RX)
    }

    fn save_state(&self) -> Vec<u8> {
        let Some(s) = &self.stream else {
            return Vec::new();
        };
        s.saved_once.store(true, Ordering::Relaxed);
        for u in &s.unsaved {
            u.store(0, Ordering::Relaxed);
        }
        let mut v = Vec::with_capacity(STATE_LEN);
        v.push(STATE_VERSION);
        v.extend_from_slice(&s.tx_seq.to_le_bytes());
        v.extend_from_slice(&s.tx_used.to_le_bytes());
        v.extend_from_slice(&s.delivered.to_le_bytes());
        v.extend_from_slice(&s.rx_used.to_le_bytes());
        v
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), outboard::state::Error> {
        use outboard::state::Error as StateError;
        let Some(s) = self.stream.as_mut() else {
            return if state.is_empty() {
                Ok(())
            } else {
                Err(StateError::Invalid(
                    "stream-mode state for a console without a host stream",
                ))
            };
        };
        if state.is_empty() {
            // The previous instance had no host stream: start fresh.
            return Ok(());
        }
        if state.len() != STATE_LEN || state[0] != STATE_VERSION {
            return Err(StateError::Invalid(
                "console state of another length or version",
            ));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&state[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u16_at = |at: usize| u16::from_le_bytes([state[at], state[at + 1]]);
        s.tx_seq = u64_at(1);
        s.tx_used = u16_at(9);
        s.delivered = u64_at(11);
        s.rx_used = u16_at(19);
        if !s.numbered {
            s.pending_at = s.delivered;
        }
        s.restored = true;
        s.numbered = true;
        s.reconcile = [true; 2];
        s.generation += 1;
        Ok(())
    }

    fn state_generation(&self) -> u64 {
        self.stream.as_ref().map_or(0, |s| s.generation)
    }
}

/// `main` of `outboard-virtio-console`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    outboard::run_virtio("outboard-virtio-console", args, Console::from_args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{CLIENT, LISTENER};
    use std::os::unix::net::UnixStream;

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    use crate::SharedOutput as Shared;

    fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A queue at 0x1000 with one buffer of `len` bytes at 0x8000.
    fn queue(mem: &Memory, flags: u32, len: u32) -> Queue {
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1000), 16);
        let d = RawDescriptor::from(Descriptor::new(0x8000, len, flags as u16, 0));
        mock.add_desc_chains(&[d], 0)
            .unwrap_or_else(|e| panic!("{e}"));
        mock.create_queue().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn input_when_client_sends_then_delivered_into_receive_buffers() {
        let path = crate::input::tests::temp_socket("console-rx");
        let input = Input::socket(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut c = Console::new(Box::new(Shared::default()), input);
        c.init(&EventOps::detached())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut client = UnixStream::connect(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.handle_event(LISTENER, &EventOps::detached()), None);
        client.write_all(b"hello").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.handle_event(CLIENT, &EventOps::detached()), Some(RX));
        let mem = memory();
        let mut q = queue(&mem, VRING_DESC_F_WRITE, 3);
        assert!(c
            .process_queue(RX, &mut q, &mem)
            .unwrap_or_else(|e| panic!("{e}")));
        let mut got = [0u8; 3];
        mem.read_slice(&mut got, GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&got, b"hel");
        assert_eq!(c.pending.len(), 2, "the rest waits for the next buffer");
        c.reset();
        assert!(c.pending.is_empty());
    }

    fn stream_pair() -> (Console, HostStream) {
        let mut fds = [0; 2];
        // SAFETY: (test) socketpair writes two fds into the array.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: (test) both fds are new and owned by nobody else.
        let (a, b) = unsafe {
            use std::os::fd::{FromRawFd, OwnedFd};
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
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

    #[test]
    fn transmit_when_guest_sends_then_output_written() {
        let out = Shared::default();
        let mut c = Console::new(Box::new(out.clone()), Input::none());
        let mem = memory();
        mem.write_slice(b"to the host", GuestAddress(0x8000))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut q = queue(&mem, 0, 11);
        assert!(c
            .process_queue(TX, &mut q, &mem)
            .unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(
            &*out.0.lock().unwrap_or_else(|p| p.into_inner()),
            b"to the host"
        );
    }
}
