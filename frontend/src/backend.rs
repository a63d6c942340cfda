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

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use outboard_protocol::channel::{self, Channel};
use outboard_protocol::control::{
    self, DeviceInfo, DoorbellInfo, Header, Hello, IrqInfo, MemTable, Negotiated, Payload,
    RegionIndex, RegionInfo, Request, SetIrq, SetRegion, Status, StatusReply, FEATURES_SUPPORTED,
    IRQ_RESAMPLE,
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
    /// reply to {0:?} carried file descriptors
    #[error("reply to {0:?} carried file descriptors")]
    UnexpectedFds(Request),
    /// backend {0} exited during start-up with {1}
    #[error("backend {0} exited during start-up with {1}")]
    Exited(String, ExitStatus),
    /// protocol negotiation failed
    #[error("protocol negotiation failed")]
    Negotiation(#[source] control::Error),
}

/// Where a backend comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Spawn this program (a path, or a name looked up by [`Launcher`]) with these arguments.
    Spawn {
        /// Program path or name.
        program: String,
        /// Arguments after the ones the frontend adds.
        args: Vec<String>,
    },
    /// Connect to a backend listening on this Unix socket path.
    Connect {
        /// Socket path.
        socket: PathBuf,
    },
    /// Connect to a standard vhost-user backend; the frontend implements the
    /// virtio-mmio transport for it.
    VhostUser {
        /// The backend's socket path.
        socket: PathBuf,
        /// Virtio device type: `blk`, `rng`, `console` or a numeric ID.
        device: String,
    },
}

/// Finds backend programs.
#[derive(Debug, Clone, Default)]
pub struct Launcher {
    /// Directories searched first, in order, for a program given by name.
    pub search_dirs: Vec<PathBuf>,
    /// A program that can run built-in backends as `EXE PREFIX... NAME ARGS...`,
    /// used when a named backend is not found but is in `names`.
    pub builtin: Option<Builtin>,
    /// Where spawned backends' stdout goes (inherited when `None`).
    pub quiet_stdout: bool,
}

/// A multi-call program that can run backends by name.
#[derive(Debug, Clone)]
pub struct Builtin {
    /// The program.
    pub exe: PathBuf,
    /// Arguments before the backend name.
    pub prefix: Vec<OsString>,
    /// Backend names it can run.
    pub names: Vec<String>,
}

