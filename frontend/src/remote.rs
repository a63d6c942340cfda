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
//! Any transport failure (EOF, a short or garbled response, a response whose
//! data does not fit the access, an I/O error or no answer within the
//! timeout) marks the whole device failed through its
//! shared [`Health`]: the access completes with an error (the bus turns it
//! into all-ones), one error is logged, and every later access to any region
//! of the device fails fast without touching the socket.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use outboard_protocol::control::F_CMD_RING;
use outboard_protocol::ioregionfd::{Cmd, Op};
use outboard_protocol::wait::{self, Deadline};
use outboard_protocol::{Access, AccessSize};

use crate::backend::Connection;
use crate::bus::{AccessError, BusDevice};
use crate::device::Link;

mod posted;
mod ring;
mod transport;
pub use crate::health::Health;
use posted::PostedLog;
pub use ring::Error as RingError;
use transport::send_all;
pub(crate) use transport::{access_error, Transport};

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

/// One placed region of a backend, reached over its data socket or its
/// command ring.
#[derive(Debug)]
pub struct RemoteRegion {
    sock: Mutex<Transport>,
    region: u32,
    user_data: u64,
    posted: bool,
    perms: Permissions,
    health: Arc<Health>,
    doorbells: Vec<DoorbellMatch>,
    fast_mmio: bool,
    vcpu_tokens: u32,
    control: Mutex<Weak<Connection>>,
    link: Option<Arc<Link>>,
    /// Under a restart policy: the posted writes no response has confirmed
    /// yet, to send again to a restarted backend whose state lacks them.
    /// Locked inside the socket's lock.
    log: Mutex<PostedLog>,
    timeout: Duration,
    /// Entries of the command ring to set up with each backend that
    /// offers F_CMD_RING; 0: the data socket only.
    ring_entries: u32,
}

impl RemoteRegion {
    /// Wraps the frontend end of region `region`'s data socket.
    pub fn new(
        sock: UnixStream,
        region: u32,
        user_data: u64,
        perms: Permissions,
        health: Arc<Health>,
        timeout: Duration,
    ) -> io::Result<Self> {
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Ok(RemoteRegion {
            sock: Mutex::new(Transport::new(sock)),
            region,
            user_data,
            posted: false,
            perms,
            health,
            doorbells: Vec::new(),
            fast_mmio: false,
            vcpu_tokens: 0,
            control: Mutex::new(Weak::new()),
            link: None,
            log: Mutex::default(),
            timeout,
            ring_entries: 0,
        })
    }

    /// Commands travel on a command ring of `entries` entries wherever the
    /// backend offers F_CMD_RING (0: on the data socket only). Takes effect
    /// with [`RemoteRegion::start_ring`] and with every restarted backend.
    pub fn with_cmd_ring(mut self, entries: u32) -> Self {
        self.ring_entries = entries;
        self
    }

    /// Moves the region's commands to a command ring if it was asked for
    /// and the backend offers it; otherwise (or if the backend refuses,
    /// which is logged) they stay on the data socket. True on a ring.
    pub fn start_ring(&self) -> bool {
        let mut guard = self.lock_socket();
        self.ring_locked(&mut guard)
    }

    /// True when the region's commands travel on a command ring.
    pub fn on_ring(&self) -> bool {
        self.lock_socket().on_ring()
    }

    fn ring_locked(&self, t: &mut Transport) -> bool {
        if self.ring_entries == 0 {
            return false;
        }
        let Some(conn) = self.control() else {
            return false;
        };
        if conn.negotiated().features & F_CMD_RING == 0 {
            return false;
        }
        match ring::RingLink::set_up(&conn, self.region, self.ring_entries) {
            Ok(r) => {
                t.ring = Some(r);
                true
            }
            Err(e) => {
                log::warn!(
                    "{}: region {}: commands stay on the data socket: {}",
                    self.health.name(),
                    self.region,
                    outboard_protocol::error_chain(&e)
                );
                false
            }
        }
    }

    /// Writes to the region are posted (sent without waiting for an answer).
    pub fn with_posted_writes(mut self, posted: bool) -> Self {
        self.posted = posted;
        self
    }

