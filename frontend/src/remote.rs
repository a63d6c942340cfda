//! Regions served by a backend process over an ioregionfd data socket.
//!
//! A [`RemoteRegion`] is the [`BusDevice`] for one placed region: it encodes
//! each access as an ioregionfd command carrying the region's `user_data`
//! and offset, writes it to the data socket, and waits for the response
//! unless the write is posted. The socket is behind a mutex, so accesses
//! from several threads are serialized per socket and stay in order; posted
//! writes and later reads share the stream, so a read observes every write
//! sent before it.
//!
//! Any transport failure (EOF, a short or garbled response, an I/O error or
//! no answer within the timeout) marks the whole device failed through its
//! shared [`Health`]: the access completes with an error (the bus turns it
//! into all-ones), one error is logged, and every later access to any region
//! of the device fails fast without touching the socket.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use log::error;
use outboard_protocol::ioregionfd::{Cmd, Resp, RESP_SIZE};
use outboard_protocol::AccessSize;

use crate::bus::{AccessError, BusDevice};

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
        if !self.failed.swap(true, Ordering::AcqRel) {
            let text = error_chain(why);
            error!("device {} failed: {text}", self.name);
            *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(text);
        }
    }
}

/// `a: b: c` for an error and its causes.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// What the guest may do with a region, as the backend declared it.
#[derive(Debug, Clone, Copy)]
pub struct Permissions {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
    /// Access-size mask (bit n = `1 << n` bytes).
    pub sizes: u8,
}

/// A doorbell in a region: matching writes signal its eventfd instead of
/// travelling as data commands (ioeventfd semantics).
#[derive(Debug, Clone)]
pub struct DoorbellMatch {
    /// Offset in the region.
    pub offset: u64,
    /// Access size that matches; `None` matches any size and ignores the data.
    pub size: Option<AccessSize>,
    /// Value that matches, if any.
    pub datamatch: Option<u64>,
    /// Signalled once per matching write; the counter coalesces.
    pub eventfd: Arc<EventFd>,
}

impl DoorbellMatch {
    /// True when a write of `value` (`size` bytes at `offset`) rings this doorbell.
    pub fn matches(&self, offset: u64, size: AccessSize, value: u64) -> bool {
        offset == self.offset
            && self.size.is_none_or(|s| s == size)
            && self.datamatch.is_none_or(|d| d == value)
    }
}

/// One placed region of a backend, reached over its data socket.
#[derive(Debug)]
pub struct RemoteRegion {
    sock: Mutex<UnixStream>,
    user_data: u64,
    posted: bool,
    perms: Permissions,
    health: Arc<Health>,
    doorbells: Vec<DoorbellMatch>,
    fast_mmio: bool,
    vcpu_tokens: u32,
}

impl RemoteRegion {
    /// Wraps the frontend end of a region's data socket.
    pub fn new(
        sock: UnixStream,
        user_data: u64,
        posted: bool,
        perms: Permissions,
        health: Arc<Health>,
        timeout: Duration,
    ) -> io::Result<Self> {
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Ok(RemoteRegion {
            sock: Mutex::new(sock),
            user_data,
            posted,
            perms,
            health,
            doorbells: Vec::new(),
            fast_mmio: false,
            vcpu_tokens: 0,
        })
    }

    /// The backend answers to `user_data + 1 + i` for vCPU `i < tokens`.
    pub fn with_vcpu_tokens(mut self, tokens: u32) -> Self {
        self.vcpu_tokens = tokens;
        self
    }

    /// The token for an access by `vcpu` (the base token when unknown or out of range).
    fn token(&self, vcpu: Option<u32>) -> u64 {
        match vcpu {
            Some(v) if v < self.vcpu_tokens => self.user_data + 1 + u64::from(v),
            _ => self.user_data,
        }
    }

    /// Adds the region's doorbells; with `fast_mmio`, writes that match no
    /// doorbell are dropped instead of sent.
    pub fn with_doorbells(mut self, doorbells: Vec<DoorbellMatch>, fast_mmio: bool) -> Self {
        self.doorbells = doorbells;
        self.fast_mmio = fast_mmio;
        self
    }