impl Launcher {
    /// Searches beside the running executable (and its parent directory, where
    /// test executables live below the binaries).
    pub fn beside_current_exe() -> Self {
        let mut search_dirs = Vec::new();
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                search_dirs.push(dir.to_path_buf());
                if let Some(up) = dir.parent() {
                    search_dirs.push(up.to_path_buf());
                }
            }
        }
        Launcher {
            search_dirs,
            builtin: None,
            quiet_stdout: false,
        }
    }

    /// The command that starts `program` with `args`.
    pub fn command(&self, program: &str, args: &[String]) -> Result<Command, Error> {
        if program.contains('/') {
            let mut c = Command::new(program);
            c.args(args);
            return Ok(c);
        }
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        let found = self
            .search_dirs
            .iter()
            .chain(path_dirs.iter())
            .map(|d| d.join(program))
            .find(|p| is_executable(p));
        if let Some(path) = found {
            let mut c = Command::new(path);
            c.args(args);
            return Ok(c);
        }
        match &self.builtin {
            Some(b) if b.names.iter().any(|n| n == program) => {
                debug!("{program} not installed; running the built-in copy");
                let mut c = Command::new(&b.exe);
                c.args(&b.prefix).arg(program).args(args);
                Ok(c)
            }
            _ => Err(Error::NotFound(program.to_owned())),
        }
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Connects to a Unix socket, retrying while the listener is not there yet
/// (the backend is still starting), for at most `timeout`.
pub fn connect_retrying(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
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
    child: Option<Child>,
    negotiated: Negotiated,
    label: String,
}

impl Connection {
    /// Spawns `cmd` with one end of a new control socket as `--control-fd N`,
    /// and negotiates.
    pub fn spawn(mut cmd: Command, quiet_stdout: bool, timeout: Duration) -> Result<Self, Error> {
        let (ours, theirs) = UnixStream::pair().map_err(Error::SocketPair)?;
        let fd: RawFd = theirs.as_raw_fd();
        let parent = std::process::id();
        cmd.arg("--control-fd").arg(fd.to_string());
        cmd.stdin(Stdio::null());
        if quiet_stdout {
            cmd.stdout(Stdio::null());
        }
        // SAFETY: the closure runs in the child between fork and exec and only
        // makes async-signal-safe calls (fcntl, prctl, getppid) on plain
        // integers; it touches no memory shared with the parent.
        unsafe {
            cmd.pre_exec(move || {
                // Keep the control socket across exec: it was created close-on-exec.
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Die with the frontend. The signal fires when the forking
                // thread exits, so spawn from a long-lived thread.
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
        let child = cmd.spawn().map_err(|e| Error::Spawn(program.clone(), e))?;
        drop(theirs);
        let label = format!("{} (pid {})", program.display(), child.id());
        info!("spawned {label}");
        Connection::negotiate(Channel::new(ours), Some(child), label, timeout)
    }

    /// Connects to a backend listening at `path` (retrying while it starts up,
    /// within `timeout`) and negotiates.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, Error> {
        let sock =
            connect_retrying(path, timeout).map_err(|e| Error::Connect(path.to_path_buf(), e))?;
        let label = path.display().to_string();
        info!("connected to {label}");
        Connection::negotiate(Channel::new(sock), None, label, timeout)
    }

    fn negotiate(
        channel: Channel,
        child: Option<Child>,
        label: String,
        timeout: Duration,
    ) -> Result<Self, Error> {
        channel.set_timeout(Some(timeout)).map_err(Error::Channel)?;
        let mut conn = Connection {
            channel,
            child,
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
        debug!(
            "{}: protocol version {}, features {:#x}",
            conn.label, conn.negotiated.version, conn.negotiated.features
        );
        Ok(conn)
    }

    /// If the spawned child has already exited, the error that says so.
    fn exited(&mut self) -> Option<Error> {
        let child = self.child.as_mut()?;
        // Give a dying child a moment to be reaped before asking.
        for _ in 0..50 {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(Error::Exited(self.label.clone(), status));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    /// The negotiated version and features.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// The spawned child's pid, if this backend was spawned.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Program path or socket path, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sends a request with NEED_REPLY and returns the reply payload.
    fn call(&self, request: Request, payload: &[u8], fds: &[RawFd]) -> Result<Vec<u8>, Error> {
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

    /// Removes a region; `set` must match the placement exactly.
    pub fn remove_region(&self, set: &SetRegion) -> Result<(), Error> {
        self.call_ack(Request::RemoveRegion, &set.encode(), &[])
    }

    /// Resets the device.
    pub fn reset(&self) -> Result<(), Error> {
        self.call_ack(Request::Reset, &[], &[])
    }

    /// Asks the backend to exit, waits up to `grace` for a spawned child to
    /// do so, then kills it. Returns the child's exit status.
    pub fn shutdown(mut self, grace: Duration) -> Option<ExitStatus> {
        if let Err(e) = self.call_ack(Request::Shutdown, &[], &[]) {
            debug!("{}: shutdown request: {e}", self.label);
        }
        self.reap(grace)
    }

    fn reap(&mut self, grace: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
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
        self.child = None;
        status
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Closing the channel makes a healthy backend exit; a hung one is killed.
        if self.child.is_some() {
            let _ = self.channel.socket().shutdown(std::net::Shutdown::Both);
            self.reap(Duration::from_millis(500));
        }
    }
}
