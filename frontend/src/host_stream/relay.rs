//! The relay thread: moves bytes between a host stream's client and the
//! backend instances' sockets, exactly once in each direction (see the
//! parent module).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, info, warn};
use outboard_protocol::host_stream::{self, Message, Received, MAX_MESSAGE, MAX_PAYLOAD};

use super::{Command, Shared, INPUT_WINDOW, OUTPUT_BACKLOG};

/// The relay thread's state.
pub(super) struct Relay {
    name: String,
    listener: UnixListener,
    client: Option<UnixStream>,
    shared: Arc<Shared>,
    /// Backend sockets, oldest (the one in use) first.
    ends: VecDeque<OwnedFd>,
    /// Output: the chain being passed on and how much of it was.
    seq: u64,
    seq_offset: u64,
    numbered: bool,
    backlog: VecDeque<u8>,
    /// Input: `unacked` holds the bytes from stream offset `acked` on;
    /// `sent` is how far the end in use has been sent.
    acked: u64,
    unacked: VecDeque<u8>,
    sent: u64,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

/// What reading the end in use found.
enum Drained {
    /// Nothing more waits (or the backlog is full).
    Waiting,
    /// The socket is read to its end: the next end takes over.
    Ended,
}

impl Relay {
    pub(super) fn new(listener: UnixListener, shared: Arc<Shared>, name: String) -> Self {
        Relay {
            name,
            listener,
            client: None,
            shared,
            ends: VecDeque::new(),
            seq: 0,
            seq_offset: 0,
            numbered: false,
            backlog: VecDeque::new(),
            acked: 0,
            unacked: VecDeque::new(),
            sent: 0,
            buf: vec![0; MAX_MESSAGE + 1],
            scratch: Vec::with_capacity(MAX_MESSAGE),
        }
    }