    /// True when writes to this region are posted.
    pub fn posted(&self) -> bool {
        self.posted
    }

    /// The device's shared health.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    fn check(&self, size: AccessSize, allowed: bool) -> Result<(), AccessError> {
        if !allowed || self.perms.sizes & size.mask_bit() == 0 {
            return Err(AccessError::Denied);
        }
        if self.health.is_failed() {
            return Err(AccessError::DeviceFailed(self.health.name().to_owned()));
        }
        Ok(())
    }

    /// Sends one command and, if it has the resp bit, waits for the response.
    fn transact(&self, cmd: Cmd) -> Result<u64, AccessError> {
        let sock = self.sock.lock().unwrap_or_else(PoisonError::into_inner);
        // Re-check under the lock: another thread may have failed the device.
        if self.health.is_failed() {
            return Err(AccessError::DeviceFailed(self.health.name().to_owned()));
        }
        let result = exchange(&sock, &cmd);
        if let Err(e) = &result {
            self.health.fail(e);
        }
        result
    }
}

fn exchange(sock: &UnixStream, cmd: &Cmd) -> Result<u64, AccessError> {
    send_all(sock, &cmd.encode())?;
    if !cmd.resp {
        return Ok(0);
    }
    let mut buf = [0u8; RESP_SIZE];
    let mut got = 0;
    while got < RESP_SIZE {
        match (&*sock).read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Err(AccessError::BackendGone),
            Ok(0) => return Err(AccessError::ShortResponse(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(AccessError::Timeout),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(AccessError::BackendGone)
            }
            Err(e) => return Err(AccessError::Io(e)),
        }
    }
    Resp::decode(&buf)
        .map(|r| r.data)
        .map_err(AccessError::Garbled)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes all of `buf` without raising SIGPIPE if the backend is gone.
fn send_all(sock: &UnixStream, mut buf: &[u8]) -> Result<(), AccessError> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live byte slice of `buf.len()` bytes and the fd
        // is open for the duration of the borrow of `sock`.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    return Err(AccessError::BackendGone)
                }
                _ if is_timeout(&e) => return Err(AccessError::Timeout),
                _ => return Err(AccessError::Io(e)),
            }
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

impl RemoteRegion {
    fn read_as(
        &self,
        vcpu: Option<u32>,
        offset: u64,
        size: AccessSize,
    ) -> Result<u64, AccessError> {
        self.check(size, self.perms.read)?;
        self.transact(Cmd::read(self.token(vcpu), offset, size))
    }

    fn write_as(
        &self,
        vcpu: Option<u32>,
        offset: u64,
        size: AccessSize,
        value: u64,
    ) -> Result<(), AccessError> {
        self.check(size, self.perms.write)?;
        if let Some(d) = self
            .doorbells
            .iter()
            .find(|d| d.matches(offset, size, value))
        {
            return d.eventfd.write(1).map_err(AccessError::Io);
        }
        if self.fast_mmio {
            return Err(AccessError::Denied);
        }
        self.transact(Cmd::write(
            self.token(vcpu),
            offset,
            size,
            value,
            self.posted,
        ))
        .map(|_| ())
    }
}

impl BusDevice for RemoteRegion {
    fn read(&self, offset: u64, size: AccessSize) -> Result<u64, AccessError> {
        self.read_as(None, offset, size)
    }

    fn write(&self, offset: u64, size: AccessSize, value: u64) -> Result<(), AccessError> {
        self.write_as(None, offset, size, value)
    }

    fn read_from(&self, vcpu: u32, offset: u64, size: AccessSize) -> Result<u64, AccessError> {
        self.read_as(Some(vcpu), offset, size)
    }

    fn write_from(
        &self,
        vcpu: u32,
        offset: u64,
        size: AccessSize,
        value: u64,
    ) -> Result<(), AccessError> {
        self.write_as(Some(vcpu), offset, size, value)
    }
}
