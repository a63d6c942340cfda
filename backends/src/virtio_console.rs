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
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;

use log::{info, warn};
use outboard::virtio::{drain_queue, Memory, QueueError, VirtioDevice};
use outboard::EventOps;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
const MAX_PENDING: usize = 1 << 20;
/// Event id of the listening socket.
const LISTENER: u32 = 0;
/// Event id of the connected client.
const CLIENT: u32 = 1;

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
    listener: Option<UnixListener>,
    client: Option<UnixStream>,
    pending: VecDeque<u8>,
    path: Option<PathBuf>,
    paused: bool,
    ops: EventOps,
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
    pub fn from_args(args: ConsoleArgs) -> io::Result<Self> {
        let out = crate::open_output(&args.output)?;
        let listener = match &args.input_socket {
            Some(p) => {
                let _ = std::fs::remove_file(p);
                let l = UnixListener::bind(p)?;
                l.set_nonblocking(true)?;
                info!("console input on {}", p.display());
                Some(l)
            }
            None => None,
        };
        Ok(Console {
            out,
            listener,
            client: None,
            pending: VecDeque::new(),
            path: args.input_socket,
            paused: false,
            ops: EventOps::detached(),
        })
    }

    /// Watches the client again after input was paused.
    fn resume(&mut self) {
        if !std::mem::take(&mut self.paused) {
            return;
        }
        if let Some(c) = &self.client {
            if let Err(e) = self.ops.add(c, CLIENT) {
                warn!("console input: cannot resume reading: {e}");
            }
        }
    }

    /// Accepts a client, replacing the previous one.
    fn accept(&mut self) {
        let Some(l) = &self.listener else {
            return;
        };
        match l.accept() {
            Ok((c, _)) => {
                info!("console input client connected");
                if let Err(e) = c.set_nonblocking(true) {
                    warn!("console input: {e}");
                    return;
                }
                self.drop_client();
                if !self.paused {
                    if let Err(e) = self.ops.add(&c, CLIENT) {
                        warn!("console input: cannot watch the client: {e}");
                        return;
                    }
                }
                self.client = Some(c);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => warn!("console input: {e}"),
        }
    }

    fn drop_client(&mut self) {
        if let Some(c) = self.client.take() {
            if !self.paused {
                // Closing the socket would unregister it too; say so explicitly.
                let _ = self.ops.remove(&c, CLIENT);
            }
        }
    }

    /// Reads what the client sent; returns whether input is pending.
    fn read_client(&mut self) -> bool {
        let Some(client) = self.client.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 4096];
        match client.read(&mut buf) {
            Ok(0) => {
                info!("console input client left");
                self.drop_client();
                !self.pending.is_empty()
            }
            Ok(n) => {
                self.pending.extend(&buf[..n]);
                if self.pending.len() >= MAX_PENDING && !self.paused {
                    // Stop reading until the guest drains its input.
                    if let Some(c) = &self.client {
                        let _ = self.ops.remove(c, CLIENT);
                    }
                    self.paused = true;
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                warn!("console input: {e}");
                self.drop_client();
                false
            }
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
                break;
            };
            let head = chain.head_index();
            outboard::virtio::validate_chain(&chain, mem)?;
            let mut writer = chain.writer(mem).map_err(QueueError::Buffers)?;
            let n = writer.available_bytes().min(self.pending.len());
            let bytes: Vec<u8> = self.pending.drain(..n).collect();
            writer.write_all(&bytes).map_err(QueueError::Memory)?;
            queue
                .add_used(mem, head, n as u32)
                .map_err(QueueError::Queue)?;
            used = true;
        }
        if self.paused && self.pending.len() < MAX_PENDING / 2 {
            // Room again: watch the client once more.
            self.resume();
        }
        Ok(used)
    }
}

impl VirtioDevice for Console {
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
        self.resume();
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
        self.ops = ops.clone();
        if let Some(l) = &self.listener {
            ops.add(l, LISTENER)?;
        }
        Ok(())
    }

    fn handle_event(&mut self, id: u32, _ops: &EventOps) -> Option<usize> {
        match id {
            LISTENER => {
                self.accept();
                None
            }
            _ if self.paused => None,
            _ => self.read_client().then_some(RX),
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `main` of `outboard-virtio-console`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    outboard::run_virtio("outboard-virtio-console", args, Console::from_args)
}
