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

use log::warn;
use outboard::virtio::{drain_queue, inflight, Memory, QueueError, VirtioDevice};
use outboard::EventOps;
use outboard_protocol::host_stream::MAX_MESSAGE;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::host_stream::HostStream;
use crate::input::Input;

mod stream;
use stream::Stream;

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
pub(super) mod tests {
    use super::*;
    use crate::input::{CLIENT, LISTENER};
    use std::os::unix::net::UnixStream;

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use crate::SharedOutput as Shared;

    pub(super) fn memory() -> Memory {
        Memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A queue at 0x1000 with one buffer of `len` bytes at 0x8000.
    pub(super) fn queue(mem: &Memory, flags: u32, len: u32) -> Queue {
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