    /// The backend answers to `user_data + 1 + i` for vCPU `i < tokens`.
    pub fn with_vcpu_tokens(mut self, tokens: u32) -> Self {
        self.vcpu_tokens = tokens;
        self
    }

    /// The device's control connection, used by [`BusDevice::quiesce`] as a
    /// barrier: the backend serves every data command queued before any
    /// control request (docs/protocol.md, section 7.5, "data before control").
    pub fn with_control(self, control: Weak<Connection>) -> Self {
        *self.control.lock().unwrap_or_else(PoisonError::into_inner) = control;
        self
    }

    /// The device's [`Link`]: an access that fails while the link restarts
    /// the backend waits for the new one (within the access deadline) and
    /// is sent again.
    pub fn with_link(mut self, link: &Arc<Link>) -> Self {
        self.link = link.restartable().then(|| Arc::clone(link));
        self
    }

    /// Swaps in the data socket of a restarted backend; see
    /// [`RemoteRegion::swap_locked`].
    pub(crate) fn replace_socket(
        &self,
        sock: UnixStream,
        control: Weak<Connection>,
        served: Option<u64>,
    ) {
        let mut guard = self.lock_socket();
        self.swap_locked(&mut guard, sock, control, served);
    }

    /// Holds the region's socket: no access goes out until the guard drops
    /// (a live upgrade holds every region of the device).
    pub(crate) fn lock_socket(&self) -> std::sync::MutexGuard<'_, Transport> {
        self.sock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Swaps in the data socket of a new backend, through the region's
    /// socket guard. `served` is how many commands of this placement the
    /// new backend's restored state holds (`None`: it keeps no state). The
    /// posted writes sent after those are sent again, in order, so that a
    /// posted write the dead backend never read is not lost; the count
    /// then continues from the new backend's.
    pub(crate) fn swap_locked(
        &self,
        guard: &mut std::sync::MutexGuard<'_, Transport>,
        sock: UnixStream,
        control: Weak<Connection>,
        served: Option<u64>,
    ) {
        if let Err(e) = sock
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| sock.set_write_timeout(Some(self.timeout)))
        {
            log::warn!("{}: data socket timeouts: {e}", self.health.name());
        }
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let deadline = Deadline::after(Some(self.timeout));
        let lost = log.resume(served, |c| send_all(&sock, c, &deadline).is_ok());
        if let Some((first, last)) = lost {
            log::warn!(
                "{}: region {}: posted writes {first}..={last} were lost with the backend \
                 (more than {} unconfirmed)",
                self.health.name(),
                self.region,
                posted::POSTED_LOG
            );
        }
        drop(log);
        **guard = Transport::new(sock);
        *self.control.lock().unwrap_or_else(PoisonError::into_inner) = control;
        // After the replay: the backend serves what its socket holds before
        // it takes the ring (data before control).
        self.ring_locked(guard);
    }

    fn control(&self) -> Option<Arc<Connection>> {
        self.control
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade()
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

    /// The region index within its device.
    pub fn region(&self) -> u32 {
        self.region
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
        if let Some(link) = &self.link {
            return self.transact_restartable(link, cmd);
        }
        let mut sock = self.sock.lock().unwrap_or_else(PoisonError::into_inner);
        // Re-check under the lock: another thread may have failed the device.
        if self.health.is_failed() {
            return Err(AccessError::DeviceFailed(self.health.name().to_owned()));
        }
        let result = sock.exchange(&cmd, self.timeout);
        if let Err(e) = &result {
            // A backend that died says why (its exit status, a sandbox
            // violation); a timeout leaves it running.
            let ended = match e {
                AccessError::Timeout => None,
                _ => self.control().and_then(|c| c.end_reason()),
            };
            self.health.fail_ended(e, ended);
        }
        result
    }

    /// [`RemoteRegion::transact`] under a restart policy: an access that
    /// fails because the backend died (or hung: it is killed) waits for
    /// the restarted backend, within one deadline for the whole access,
    /// and is sent to it again. What that means for each kind of access
    /// is in docs/architecture.md ("Restart").
    fn transact_restartable(&self, link: &Link, cmd: Cmd) -> Result<u64, AccessError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let generation = link.generation();
            let result = {
                let mut sock = self.sock.lock().unwrap_or_else(PoisonError::into_inner);
                if self.health.is_failed() {
                    return Err(AccessError::DeviceFailed(self.health.name().to_owned()));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                let result = sock.exchange(&cmd, left.max(Duration::from_millis(1)));
                if result.is_ok() {
                    self.log
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .record(&cmd);
                }
                result
            };
            let e = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if matches!(e, AccessError::Timeout) {
                link.kill_hung(generation);
            }
            if !link.await_restart(generation, deadline) {
                let ended = self.control().and_then(|c| c.end_reason());
                self.health.fail_ended(&e, ended);
                return Err(e);
            }
        }
    }

    /// Checks a response's data against its command (docs/protocol.md,
    /// section 7.2): a read's value fits the access width, a write's is
    /// zero. Anything else is a protocol violation that fails the device,
    /// never a value the bus would silently truncate.
    fn accept(&self, cmd: &Cmd, data: u64) -> Result<u64, AccessError> {
        let e = match cmd.op {
            Op::Read if data == cmd.size.truncate(data) => return Ok(data),
            Op::Write if data == 0 => return Ok(0),
            Op::Read => AccessError::Overwide {
                data,
                size: cmd.size.bytes(),
            },
            Op::Write => AccessError::WriteData(data),
        };
        self.health.fail(&e);
        Err(e)
    }
}

