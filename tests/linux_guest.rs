//! A real Linux guest: Debian's unmodified kernel under QEMU (TCG) with
//! QEMU's default vhost-user device settings drives Outboard's backends with
//! Linux's own virtio_blk and virtio_rng drivers; qemu-storage-daemon is the
//! reference in the same boot. The guest's `/init` (frontend/testkit/linux-guest)
//! runs the checks and prints one line per verdict; the host then compares
//! every byte of every image with what the guest says it wrote.
//!
//! In the two-vCPU boot the host also SIGKILLs the backend of `ob` while
//! the guest keeps direct I/O going on it from every vCPU, and starts it
//! again on the same socket (QEMU reconnects: `reconnect-ms`); the guest
//! must see no I/O error and read back what it wrote, and the image must
//! hold it (the guest's `survive` check).
//!
//! Where QEMU, qemu-storage-daemon, apt (for the kernel and busybox
//! packages) or gcc are missing each test prints `skipped: ...`; with
//! `OUTBOARD_REQUIRE_TOOLS=1` (as `.ci/run` sets) it fails instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use outboard_protocol::error_chain;
use outboard_testkit::linux::qemu::{qsd_blk_command, slot, wait_for_socket, Reaped};
use outboard_testkit::linux::report::{fill_image, verify_image};
use outboard_testkit::linux::{self, Error, Guest, Machine, Qemu, Run, VhostDevice};
use outboard_tests::bin;

/// Size of every disk image.
const IMAGE: u64 = 128 << 20;
/// QEMU is killed when a boot takes longer (a normal one takes well under a minute).
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
/// Seconds one guest check may take before the guest reports it as hung.
const CHECK_TIMEOUT: u32 = 60;
/// Backend sockets must be listening, and backends must have exited, within this.
const T: Duration = Duration::from_secs(15);

/// Checks every read-write block device must pass.
const RW_CHECKS: &[&str] = &[
    "probe",
    "queues",
    "direct-io",
    "buffered-io",
    "concurrent-io",
    "discard",
    "write-zeroes",
    "rebind",
];
/// Checks every read-only block device must pass.
const RO_CHECKS: &[&str] = &["probe", "queues", "ro-flag", "ro-read", "ro-write-rejected"];
/// Checks every entropy device must pass.
const RNG_CHECKS: &[&str] = &["rng-current", "rng-data"];
/// Where the host writes zeros once it has restarted a backend (the guest
/// polls it); outside every region the checks use.
const FLAG: u64 = 100 << 20;
/// QEMU reconnects a vhost-user device this long after its backend left.
const RECONNECT_MS: u32 = 100;

/// One boot at a time: two TCG guests on two cores would only slow each other.
static BOOTS: Mutex<()> = Mutex::new(());

/// QEMU and the prepared guest, or None (after printing why) to skip.
fn tools_or_skip() -> Option<(Qemu, Guest)> {
    let found = (|| -> Result<(Qemu, Guest), Error> {
        let qemu = Qemu::find()?;
        let qsd = Command::new("qemu-storage-daemon")
            .arg("--version")
            .stdout(Stdio::null())
            .status();
        if !qsd.is_ok_and(|s| s.success()) {
            return Err(Error::Unavailable(
                "qemu-storage-daemon is missing (Debian qemu-utils)".into(),
            ));
        }
        Ok((qemu, linux::prepare()?))
    })();
    match found {
        Ok((qemu, guest)) => {
            println!(
                "{}; guest kernel {} ({}), {}; initramfs {} {}",
                qemu.version_line,
                guest.kernel_package,
                guest.release,
                guest.busybox_package,
                guest.initramfs.display(),
                if guest.built {
                    "built"
                } else {
                    "from the cache"
                }
            );
            Some((qemu, guest))
        }
        Err(Error::Unavailable(why)) => {
            assert!(
                std::env::var_os("OUTBOARD_REQUIRE_TOOLS").is_none(),
                "the Linux guest test needs {why} (.ci/linux-guest-deps installs QEMU)"
            );
            println!("skipped: {why}");
            None
        }
        Err(e) => panic!("preparing the Linux guest failed: {}", error_chain(&e)),
    }
}

/// What backs one guest device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// outboard-virtio-blk, with `--num-queues N` when given (default 16).
    Ours { queues: Option<u32> },
    /// outboard-virtio-blk --read-only.
    OursReadOnly,
    /// qemu-storage-daemon's vhost-user-blk export with N queues.
    Qsd { queues: u32 },
    /// outboard-virtio-rng.
    Rng,
}

