//! Helpers shared by Outboard's cross-process integration tests: finding the
//! built binaries, starting backends, and speaking the raw control protocol
//! the way a (possibly misbehaving) frontend would.

#![deny(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use outboard_frontend::backend::{Launcher, Source};
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{DeviceSpec, Frontend, Options};
use outboard_protocol::channel::{Channel, Message};
use outboard_protocol::control::{
    Header, Hello, Payload, Request, StatusReply, FEATURES_SUPPORTED,
};
use outboard_testkit::guest::{blk, BlkClient, DriverOptions, GuestAllocator, VirtioMmioDriver};

/// Generous upper bound for anything a test waits on; hitting it means a hang.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

/// Directory holding the workspace's binaries (the parent of `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("exe dir");
    deps.parent().expect("target profile dir").to_path_buf()
}

/// Path of a workspace binary, which `cargo test --workspace` builds.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build --workspace --bins`)",
        p.display()
    );
    p
}

/// A frontend that finds backends in the build directory, with `timeout` for replies.
pub fn frontend(timeout: Duration) -> Frontend {
    let mut launcher = Launcher::beside_current_exe();
    launcher.search_dirs.insert(0, bin_dir());
    launcher.quiet_stdout = true;
    Frontend::new(Options {
        timeout,
        launcher,
        ..Options::default()
    })
}

/// A fresh, unused socket path.
pub fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!("outboard-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(format!("{tag}-{}.sock", N.fetch_add(1, Ordering::Relaxed)))
}