    pub(super) fn run(&mut self) {
        loop {
            let take_commands = std::mem::take(
                &mut *self
                    .shared
                    .commands
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            for c in take_commands {
                match c {
                    Command::End(fd) => self.ends.push_back(fd),
                    Command::Stop => return,
                }
            }
            // Each pass does all it can, then waits on what could unblock it.
            self.accept();
            self.read_client();
            while let Some(Drained::Ended) = self.read_end() {
                self.ends.pop_front();
                self.shared.counters.ends.fetch_add(1, Ordering::Relaxed);
                // The next instance gets every byte not acknowledged.
                self.sent = self.acked;
                debug!("{}: host stream moves to the next backend", self.name);
            }
            self.send_input();
            self.write_client();
            self.wait();
        }
    }

    fn wait(&self) {
        let mut fds = vec![
            libc::pollfd {
                fd: self.shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        if let Some(c) = &self.client {
            let mut events = 0;
            if self.unacked.len() < INPUT_WINDOW {
                events |= libc::POLLIN;
            }
            if !self.backlog.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: c.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        if let Some(end) = self.ends.front() {
            let mut events = 0;
            if self.reading_end() {
                events |= libc::POLLIN;
            }
            if self.sent < self.acked + self.unacked.len() as u64 {
                events |= libc::POLLOUT;
            }
            // Not watched at all while neither: a hung-up socket would
            // report POLLHUP on every pass.
            if events != 0 {
                fds.push(libc::pollfd {
                    fd: end.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
        }
        // SAFETY: poll reads and writes `fds.len()` live pollfd entries.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                warn!("{}: host stream poll: {e}", self.name);
            }
        }
        if fds[0].revents != 0 {
            let _ = self.shared.wake.read();
        }
    }

    /// Output is read from the backend while the backlog has room (or no
    /// client is there to wait for).
    fn reading_end(&self) -> bool {
        self.client.is_none() || self.backlog.len() < OUTPUT_BACKLOG
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((c, _)) => {
                    if let Err(e) = c.set_nonblocking(true) {
                        warn!("{}: host stream client: {e}", self.name);
                        continue;
                    }
                    if self.client.replace(c).is_some() {
                        info!("{}: a new host stream client replaces the old", self.name);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("{}: host stream accept: {e}", self.name);
                    return;
                }
            }
        }
    }

    fn read_client(&mut self) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 4096];
        while self.unacked.len() < INPUT_WINDOW {
            let room = (INPUT_WINDOW - self.unacked.len()).min(chunk.len());
            match c.read(&mut chunk[..room]) {
                Ok(0) => {
                    debug!("{}: host stream client left", self.name);
                    self.client = None;
                    return;
                }
                Ok(n) => self.unacked.extend(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("{}: host stream client: {e}", self.name);
                    self.client = None;
                    return;
                }
            }
        }
    }

    fn write_client(&mut self) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        while !self.backlog.is_empty() {
            let (front, _) = self.backlog.as_slices();
            match c.write(front) {
                Ok(n) => {
                    self.backlog.drain(..n);
                    self.shared
                        .counters
                        .output
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("{}: host stream client: {e}", self.name);
                    self.client = None;
                    return;
                }
            }
        }
    }

    /// Reads the end in use; `None` when there is none.
    fn read_end(&mut self) -> Option<Drained> {
        // Out of the queue while `take` borrows the relay; back in front after.
        let end = self.ends.pop_front()?;
        let mut drained = Drained::Waiting;
        while self.reading_end() {
            match host_stream::recv(end.as_fd(), &mut self.buf) {
                Ok(Received::Message(n)) => self.take(n.min(self.buf.len())),
                Ok(Received::Empty) => break,
                Ok(Received::Closed) | Err(_) => {
                    drained = Drained::Ended;
                    break;
                }
            }
        }
        self.ends.push_front(end);
        Some(drained)
    }

    /// Handles one message of `len` bytes in `buf`.
    fn take(&mut self, len: usize) {
        let m = match Message::decode(&self.buf[..len]) {
            Ok(m) => m,
            Err(e) => {
                warn!("{}: host stream: ignoring a message: {e}", self.name);
                return;
            }
        };
        match m {
            Message::Out {
                seq,
                offset,
                last,
                fresh,
                data,
            } => {
                if fresh || !self.numbered {
                    // An instance without restored state numbers anew.
                    self.seq = seq;
                    self.seq_offset = 0;
                    self.numbered = true;
                }
                let counters = &self.shared.counters;
                if seq < self.seq {
                    counters
                        .repeated
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    return;
                }
                if seq > self.seq || offset > self.seq_offset {
                    warn!(
                        "{}: host stream output skips from chain {} offset {} to chain {seq} offset {offset}",
                        self.name, self.seq, self.seq_offset
                    );
                    self.seq = seq;
                    self.seq_offset = offset;
                }
                let skip = usize::try_from(self.seq_offset - offset)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                counters.repeated.fetch_add(skip as u64, Ordering::Relaxed);
                let new = &data[skip..];
                if self.client.is_none() && self.backlog.len() + new.len() > OUTPUT_BACKLOG {
                    let keep = OUTPUT_BACKLOG.saturating_sub(self.backlog.len());
                    counters
                        .dropped
                        .fetch_add((new.len() - keep) as u64, Ordering::Relaxed);
                    self.backlog.extend(&new[..keep]);
                } else {
                    self.backlog.extend(new);
                }
                self.seq_offset = offset + data.len() as u64;
                if last {
                    self.seq += 1;
                    self.seq_offset = 0;
                }
            }
            Message::Ack { delivered } => {
                if delivered <= self.acked {
                    return;
                }
                let n = usize::try_from(delivered - self.acked)
                    .unwrap_or(usize::MAX)
                    .min(self.unacked.len());
                if n as u64 != delivered - self.acked {
                    warn!(
                        "{}: host stream: the backend acknowledges input up to {delivered}, \
                         beyond the {} sent",
                        self.name,
                        self.acked + self.unacked.len() as u64
                    );
                }
                self.unacked.drain(..n);
                self.acked += n as u64;
                self.sent = self.sent.max(self.acked);
                self.shared
                    .counters
                    .input
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Message::In { .. } => {
                warn!(
                    "{}: host stream: ignoring input sent by the backend",
                    self.name
                );
            }
        }
    }

    /// Sends unacknowledged input the end in use has not had yet.
    fn send_input(&mut self) {
        let Some(end) = self.ends.front() else {
            return;
        };
        let fd = end.as_fd();
        loop {
            let from = usize::try_from(self.sent - self.acked).unwrap_or(usize::MAX);
            if from >= self.unacked.len() {
                return;
            }
            let n = (self.unacked.len() - from).min(MAX_PAYLOAD);
            let chunk: Vec<u8> = self.unacked.range(from..from + n).copied().collect();
            Message::In {
                offset: self.sent,
                data: &chunk,
            }
            .encode(&mut self.scratch);
            // Full: POLLOUT brings us back. Gone: reading finds the end.
            if !matches!(host_stream::send(fd, &self.scratch), Ok(true)) {
                return;
            }
            self.sent += n as u64;
        }
    }
}