/// A running backend and what the host knows about it.
struct Device {
    name: &'static str,
    kind: Kind,
    socket: PathBuf,
    image: Option<PathBuf>,
    background: u64,
    stderr: PathBuf,
    process: Reaped,
    /// The host kills and restarts this backend during the survive check.
    restart: bool,
}

/// The command that starts a backend of `kind` on `socket`.
fn command(kind: Kind, socket: &Path, image: Option<&Path>) -> Command {
    match (kind, image) {
        (Kind::Qsd { queues }, Some(img)) => qsd_blk_command(img, socket, queues, true),
        (Kind::Rng, _) => {
            let mut c = Command::new(bin("outboard-virtio-rng"));
            c.arg("--vhost-user").arg(socket);
            c
        }
        (_, Some(img)) => {
            let mut c = Command::new(bin("outboard-virtio-blk"));
            c.arg("--vhost-user").arg(socket).arg("--path").arg(img);
            // Sessions and what a restarted backend resubmits, in the log.
            c.arg("--log-level").arg("info");
            if kind == Kind::OursReadOnly {
                c.arg("--read-only");
            }
            if let Kind::Ours { queues: Some(n) } = kind {
                c.arg("--num-queues").arg(n.to_string());
            }
            c
        }
        (_, None) => unreachable!("block devices have images"),
    }
}