/// Starts `name` listening on a fresh socket path, stderr captured.
pub fn spawn_listening(name: &str, args: &[&str]) -> (Child, PathBuf) {
    let path = socket_path(name);
    let child = Command::new(bin(name))
        .arg("--socket")
        .arg(&path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backend");
    (child, path)
}

/// Connects to a listening backend, retrying while it starts.
pub fn connect(path: &Path) -> Channel {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => {
                let mut ch = Channel::new(s);
                ch.set_timeout(Some(HANG_GUARD)).expect("timeout");
                return ch;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

/// Connects a plain stream to `path`, retrying while the listener starts.
pub fn connect_stream(path: &Path) -> std::os::unix::net::UnixStream {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    }
}

/// Sends a request with NEED_REPLY and returns the reply.
pub fn call(ch: &Channel, request: Request, payload: &[u8], fds: &[RawFd]) -> Message {
    ch.send(Header::request(request, payload.len(), true), payload, fds)
        .expect("send");
    ch.recv().expect("reply")
}

/// The status of an error reply, or `None` for a success reply.
pub fn error_status(m: &Message) -> Option<outboard_protocol::control::Status> {
    assert!(m.header.is_reply(), "not a reply: {:?}", m.header);
    if m.header.is_error() {
        Some(
            StatusReply::decode(&m.payload)
                .expect("status payload")
                .status,
        )
    } else {
        None
    }
}

/// Negotiates like a well-behaved frontend.
pub fn hello(ch: &Channel) {
    let m = call(
        ch,
        Request::Hello,
        &Hello::ours(FEATURES_SUPPORTED).encode(),
        &[],
    );
    assert_eq!(error_status(&m), None, "hello refused");
}

/// Waits for a child to exit (panics after [`HANG_GUARD`]).
pub fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "child {} did not exit",
            child.id()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Everything the child wrote on stderr (after it exited).
pub fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Guest RAM of a [`Guest`].
pub const GUEST_RAM: u64 = 32 << 20;

/// A test guest: a frontend with [`GUEST_RAM`] bytes of RAM at 0 and an
/// allocator over it for rings and buffers.
#[derive(Debug)]
pub struct Guest {
    /// The frontend.
    pub fe: Frontend,
    /// Allocates guest memory (from 0x1000).
    pub alloc: GuestAllocator,
}

/// A [`Guest`] whose frontend waits `timeout` for backends.
pub fn guest(timeout: Duration) -> Guest {
    let mut fe = frontend(timeout);
    fe.set_memory(GuestRam::new(&[(0, GUEST_RAM)]).expect("guest RAM"))
        .expect("memory table");
    Guest {
        fe,
        alloc: GuestAllocator::new(0x1000, GUEST_RAM - 0x1000),
    }
}

impl Guest {
    /// Spawns `program` as device `name`.
    pub fn attach(&mut self, name: &str, program: &str, args: &[&str]) {
        self.fe
            .attach(&DeviceSpec::spawn(name, program, args))
            .expect("attach");
    }

    /// Attaches the vhost-user backend at `socket` as virtio `device` (blk, rng, console).
    pub fn attach_vhost(&mut self, name: &str, socket: &Path, device: &str) {
        let spec = DeviceSpec {
            source: Source::VhostUser {
                socket: socket.to_path_buf(),
                device: device.to_owned(),
            },
            ..DeviceSpec::connect(name, socket)
        };
        self.fe.attach(&spec).expect("attach vhost-user");
    }

    /// Initializes device `name` with the test driver, asking for `wanted` features.
    pub fn driver(&mut self, name: &str, wanted: u64) -> VirtioMmioDriver {
        self.driver_with(name, DriverOptions::new(wanted, 256))
    }

    /// Initializes device `name` with the test driver and `opts`.
    pub fn driver_with(&mut self, name: &str, opts: DriverOptions) -> VirtioMmioDriver {
        let d = self.fe.device(name).expect("device");
        VirtioMmioDriver::init(
            self.fe.mmio().clone(),
            d.placed(0).expect("placed").addr,
            self.fe.memory().expect("RAM").clone(),
            d.irq(0).expect("interrupt line").clone(),
            &mut self.alloc,
            opts,
        )
        .expect("driver init")
    }
}

/// A zero-filled disk image of `sectors` 512-byte sectors in the temporary directory.
pub fn temp_image(tag: &str, sectors: u64) -> PathBuf {
    let p = std::env::temp_dir().join(format!("outboard-{tag}-{}.img", std::process::id()));
    std::fs::File::create(&p)
        .expect("create image")
        .set_len(sectors * 512)
        .expect("size image");
    p
}

/// A small deterministic generator (xorshift), so failures reproduce.
#[derive(Debug)]
pub struct Rand(pub u64);

impl Rand {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// 1,000 random 4 KiB reads and writes through `c`, every read checked
/// against a model of the image, then a flush and the whole image file
/// compared with the model. Returns (reads, writes).
pub fn random_io(c: &mut BlkClient, image: &Path, sectors: u64, seed: u64) -> (u32, u32) {
    let mut model = std::fs::read(image).expect("read image");
    let mut r = Rand(seed);
    let (mut reads, mut writes) = (0, 0);
    for _ in 0..1000 {
        let sector = (r.next_u64() % (sectors / 8)) * 8;
        let at = (sector * 512) as usize;
        if r.next_u64().is_multiple_of(2) {
            let data: Vec<u8> = (0..4096).map(|_| r.next_u64() as u8).collect();
            assert_eq!(c.write(sector, &data).expect("write"), blk::S_OK);
            model[at..at + 4096].copy_from_slice(&data);
            writes += 1;
        } else {
            let mut buf = vec![0u8; 4096];
            assert_eq!(c.read(sector, &mut buf).expect("read"), blk::S_OK);
            assert!(buf == model[at..at + 4096], "read at sector {sector}");
            reads += 1;
        }
    }
    assert_eq!(c.flush().expect("flush"), blk::S_OK);
    assert!(
        std::fs::read(image).expect("read image") == model,
        "backing file matches the model"
    );
    (reads, writes)
}

/// A child process killed when the test ends.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts Outboard's `program` as a vhost-user backend on a fresh socket.
pub fn outboard_vhost_user(program: &str, args: &[&str]) -> (Reaped, PathBuf) {
    let sock = socket_path(program);
    let child = Command::new(bin(program))
        .arg("--vhost-user")
        .arg(&sock)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    (Reaped(child), sock)
}

/// Waits until the file at `path` contains `text` (panics after
/// [`HANG_GUARD`]); returns the file's contents.
pub fn wait_for_text(path: &Path, text: &str) -> String {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let got = std::fs::read_to_string(path).unwrap_or_default();
        if got.contains(text) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} never said {text:?}; it holds: {got}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts Outboard's `program` as a vhost-user backend on a fresh socket,
/// its stderr going to a file; returns the process, the socket and the file.
pub fn outboard_vhost_user_logged(program: &str, args: &[&str]) -> (Reaped, PathBuf, PathBuf) {
    let sock = socket_path(program);
    let log = sock.with_extension("stderr");
    let child = Command::new(bin(program))
        .arg("--vhost-user")
        .arg(&sock)
        .args(args)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (Reaped(child), sock, log)
}
