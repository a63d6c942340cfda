//! The command line every backend shares, and the `main` that runs one.
//!
//! ```text
//! outboard-foo --control-fd N      # spawned by a frontend, control socket inherited
//! outboard-foo --socket PATH       # listen at PATH, serve the first frontend that connects
//!              [--log-level LEVEL] [device options...]
//! ```
//!
//! Exit status: 0 after SHUTDOWN or when the frontend closes the control
//! socket; 1 when the backend cannot start (bad options, bad fd, cannot
//! listen); 2 on a protocol violation. The reason is printed on stderr.

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, FromArgMatches, Parser};
use log::info;
use outboard_protocol::error_chain;
use thiserror::Error;

use crate::device::Device;
use crate::runtime::{self, Backend};
use crate::virtio::{VirtioDevice, VirtioMmio};

/// Exit status after a clean shutdown.
pub const EXIT_OK: u8 = 0;
/// Exit status when the backend cannot start.
pub const EXIT_SETUP: u8 = 1;
/// Exit status after a protocol violation or I/O failure while serving.
pub const EXIT_PROTOCOL: u8 = 2;

/// Options shared by every backend.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// Serve the control socket inherited as this fd (set by a spawning frontend).
    #[arg(
        long,
        value_name = "N",
        conflicts_with_all = ["socket", "vhost_user"],
        required_unless_present_any = ["socket", "vhost_user"]
    )]
    pub control_fd: Option<RawFd>,
    /// Listen on this Unix socket path and serve the first frontend that connects.
    #[arg(long, value_name = "PATH", conflicts_with = "vhost_user")]
    pub socket: Option<PathBuf>,
    /// Virtio devices only: serve the device over vhost-user on this socket
    /// path (to the first frontend that connects) instead of ioregionfd.
    #[arg(long, value_name = "PATH")]
    pub vhost_user: Option<PathBuf>,
    /// Log level: off, error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: log::LevelFilter,
}

#[derive(Debug, Parser)]
struct Cli<A: Args> {
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    device: A,
}

/// Errors that stop a backend from starting.
#[derive(Debug, Error)]
pub enum Error {
    /// fd {0} is not an open stream socket
    #[error("fd {0} is not an open stream socket")]
    BadControlFd(RawFd),
    /// cannot listen on {0}
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] io::Error),
    /// {0} exists and is not a socket
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// cannot accept a frontend connection
    #[error("cannot accept a frontend connection")]
    Accept(#[source] io::Error),
    /// cannot set up the device
    #[error("cannot set up the device")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// cannot start the event loop
    #[error("cannot start the event loop")]
    Runtime(#[source] runtime::Error),
    /// this device has no vhost-user transport
    #[error("this device has no vhost-user transport")]
    NoVhostUser,
}

/// Obtains the control socket the options name: the inherited fd, or the
/// first connection on a listening socket. Returns the socket path to remove
/// at exit, if any.
pub fn connect(args: &BackendArgs) -> Result<(UnixStream, Option<PathBuf>), Error> {
    if let Some(fd) = args.control_fd {
        return Ok((take_control_fd(fd)?, None));
    }
    let Some(path) = args.socket.clone() else {
        return Err(Error::BadControlFd(-1));
    };
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(&path);
        }
        Ok(_) => return Err(Error::NotASocket(path)),
        Err(_) => {}
    }
    let listener = UnixListener::bind(&path).map_err(|e| Error::Listen(path.clone(), e))?;
    info!("listening on {}", path.display());
    let (sock, _) = listener.accept().map_err(Error::Accept)?;
    info!("frontend connected");
    Ok((sock, Some(path)))
}

fn take_control_fd(fd: RawFd) -> Result<UnixStream, Error> {
    // SAFETY: F_GETFD only queries the descriptor table; an invalid fd yields -1.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(Error::BadControlFd(fd));
    }
    // SAFETY: the fd is open (checked above) and was handed to this process on
    // its command line for exactly this purpose; it is taken once, here, so
    // nothing else in the process owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    if !runtime::is_stream_socket(&owned) {
        // Hand it back untouched rather than closing a descriptor we do not understand.
        std::mem::forget(owned);
        return Err(Error::BadControlFd(fd));
    }
    // SAFETY: F_SETFD with FD_CLOEXEC on a descriptor we own; no memory is touched.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(UnixStream::from(owned))
}

