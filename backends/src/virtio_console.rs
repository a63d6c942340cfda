//! `outboard-virtio-console`: a single-port virtio console (virtio device ID 3).
//!
//! Queue 0 (receiveq) carries input to the guest, queue 1 (transmitq) its
//! output. Output goes to stdout or a file (`--output`). Input comes from a
//! Unix socket the backend listens on (`--input-socket PATH`): one client at
//! a time, whose bytes are queued and delivered into the receive buffers the
//! driver makes available. At most 1 MiB of input waits for buffers; beyond
//! that the backend stops reading the client until the guest catches up.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use log::warn;
use outboard::virtio::{drain_queue, inflight, Memory, QueueError, VirtioDevice};
use outboard::EventOps;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::input::Input;

/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
const MAX_PENDING: usize = 1 << 20;
/// Bytes read from the input per event.
const CHUNK: usize = 4096;

/// `outboard-virtio-console`: a single-port virtio console.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// Where the guest's output goes: "stdout" or a file path (appended to).
    #[arg(long, value_name = "stdout|PATH", default_value = "stdout")]
    pub output: String,
    /// Listen on this Unix socket; bytes a client sends become guest input.
    #[arg(long, value_name = "PATH")]
    pub input_socket: Option<PathBuf>,
}

/// The console device logic.
pub struct Console {
    out: Box<dyn Write + Send + Sync>,
    input: Input,
    pending: VecDeque<u8>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console configured from the command line.
    pub fn from_args(args: ConsoleArgs) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
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
        }
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &Memory) -> Result<bool, QueueError> {
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
        let mut used = false;
        while !self.pending.is_empty() {
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
            used = true;
        }
        if self.input.is_paused() && self.pending.len() < MAX_PENDING / 2 {
            // Room again: read the input once more.
            self.input.resume();
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
        self.pending.clear();
        self.input.resume();
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
        self.input.init(ops)
    }

    fn handle_event(&mut self, id: u32, _ops: &EventOps) -> Option<usize> {
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
    use vm_memory::{Bytes, GuestAddress};

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