/// Starts a backend and waits until it listens.
fn spawn(kind: Kind, socket: &Path, image: Option<&Path>, stderr: &Path) -> Reaped {
    let child = command(kind, socket, image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", socket.display()));
    let process = Reaped(child);
    wait_for_socket(socket, T)
        .unwrap_or_else(|e| panic!("{}: {}", socket.display(), error_chain(&e)));
    process
}

fn start(dir: &Path, name: &'static str, kind: Kind, background: u64, restart: bool) -> Device {
    let socket = dir.join(format!("{name}.sock"));
    let stderr = dir.join(format!("{name}.stderr"));
    let image = (kind != Kind::Rng).then(|| dir.join(format!("{name}.img")));
    if let Some(img) = &image {
        fill_image(img, IMAGE, background).unwrap();
    }
    let process = spawn(kind, &socket, image.as_deref(), &stderr);
    Device {
        name,
        kind,
        socket,
        image,
        background,
        stderr,
        process,
        restart,
    }
}

/// What the host did when the guest asked for a restart.
struct Restarted {
    old_pid: u32,
    new: Reaped,
    stderr: PathBuf,
}

/// Waits for the guest's `OUTBOARD-RESTART name` on the serial console,
/// then SIGKILLs the backend (pid `old_pid`), starts the same command again
/// on the same socket and, once it listens, writes the flag the guest
/// waits for. Gives up when `done` is set (QEMU has exited).
fn restart_when_asked(
    serial: &Path,
    d: (&'static str, Kind, PathBuf, PathBuf, PathBuf),
    old_pid: u32,
    done: &AtomicBool,
) -> Result<Restarted, String> {
    let (name, kind, socket, image, stderr) = d;
    let marker = format!("OUTBOARD-RESTART {name}");
    while !std::fs::read_to_string(serial)
        .unwrap_or_default()
        .contains(&marker)
    {
        if done.load(Ordering::SeqCst) {
            return Err(format!("{name}: the guest never asked for the restart"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = libc::pid_t::try_from(old_pid).map_err(|e| e.to_string())?;
    // SAFETY: kill() with a pid this test spawned (not yet reaped) and a signal.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(format!(
            "kill {old_pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let deadline = Instant::now() + T;
    while outboard_tests::alive(old_pid) {
        if Instant::now() >= deadline {
            return Err(format!("{name}: pid {old_pid} survived SIGKILL"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let new = spawn(kind, &socket, Some(&image), &stderr);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .map_err(|e| e.to_string())?;
    f.write_all_at(&[0u8; 512], FLAG)
        .map_err(|e| e.to_string())?;
    Ok(Restarted {
        old_pid,
        new,
        stderr,
    })
}

/// One boot: the devices, the guest's verdicts and the host's.
struct Boot {
    smp: u32,
    devices: Vec<Device>,
}

impl Boot {
    /// The devices of `kinds` with their backends started; the backend of
    /// the block device named `restart` is killed and restarted during the
    /// run.
    fn new(
        tag: &str,
        smp: u32,
        kinds: &[(&'static str, Kind)],
        restart: Option<&str>,
    ) -> (Boot, PathBuf, u64) {
        let dir = std::env::temp_dir().join(format!("outboard-linux-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let seed = std::env::var("OUTBOARD_LINUX_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64 % 1_000_000_007)
                    .unwrap_or(1)
                    + 1
            });
        let devices = kinds
            .iter()
            .enumerate()
            .map(|(i, &(name, kind))| {
                start(
                    &dir,
                    name,
                    kind,
                    seed * 31 + i as u64 + 1,
                    restart == Some(name),
                )
            })
            .collect();
        (Boot { smp, devices }, dir, seed)
    }

    /// Queues the guest must see on a block device: QEMU's default is one
    /// per vCPU, which the backend must be able to serve.
    fn expected_queues(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Qsd { queues }
            | Kind::Ours {
                queues: Some(queues),
            } => queues.min(self.smp),
            _ => self.smp,
        }
    }

    fn machine(&self, dir: &Path, seed: u64) -> Machine {
        let mut blk = Vec::new();
        let mut rng = Vec::new();
        for (i, d) in self.devices.iter().enumerate() {
            match d.kind {
                Kind::Rng => rng.push(format!("{}:{}", d.name, slot(i))),
                Kind::OursReadOnly => blk.push(format!(
                    "{}:{}:ro:{}:{}",
                    d.name,
                    slot(i),
                    self.expected_queues(d.kind),
                    d.background
                )),
                _ => blk.push(format!(
                    "{}:{}:rw:{}:{}",
                    d.name,
                    slot(i),
                    self.expected_queues(d.kind),
                    d.background
                )),
            }
        }
        let mut append = vec![
            "ob_mode=check".into(),
            format!("ob_blk={}", blk.join("/")),
            format!("ob_rng={}", rng.join("/")),
            format!("ob_seed={seed}"),
            format!("ob_timeout={CHECK_TIMEOUT}"),
        ];
        let restart = self.devices.iter().find(|d| d.restart);
        if let Some(d) = restart {
            append.push(format!("ob_restart={}:{FLAG}", d.name));
        }
        Machine {
            smp: self.smp,
            memory_mib: 256,
            devices: self
                .devices
                .iter()
                .map(|d| match d.kind {
                    Kind::Rng => VhostDevice::Rng(d.socket.clone()),
                    _ => VhostDevice::Blk(d.socket.clone()),
                })
                .collect(),
            append,
            deadline: BOOT_DEADLINE,
            work_dir: dir.to_path_buf(),
            reconnect_ms: restart.map(|_| RECONNECT_MS),
        }
    }

    /// Boots the guest and returns every failure the guest or the host found.
    fn run(mut self, qemu: &Qemu, guest: &Guest, dir: &Path, seed: u64) -> (Run, Vec<String>) {
        let machine = self.machine(dir, seed);
        println!("seed {seed} (OUTBOARD_LINUX_SEED={seed} repeats this run)");
        println!("{}", machine.command_line(qemu, guest));
        let done = Arc::new(AtomicBool::new(false));
        let watcher = self.devices.iter().find(|d| d.restart).map(|d| {
            let serial = dir.join("serial.log");
            let what = (
                d.name,
                d.kind,
                d.socket.clone(),
                d.image.clone().unwrap_or_default(),
                dir.join(format!("{}.2.stderr", d.name)),
            );
            let (pid, done) = (d.process.0.id(), Arc::clone(&done));
            std::thread::spawn(move || restart_when_asked(&serial, what, pid, &done))
        });
        let run = machine.run(qemu, guest).unwrap();
        done.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        if let Some(w) = watcher {
            match w.join().unwrap() {
                Ok(r) => {
                    if let Some(d) = self.devices.iter_mut().find(|d| d.restart) {
                        println!(
                            "{}: backend pid {} SIGKILLed and started again as pid {} on the same socket",
                            d.name,
                            r.old_pid,
                            r.new.0.id()
                        );
                        // The killed one is reaped as the old handle drops.
                        d.process = r.new;
                        d.stderr = r.stderr;
                    }
                }
                Err(e) => failures.push(e),
            }
        }
        if run.timed_out {
            failures.push(format!(
                "the guest did not power off within {BOOT_DEADLINE:?}"
            ));
        } else if run.status.as_deref() != Some("exit status: 0") {
            failures.push(format!("QEMU ended with {:?}", run.status));
        }
        if !run.done() {
            failures.push("the guest's /init did not reach its end".into());
        }
        for c in run.checks().iter().filter(|c| c.device == "guest") {
            failures.push(format!("guest: {} {}", c.name, c.detail));
        }
        for d in &mut self.devices {
            check_device(&run, d, &mut failures);
        }
        print_summary(&run, &self.devices);
        if !run.stderr.trim().is_empty() {
            println!("QEMU stderr:\n{}", run.stderr.trim_end());
        }
        (run, failures)
    }
}

/// The guest's verdicts on `d`, the image, and the backend's exit.
fn check_device(run: &Run, d: &mut Device, failures: &mut Vec<String>) {
    let wanted = match d.kind {
        Kind::Rng => RNG_CHECKS,
        Kind::OursReadOnly => RO_CHECKS,
        _ => RW_CHECKS,
    };
    let survive = d.restart.then_some("survive");
    for name in wanted.iter().copied().chain(survive) {
        match run.check(d.name, name) {
            Some(c) if c.passed => {}
            Some(c) => failures.push(format!("{} {name}: {}", d.name, c.detail)),
            None => failures.push(format!("{} {name}: not reported", d.name)),
        }
    }
    if let Some(img) = &d.image {
        let expects = run.expectations(d.name);
        if d.kind != Kind::OursReadOnly && run.done() && expects.is_empty() {
            failures.push(format!("{}: the guest reported no written ranges", d.name));
        }
        match verify_image(img, IMAGE, d.background, &expects) {
            Ok(p) if p.is_empty() => {}
            Ok(p) => failures.push(format!("{} image on the host: {}", d.name, p.join("; "))),
            Err(e) => failures.push(format!("{} image: {}", d.name, error_chain(&e))),
        }
    }
    // Outboard's backends keep listening for the next frontend after QEMU
    // has gone (they are killed when the test ends).
    if !matches!(d.kind, Kind::Qsd { .. }) {
        if let Ok(Some(s)) = d.process.0.try_wait() {
            failures.push(format!(
                "{} backend exited with {s} instead of waiting for the next frontend",
                d.name
            ));
        }
    }
    let stderr = std::fs::read_to_string(&d.stderr).unwrap_or_default();
    if !stderr.trim().is_empty() {
        println!("{} stderr:\n{}", d.name, stderr.trim_end());
    }
}

fn print_summary(run: &Run, devices: &[Device]) {
    let mut s = format!(
        "boot took {:.1} s; QEMU {:?}\n",
        run.elapsed.as_secs_f64(),
        run.status
    );
    for d in devices {
        for c in run.checks().iter().filter(|c| c.device == d.name) {
            let _ = writeln!(
                s,
                "  {:<6} {:<18} {} {}",
                c.device,
                c.name,
                if c.passed { "PASS" } else { "FAIL" },
                c.detail
            );
        }
    }
    print!("{s}");
}

fn finish(run: &Run, failures: &[String], dir: &Path) {
    if failures.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    println!("---- serial console ----\n{}", run.serial);
    panic!(
        "{} failure(s) (files kept in {}):\n  {}",
        failures.len(),
        dir.display(),
        failures.join("\n  ")
    );
}

#[test]
fn linux_guest_when_two_vcpus_drive_outboard_and_qsd_blk_and_rng_and_ob_is_killed_mid_io_then_every_check_passes(
) {
    let Some((qemu, guest)) = tools_or_skip() else {
        return;
    };
    let _one = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let (boot, dir, seed) = Boot::new(
        "smp2",
        2,
        &[
            ("ob", Kind::Ours { queues: None }),
            ("obro", Kind::OursReadOnly),
            ("qsd", Kind::Qsd { queues: 2 }),
            ("rng", Kind::Rng),
        ],
        Some("ob"),
    );
    let (run, failures) = boot.run(&qemu, &guest, &dir, seed);
    finish(&run, &failures, &dir);
}

#[test]
fn linux_guest_when_one_vcpu_drives_single_queue_outboard_blk_then_every_check_passes() {
    let Some((qemu, guest)) = tools_or_skip() else {
        return;
    };
    let _one = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let (boot, dir, seed) = Boot::new(
        "smp1",
        1,
        &[
            ("ob1q", Kind::Ours { queues: Some(1) }),
            ("qsd1q", Kind::Qsd { queues: 1 }),
        ],
        None,
    );
    let (run, failures) = boot.run(&qemu, &guest, &dir, seed);
    finish(&run, &failures, &dir);
}