fn init_logging(program: &str, level: log::LevelFilter) {
    let program = program.to_owned();
    let _ = env_logger::Builder::new()
        .filter_level(level)
        .format(move |buf, record| {
            use std::io::Write;
            writeln!(
                buf,
                "{program}: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .try_init();
}

/// Parses the shared and device options from `args` (the first item is the
/// program name), builds the device with `make`, and serves it until the
/// frontend leaves. Returns the process exit status; see the module docs.
pub fn run<A, D, F, E>(program: &str, args: impl IntoIterator<Item = OsString>, make: F) -> ExitCode
where
    A: Args,
    D: Device,
    F: FnOnce(A) -> Result<D, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cli = match parse::<A>(program, args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if cli.backend.vhost_user.is_some() {
        eprintln!("{program}: error: {}", Error::NoVhostUser);
        return ExitCode::from(EXIT_SETUP);
    }
    let device = make(cli.device).map_err(|e| Error::Device(e.into()));
    finish(program, &cli.backend, device)
}

/// Like [`run`] for a virtio device: served through the virtio-mmio
/// transport over ioregionfd, or over vhost-user with `--vhost-user PATH`.
/// The device logic is the same either way.
pub fn run_virtio<A, V, F, E>(
    program: &str,
    args: impl IntoIterator<Item = OsString>,
    make: F,
) -> ExitCode
where
    A: Args,
    V: VirtioDevice + Send + Sync + 'static,
    F: FnOnce(A) -> Result<V, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let cli = match parse::<A>(program, args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let device = make(cli.device).map_err(|e| Error::Device(e.into()));
    match (&cli.backend.vhost_user, device) {
        (Some(path), Ok(device)) => match crate::vhost_user::serve(device, path) {
            Ok(()) => ExitCode::from(EXIT_OK),
            Err(e) => {
                eprintln!("{program}: error: {}", error_chain(&e));
                ExitCode::from(EXIT_PROTOCOL)
            }
        },
        (_, device) => finish(program, &cli.backend, device.map(VirtioMmio::new)),
    }
}

fn parse<A: Args>(
    program: &str,
    args: impl IntoIterator<Item = OsString>,
) -> Result<Cli<A>, ExitCode> {
    let parsed = Cli::<A>::command_for(program)
        .try_get_matches_from(args)
        .and_then(|m| Cli::<A>::from_arg_matches(&m));
    match parsed {
        Ok(c) => {
            init_logging(program, c.backend.log_level);
            Ok(c)
        }
        Err(e) => {
            // --help and --version print to stdout and succeed; usage errors
            // are start-up failures (status 1), never mistaken for protocol ones.
            let _ = e.print();
            Err(ExitCode::from(if e.use_stderr() {
                EXIT_SETUP
            } else {
                EXIT_OK
            }))
        }
    }
}

fn finish<D: Device>(program: &str, args: &BackendArgs, device: Result<D, Error>) -> ExitCode {
    match serve(args, || device) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(Served::Setup(e)) => {
            eprintln!("{program}: error: {}", error_chain(&e));
            ExitCode::from(EXIT_SETUP)
        }
        Err(Served::Runtime(e)) => {
            eprintln!("{program}: error: {}", error_chain(&e));
            ExitCode::from(EXIT_PROTOCOL)
        }
    }
}

enum Served {
    Setup(Error),
    Runtime(runtime::Error),
}

fn serve<D: Device>(
    args: &BackendArgs,
    make: impl FnOnce() -> Result<D, Error>,
) -> Result<(), Served> {
    let device = make().map_err(Served::Setup)?;
    let (control, path) = connect(args).map_err(Served::Setup)?;
    let result = Backend::new(device, control)
        .map_err(|e| Served::Setup(Error::Runtime(e)))
        .and_then(|mut b| b.run().map_err(Served::Runtime));
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
    result
}

impl<A: Args> Cli<A> {
    fn command_for(program: &str) -> clap::Command {
        use clap::CommandFactory;
        Self::command().name(program.to_owned())
    }
}
