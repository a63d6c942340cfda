//! Backend processes and the frontend side of their control channel.
//!
//! A [`Connection`] is one backend: either a child process the frontend
//! spawned with an inherited control socket (`--control-fd N`), or a
//! backend already listening on a Unix socket path. Spawned children get
//! `PR_SET_PDEATHSIG(SIGKILL)`, so they cannot outlive the frontend even if
//! it is killed; every backend also exits when its control socket closes.
//!
//! Every request is sent with NEED_REPLY and waits for its reply under the
//! control timeout; a reply is checked (REPLY bit, same request code,
//! payload layout) before anything in it is used.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

pub use crate::launch::{Builtin, Launcher, Source};
use crate::stderr::StderrTail;
use outboard_protocol::channel::{self, Channel};
use outboard_protocol::control::{
    self, DeviceInfo, DoorbellInfo, Header, Hello, IrqInfo, MemTable, Negotiated, Payload,
    RegionIndex, RegionInfo, Request, SetCmdRing, SetIrq, SetRegion, Status, StatusReply,
    FEATURES_SUPPORTED, IRQ_RESAMPLE,
};
use thiserror::Error;

/// Errors talking to a backend.
#[derive(Debug, Error)]
pub enum Error {
    /// backend program {0} not found
    #[error("backend program {0} not found (looked beside the frontend binary and in PATH)")]
    NotFound(String),
    /// cannot create the control socket
    #[error("cannot create the control socket")]
    SocketPair(#[source] io::Error),
    /// cannot start {0}
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] io::Error),
    /// cannot connect to {0}
    #[error("cannot connect to {0}")]
    Connect(PathBuf, #[source] io::Error),
    /// control channel failed
    #[error("control channel failed")]
    Channel(#[source] channel::Error),
    /// backend refused {request:?}: {status}
    #[error("backend refused {request:?}: {status}")]
    Refused {
        /// The request.
        request: Request,
        /// The backend's status.
        status: Status,
    },
    /// malformed reply to {request:?}
    #[error("malformed reply to {request:?}")]
    BadReply {
        /// The request.
        request: Request,
        /// What was wrong.
        #[source]
        source: control::Error,
    },
    /// reply to {request:?} has request code {got} and flags {flags:#x}
    #[error("reply to {request:?} has request code {got} and flags {flags:#x}")]
    UnexpectedReply {
        /// The request.
        request: Request,
        /// Request code in the reply header.
        got: u32,
        /// Flags in the reply header.
        flags: u32,
    },
    /// the device cannot be restarted (it was not spawned)
    #[error("the device cannot be restarted (it was not spawned)")]
    NotRestartable,
    /// the restarted backend describes another device ({0})
    #[error("the restarted backend describes another device ({0})")]
    OtherDevice(String),
    /// restart limit reached; last end: {0}
    #[error("restart limit reached; last end: {0}")]
    RestartLimit(String),
    /// error reply to {0:?} carries status Ok
    #[error("error reply to {0:?} carries status Ok")]
    ErrorWithOk(Request),
    /// reply to {0:?} carried file descriptors
    #[error("reply to {0:?} carried file descriptors")]
    UnexpectedFds(Request),
    /// backend {0} exited during start-up with {1}
    #[error("backend {0} exited during start-up with {1}")]
    Exited(String, ExitStatus),
    /// protocol negotiation failed
    #[error("protocol negotiation failed")]
    Negotiation(#[source] control::Error),
    /// cannot give the backend its host stream
    #[error("cannot give the backend its host stream")]
    HostStream(#[source] crate::host_stream::Error),
}

/// Connects to a Unix socket, retrying while the listener is not there yet
/// (the backend is still starting), for at most `timeout`.
pub fn connect_retrying(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    connect_retrying_while(path, timeout, || true)
}

/// [`connect_retrying`] that also stops retrying once `go_on` says so (a
/// device that is being dropped).
pub(crate) fn connect_retrying_while(
    path: &Path,
    timeout: Duration,
    go_on: impl Fn() -> bool,
) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline
                    && go_on() =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// One backend and its control channel.
#[derive(Debug)]
pub struct Connection {
    channel: Channel,
    /// One request/reply exchange at a time: threads share the connection.
    calls: Mutex<()>,
    child: Mutex<Option<Child>>,
    /// How the spawned child ended, once reaped.
    ended: Mutex<Option<ExitStatus>>,
    /// The spawned child's stderr, passed through and remembered.
    stderr: Option<Arc<StderrTail>>,
    /// The confined backend's own pid (see [`Connection::pid`]).
    serving: Option<u32>,
    negotiated: Negotiated,
    label: String,
}

impl Connection {
    /// Spawns `cmd` with one end of a new control socket as `--control-fd N`,
    /// and negotiates. A [`Prepared`](crate::launch::Prepared) command also
    /// passes the descriptors it lists (and nothing else).
    pub fn spawn(
        cmd: impl Into<crate::launch::Prepared>,
        quiet_stdout: bool,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let crate::launch::Prepared {
            command: mut cmd,
            inherit,
        } = cmd.into();
        let inherited: Vec<RawFd> = inherit.iter().map(AsRawFd::as_raw_fd).collect();
        let (ours, theirs) = UnixStream::pair().map_err(Error::SocketPair)?;
        let fd: RawFd = theirs.as_raw_fd();
        let parent = std::process::id();
        cmd.arg("--control-fd").arg(fd.to_string());
        cmd.stdin(Stdio::null());
        // Passed through by a thread that remembers why the backend died.
        cmd.stderr(Stdio::piped());
        if quiet_stdout {
            cmd.stdout(Stdio::null());
        }
        // A clean environment: nothing of the frontend's but what a backend's
        // diagnostics read.
        let keep: Vec<(&str, std::ffi::OsString)> = KEPT_ENV
            .iter()
            .filter_map(|&k| Some((k, std::env::var_os(k)?)))
            .collect();
        cmd.env_clear().envs(keep);
        // SAFETY: the closure runs in the child between fork and exec and only
        // makes async-signal-safe calls (close_range, getrlimit, fcntl, prctl,
        // getppid) on plain integers; it touches no memory shared with the
        // parent.
        unsafe {
            cmd.pre_exec(move || {
                // Exactly the protocol's fds cross exec: stdin, stdout, stderr
                // and the control socket. Everything else the frontend had
                // open without close-on-exec (a file its shell left open,
                // another device's sockets) is marked close-on-exec here;
                // std's own exec-error pipe already is.
                mark_cloexec_from(3)?;
                // Keep the control socket across exec, and the descriptors
                // the command's arguments name.
                for &keep in std::iter::once(&fd).chain(inherited.iter()) {
                    if libc::fcntl(keep, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Die with the frontend. The signal fires when the forking
                // thread exits: launch::spawn_from_launcher_thread forks from a
                // thread that lives as long as the process.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let program = PathBuf::from(cmd.get_program());
        let mut child = crate::launch::spawn_from_launcher_thread(cmd)
            .map_err(|e| Error::Spawn(program.clone(), e))?;
        drop(theirs);
        drop(inherit);
        let label = format!("{} (pid {})", program.display(), child.id());
        info!("spawned {label}");
        let stderr = match child.stderr.take() {
            Some(pipe) => match StderrTail::follow(pipe, &label) {
                Ok(t) => Some(t),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::Spawn(program, e));
                }
            },
            None => None,
        };
        Connection::negotiate(Channel::new(ours), Some(child), stderr, label, timeout)
    }

    /// Connects to a backend listening at `path` (retrying while it starts up,
    /// within `timeout`) and negotiates.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, Error> {
        let sock =
            connect_retrying(path, timeout).map_err(|e| Error::Connect(path.to_path_buf(), e))?;
        let label = path.display().to_string();
        info!("connected to {label}");
        Connection::negotiate(Channel::new(sock), None, None, label, timeout)
    }

    fn negotiate(
        mut channel: Channel,
        child: Option<Child>,
        stderr: Option<Arc<StderrTail>>,
        label: String,
        timeout: Duration,
    ) -> Result<Self, Error> {
        channel.set_timeout(Some(timeout)).map_err(Error::Channel)?;
        let mut conn = Connection {
            channel,
            calls: Mutex::new(()),
            child: Mutex::new(child),
            ended: Mutex::new(None),
            stderr,
            serving: None,
            negotiated: Negotiated {
                version: 0,
                features: 0,
            },
            label,
        };
        let ours = Hello::ours(FEATURES_SUPPORTED);
        let reply = match conn.call(Request::Hello, &ours.encode(), &[]) {
            Ok(r) => r,
            Err(e) => return Err(conn.exited().unwrap_or(e)),
        };
        let peer = Hello::decode(&reply).map_err(|source| Error::BadReply {
            request: Request::Hello,
            source,
        })?;
        conn.negotiated = ours.negotiate(&peer).map_err(Error::Negotiation)?;
        // A confined backend forks before it serves: by now its child exists.
        conn.serving = conn.spawned_pid().and_then(only_child);
        debug!(
            "{}: protocol version {}, features {:#x}",
            conn.label, conn.negotiated.version, conn.negotiated.features
        );
        Ok(conn)
    }

    /// If the spawned child has already exited, the error that says so.
    fn exited(&self) -> Option<Error> {
        let status = self.exit_status()?;
        Some(Error::Exited(self.label.clone(), status))
    }

    /// How the spawned child ended, waiting a moment for a dying one;
    /// `None` while it runs (or if this backend was not spawned).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        if let Some(s) = *self.ended.lock().unwrap_or_else(PoisonError::into_inner) {
            return Some(s);
        }
        let mut guard = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let child = guard.as_mut()?;
        // Give a dying child a moment to be reaped before asking.
        for _ in 0..50 {
            if let Ok(Some(status)) = child.try_wait() {
                *guard = None;
                *self.ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    /// Why a spawned backend is gone: its exit status and the reason it
    /// gave on stderr (a confined backend names the system call it was
    /// stopped at). `None` while it runs.
    pub fn end_reason(&self) -> Option<String> {
        let status = self.exit_status()?;
        let said = self.stderr.as_ref().and_then(|t| {
            // The stderr thread may still be copying the last line.
            for _ in 0..50 {
                if let Some(r) = t.reason() {
                    return Some(r);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        });
        Some(match said {
            Some(r) => format!("backend ended ({status}): {r}"),
            None => format!("backend ended ({status})"),
        })
    }

    /// The negotiated version and features.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// The pid of the process serving the device, if this backend was
    /// spawned: the spawned child, or in a confined backend the child's one
    /// child (the backend proper, pid 1 of its own pid namespace; the
    /// spawned process is its supervisor).
    pub fn pid(&self) -> Option<u32> {
        if let Some(p) = self.serving {
            return Some(p);
        }
        self.spawned_pid()
    }

    /// The pid of the process this connection spawned, if any.
    pub fn spawned_pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(Child::id)
    }

    /// Program path or socket path, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sends a request with NEED_REPLY and returns the reply payload.
    fn call(&self, request: Request, payload: &[u8], fds: &[RawFd]) -> Result<Vec<u8>, Error> {
        let _one_at_a_time = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        self.channel
            .send(Header::request(request, payload.len(), true), payload, fds)
            .map_err(Error::Channel)?;
        let msg = self.channel.recv().map_err(Error::Channel)?;
        let h = msg.header;
        if !h.is_reply() || h.request != request as u32 {
            return Err(Error::UnexpectedReply {
                request,
                got: h.request,
                flags: h.flags,
            });
        }
        if !msg.fds.is_empty() {
            return Err(Error::UnexpectedFds(request));
        }
        if h.is_error() {
            let status = StatusReply::decode(&msg.payload)
                .map_err(|source| Error::BadReply { request, source })?
                .status;
            // An error that reports success is no refusal but a malformed reply.
            if status == Status::Ok {
                return Err(Error::ErrorWithOk(request));
            }
            return Err(Error::Refused { request, status });
        }
        Ok(msg.payload)
    }

    fn call_ack(&self, request: Request, payload: &[u8], fds: &[RawFd]) -> Result<(), Error> {
        let reply = self.call(request, payload, fds)?;
        match StatusReply::decode(&reply) {
            Ok(StatusReply { status: Status::Ok }) => Ok(()),
            Ok(StatusReply { status }) => Err(Error::Refused { request, status }),
            Err(source) => Err(Error::BadReply { request, source }),
        }
    }

    /// Asks for the device's identity.
    pub fn device_info(&self) -> Result<DeviceInfo, Error> {
        let r = self.call(Request::GetDeviceInfo, &[], &[])?;
        DeviceInfo::decode(&r).map_err(|source| Error::BadReply {
            request: Request::GetDeviceInfo,
            source,
        })
    }

    /// Asks for region `index`.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo, Error> {
        let r = self.call(Request::GetRegionInfo, &RegionIndex { index }.encode(), &[])?;
        let info = RegionInfo::decode(&r).map_err(|source| Error::BadReply {
            request: Request::GetRegionInfo,
            source,
        })?;
        if info.index != index || info.size == 0 {
            return Err(Error::BadReply {
                request: Request::GetRegionInfo,
                source: control::Error::Reserved("region index or size"),
            });
        }
        Ok(info)
    }

    /// Asks for doorbell `index`.
    pub fn doorbell_info(&self, index: u32) -> Result<DoorbellInfo, Error> {
        let r = self.call(
            Request::GetDoorbellInfo,
            &RegionIndex { index }.encode(),
            &[],
        )?;
        let info = DoorbellInfo::decode(&r).map_err(|source| Error::BadReply {
            request: Request::GetDoorbellInfo,
            source,
        })?;
        if info.index != index {
            return Err(Error::BadReply {
                request: Request::GetDoorbellInfo,
                source: control::Error::Reserved("doorbell index"),
            });
        }
        Ok(info)
    }

    /// Asks for interrupt line `index`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, Error> {
        let r = self.call(Request::GetIrqInfo, &RegionIndex { index }.encode(), &[])?;
        let info = IrqInfo::decode(&r).map_err(|source| Error::BadReply {
            request: Request::GetIrqInfo,
            source,
        })?;
        if info.index != index {
            return Err(Error::BadReply {
                request: Request::GetIrqInfo,
                source: control::Error::Reserved("irq index"),
            });
        }
        Ok(info)
    }

    /// Sends a memory table with its fds.
    pub fn set_mem_table(&self, table: &MemTable, fds: &[RawFd]) -> Result<(), Error> {
        self.call_ack(Request::SetMemTable, &table.encode(), fds)
    }

    /// Hands over doorbell `index`'s eventfd.
    pub fn set_doorbell(&self, index: u32, eventfd: RawFd) -> Result<(), Error> {
        self.call_ack(
            Request::SetDoorbell,
            &RegionIndex { index }.encode(),
            &[eventfd],
        )
    }

    /// Hands over interrupt line `index`'s eventfd and, for a level line, its resample eventfd.
    pub fn set_irq(
        &self,
        index: u32,
        eventfd: RawFd,
        resample: Option<RawFd>,
    ) -> Result<(), Error> {
        let (flags, fds) = match resample {
            Some(r) => (IRQ_RESAMPLE, vec![eventfd, r]),
            None => (0, vec![eventfd]),
        };
        self.call_ack(Request::SetIrq, &SetIrq { index, flags }.encode(), &fds)
    }

    /// Places a region and hands over its data socket.
    pub fn set_region(&self, set: &SetRegion, data_fd: RawFd) -> Result<(), Error> {
        self.call_ack(Request::SetRegion, &set.encode(), &[data_fd])
    }

    /// Moves a placed region's data commands to a command ring: the
    /// ring's memfd, then the `kick` and `notify` eventfds (needs F_CMD_RING).
    pub fn set_cmd_ring(&self, set: &SetCmdRing, fds: [RawFd; 3]) -> Result<(), Error> {
        self.call_ack(Request::SetCmdRing, &set.encode(), &fds)
    }

    /// Removes a region; `set` must match the placement exactly.
    pub fn remove_region(&self, set: &SetRegion) -> Result<(), Error> {
        self.call_ack(Request::RemoveRegion, &set.encode(), &[])
    }

    /// Hands over the state area (a sealed memfd; needs F_STATE).
    pub fn set_state_area(&self, fd: RawFd) -> Result<(), Error> {
        self.call_ack(Request::SetStateArea, &[], &[fd])
    }

    /// Restores the device from the state area's newest record (needs F_STATE).
    pub fn restore_state(&self) -> Result<(), Error> {
        self.call_ack(Request::RestoreState, &[], &[])
    }

    /// Pauses the device and commits its state to the state area (needs
    /// F_STATE); afterwards the backend serves control requests only.
    pub fn save_state(&self) -> Result<(), Error> {
        self.call_ack(Request::SaveState, &[], &[])
    }

    /// The control socket, to wait for its hang-up.
    pub fn control_fd(&self) -> RawFd {
        self.channel.socket().as_raw_fd()
    }

    /// Kills the spawned backend (SIGKILL to the process serving the
    /// device, then to the spawned one), for a backend that hangs.
    pub fn kill(&self) -> io::Result<()> {
        for pid in [self.serving, self.spawned_pid()].into_iter().flatten() {
            let pid = libc::pid_t::try_from(pid)
                .map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
            // SAFETY: kill only sends a signal to a process we spawned (or
            // its one child); a pid already reaped cannot be reused while
            // this connection holds the Child, which it does until reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        Ok(())
    }

    /// Resets the device.
    pub fn reset(&self) -> Result<(), Error> {
        self.call_ack(Request::Reset, &[], &[])
    }

    /// Returns once the backend has served every data command sent before
    /// the call: any control request is a barrier (docs/protocol.md,
    /// section 7.5); GET_DEVICE_INFO is the one without side effects.
    pub fn barrier(&self) -> Result<(), Error> {
        self.device_info().map(|_| ())
    }

    /// Asks the backend to exit, waits up to `grace` for a spawned child to
    /// do so, then kills it. Returns the child's exit status.
    pub fn shutdown(&self, grace: Duration) -> Option<ExitStatus> {
        if let Err(e) = self.call_ack(Request::Shutdown, &[], &[]) {
            debug!("{}: shutdown request: {e}", self.label);
        }
        self.reap(grace)
    }

    fn reap(&self, grace: Duration) -> Option<ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let child = guard.as_mut()?;
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    *guard = None;
                    *self.ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) | Err(_) => break,
            }
        }
        warn!("{} did not exit; killing it", self.label);
        let _ = child.kill();
        let status = child.wait().ok();
        *guard = None;
        status
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing the channel makes a healthy backend exit; a hung one is killed.
        let spawned = self
            .child
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        if spawned {
            let _ = self.channel.socket().shutdown(std::net::Shutdown::Both);
            self.reap(Duration::from_millis(500));
        }
    }
}

/// The one child of process `pid`, if it has exactly one (from /proc).
fn only_child(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    let mut kids = text.split_whitespace().filter_map(|k| k.parse().ok());
    match (kids.next(), kids.next()) {
        (Some(k), None) => Some(k),
        _ => None,
    }
}

/// Environment variables a spawned backend inherits; every other one is
/// dropped.
const KEPT_ENV: &[&str] = &["RUST_BACKTRACE", "RUST_LOG"];

/// Marks every fd from `first` up close-on-exec, in a child between fork
/// and exec: close_range(CLOSE_RANGE_CLOEXEC) where the kernel has it
/// (5.11), else fcntl on every fd below RLIMIT_NOFILE (capped at 1 << 20).
fn mark_cloexec_from(first: libc::c_uint) -> io::Result<()> {
    // SAFETY: close_range takes integers and only changes this process's
    // fd table.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let top = lim.rlim_cur.min(1 << 20) as libc::c_int;
    for n in first as libc::c_int..top {
        // SAFETY: fcntl on a plain integer; fds that are not open give EBADF.
        unsafe { libc::fcntl(n, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}