impl BusDevice for RemoteRegion {
    fn read(&self, access: Access) -> Result<u64, AccessError> {
        self.check(access.size, self.perms.read)?;
        let cmd = Cmd::read(self.token(access.vcpu), access.offset, access.size);
        let data = self.transact(cmd)?;
        self.accept(&cmd, data)
    }

    fn write(&self, access: Access, value: u64) -> Result<(), AccessError> {
        let Access { offset, size, .. } = access;
        self.check(size, self.perms.write)?;
        if let Some(d) = self
            .doorbells
            .iter()
            .find(|d| d.matches(offset, size, value))
        {
            // Never blocks, even on an eventfd the backend made blocking
            // and filled: a full counter is a ring still pending.
            return wait::signal_eventfd(&*d.eventfd)
                .map(|_| ())
                .map_err(access_error);
        }
        if self.fast_mmio {
            return Err(AccessError::Denied);
        }
        let cmd = Cmd::write(self.token(access.vcpu), offset, size, value, self.posted);
        let data = self.transact(cmd)?;
        self.accept(&cmd, data).map(|_| ())
    }

    fn quiesce(&self) {
        if !self.posted || self.health.is_failed() {
            return;
        }
        // Hold the socket so no access of ours slips in behind the barrier.
        let _sock = self.sock.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(conn) = self.control() {
            if let Err(e) = conn.barrier() {
                if self.link.is_some() {
                    // The backend died: its restart serves what came next.
                    log::debug!("{}: barrier: {e}", self.health.name());
                } else {
                    self.health.fail(&e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_protocol::ioregionfd::CMD_SIZE;
    use outboard_protocol::Resp;
    use std::io::{Read, Write};

    const RW: Permissions = Permissions {
        read: true,
        write: true,
        sizes: 0x0f,
    };

    fn region(perms: Permissions, timeout_ms: u64) -> (RemoteRegion, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let r = RemoteRegion::new(
            ours,
            2,
            100,
            perms,
            Health::new("t"),
            Duration::from_millis(timeout_ms),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        (r, theirs)
    }

    /// Plays the backend for `n` commands: answers reads with offset + token.
    fn serve(mut sock: UnixStream, n: usize) -> std::thread::JoinHandle<Vec<Cmd>> {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..n {
                let mut b = [0u8; CMD_SIZE];
                if sock.read_exact(&mut b).is_err() {
                    break;
                }
                let cmd = Cmd::decode(&b).unwrap_or_else(|e| panic!("{e}"));
                if cmd.resp {
                    let data = if cmd.op == Op::Read {
                        cmd.offset + cmd.user_data
                    } else {
                        0
                    };
                    let _ = sock.write_all(&Resp { data }.encode());
                }
                seen.push(cmd);
            }
            seen
        })
    }

    #[test]
    fn swap_when_state_served_part_of_the_log_then_the_rest_is_sent_again_in_order() {
        let (r, _old) = region(RW, 1000);
        for v in 1..=4u64 {
            r.log
                .lock()
                .unwrap()
                .record(&Cmd::write(1, v, AccessSize::B1, v, true));
        }
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        // The restored backend's state holds the first two.
        r.replace_socket(ours, Weak::new(), Some(2));
        let mut got = [0u8; 2 * CMD_SIZE];
        theirs.read_exact(&mut got).unwrap();
        let offsets: Vec<u64> = got
            .chunks(CMD_SIZE)
            .map(|c| Cmd::decode(c.try_into().unwrap()).unwrap().offset)
            .collect();
        assert_eq!(offsets, [3, 4]);
        let log = r.log.lock().unwrap();
        assert_eq!(log.sent, 4);
        assert_eq!(log.unconfirmed.len(), 2);
    }

    #[test]
    fn read_when_vcpu_has_a_token_then_its_token_else_the_base_one() {
        let (r, theirs) = region(RW, 5000);
        let r = r.with_vcpu_tokens(2);
        let backend = serve(theirs, 3);
        let a = Access::new(0, 8, AccessSize::B4);
        assert_eq!(r.read(a).unwrap_or(0), 108);
        assert_eq!(r.read(a.by(Some(1))).unwrap_or(0), 8 + 102);
        assert_eq!(r.read(a.by(Some(2))).unwrap_or(0), 108, "beyond the tokens");
        let seen = backend.join().unwrap_or_default();
        assert_eq!(seen.len(), 3);
        assert_eq!(r.region(), 2);
    }

    #[test]
    fn write_when_posted_or_doorbell_then_no_wait_and_eventfd_rings() {
        let (r, theirs) = region(RW, 5000);
        let bell = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap_or_else(|e| panic!("{e}")));
        let r = r.with_posted_writes(true).with_doorbells(
            vec![DoorbellMatch {
                offset: 0x50,
                size: Some(AccessSize::B4),
                datamatch: Some(1),
                eventfd: Arc::clone(&bell),
            }],
            false,
        );
        let backend = serve(theirs, 2);
        let w = Access::new(0, 0x50, AccessSize::B4);
        r.write(w, 1).unwrap_or_else(|e| panic!("{e}"));
        r.write(w, 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(bell.read().unwrap_or(0), 2, "both rang the eventfd");
        r.write(w, 2).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            r.read(w).unwrap_or(0),
            0x50 + 100,
            "the read follows the posted write"
        );
        let seen = backend.join().unwrap_or_default();
        assert_eq!(
            seen.len(),
            2,
            "only the mismatching write and the read travelled"
        );
        assert!(!seen[0].resp, "posted");
        r.quiesce(); // no control connection: nothing to wait for
    }

    #[test]
    fn access_when_denied_then_refused_without_touching_the_socket() {
        let ro = Permissions {
            read: true,
            write: false,
            sizes: 0x04,
        };
        let (r, _theirs) = region(ro, 5000);
        let a = Access::new(0, 0, AccessSize::B4);
        assert!(matches!(r.write(a, 1), Err(AccessError::Denied)));
        assert!(matches!(
            r.read(Access::new(0, 0, AccessSize::B2)),
            Err(AccessError::Denied)
        ));
        let (fast, _t) = region(RW, 5000);
        let fast = fast.with_doorbells(Vec::new(), true);
        assert!(matches!(fast.write(a, 1), Err(AccessError::Denied)));
    }

    #[test]
    fn read_when_backend_silent_then_timeout_fails_the_device_and_later_accesses_fail_fast() {
        let (r, _theirs) = region(RW, 50);
        let a = Access::new(0, 0, AccessSize::B4);
        assert!(matches!(r.read(a), Err(AccessError::Timeout)));
        assert!(r.health().is_failed());
        assert!(matches!(r.read(a), Err(AccessError::DeviceFailed(_))));
    }

    #[test]
    fn read_when_backend_gone_or_short_then_backend_gone_or_short_response() {
        let (r, theirs) = region(RW, 5000);
        drop(theirs);
        let a = Access::new(0, 0, AccessSize::B4);
        assert!(matches!(r.read(a), Err(AccessError::BackendGone)));
        let (r, mut theirs) = region(RW, 5000);
        let t = std::thread::spawn(move || {
            let mut b = [0u8; CMD_SIZE];
            let _ = theirs.read_exact(&mut b);
            let _ = theirs.write_all(&[0u8; 5]);
        });
        assert!(matches!(r.read(a), Err(AccessError::ShortResponse(5))));
        let _ = t.join();
    }

    #[test]
    fn read_when_backend_trickles_bytes_slower_than_the_timeout_then_timeout_for_the_whole_access()
    {
        let timeout = Duration::from_millis(100);
        let (r, mut theirs) = region(RW, 100);
        let peer = std::thread::spawn(move || {
            let mut b = [0u8; CMD_SIZE];
            let _ = theirs.read_exact(&mut b);
            for byte in (Resp { data: 1 }).encode() {
                std::thread::sleep(timeout * 8 / 10);
                if theirs.write_all(&[byte]).is_err() {
                    return;
                }
            }
        });
        let start = std::time::Instant::now();
        let got = r.read(Access::new(0, 0, AccessSize::B4));
        let took = start.elapsed();
        assert!(matches!(got, Err(AccessError::Timeout)), "got {got:?}");
        // Hang detector only: per-read timeouts took 32 x 0.8 x the timeout.
        assert!(took < timeout * 5, "took {took:?}");
        drop(r);
        let _ = peer.join();
    }

    #[test]
    fn write_when_backend_made_doorbell_blocking_and_full_then_returns_without_blocking() {
        let (r, _theirs) = region(RW, 5000);
        // What a hostile backend can do to the shared open file description:
        // clear O_NONBLOCK and raise the counter to its maximum.
        let bell = Arc::new(EventFd::new(0).unwrap_or_else(|e| panic!("{e}")));
        bell.write(u64::MAX - 1).unwrap_or_else(|e| panic!("{e}"));
        let r = r.with_doorbells(
            vec![DoorbellMatch {
                offset: 0,
                size: None,
                datamatch: None,
                eventfd: Arc::clone(&bell),
            }],
            false,
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(r.write(Access::new(0, 0, AccessSize::B4), 1).is_ok());
        });
        // Hang detector only: the write blocked forever before the fix.
        let done = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(done, Ok(true), "a full counter is a ring still pending");
        assert_eq!(bell.read().unwrap_or(0), u64::MAX - 1);
    }

    /// Plays a backend that answers one command with `data`.
    fn answer_once(mut theirs: UnixStream, data: u64) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut b = [0u8; CMD_SIZE];
            let _ = theirs.read_exact(&mut b);
            let _ = theirs.write_all(&Resp { data }.encode());
            // Keep the socket open until the frontend has read the response.
            let _ = theirs.read(&mut b);
        })
    }

    #[test]
    fn read_when_response_has_bits_above_the_access_size_then_overwide_and_device_failed() {
        for (size, data) in [
            (AccessSize::B1, 0x100),
            (AccessSize::B2, 0x1_0000),
            (AccessSize::B4, 0x8000_0000_0000_0000),
        ] {
            let (r, theirs) = region(RW, 5000);
            let backend = answer_once(theirs, data);
            let a = Access::new(0, 0, size);
            match r.read(a) {
                Err(AccessError::Overwide { data: d, size: s }) => {
                    assert_eq!((d, s), (data, size.bytes()))
                }
                other => panic!("{size:?}: {other:?}"),
            }
            assert!(r.health().is_failed());
            assert!(matches!(r.read(a), Err(AccessError::DeviceFailed(_))));
            drop(r);
            let _ = backend.join();
        }
        // The widest value that fits is fine.
        let (r, theirs) = region(RW, 5000);
        let backend = answer_once(theirs, 0xffff);
        assert_eq!(r.read(Access::new(0, 0, AccessSize::B2)).ok(), Some(0xffff));
        assert!(!r.health().is_failed());
        drop(r);
        let _ = backend.join();
    }

    #[test]
    fn write_when_response_carries_data_then_write_data_and_device_failed() {
        let (r, theirs) = region(RW, 5000);
        let backend = answer_once(theirs, 1);
        let a = Access::new(0, 0, AccessSize::B8);
        assert!(matches!(r.write(a, 7), Err(AccessError::WriteData(1))));
        assert!(r.health().is_failed());
        drop(r);
        let _ = backend.join();
    }
}
