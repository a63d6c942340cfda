//! `outboard bench`: Outboard measured beside its baselines, in one run.
//!
//! Every figure is measured in this process tree in this run, next to the
//! baseline it is compared with; numbers are printed, never asserted.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use outboard::inprocess::InProcess;
use outboard_backends::scratch::{self, Scratch};
use outboard_frontend::kvm;
use outboard_frontend::{AccessSize, DeviceSpec, Frontend, Options};

use crate::AnyError;

mod fig_blk;
mod fig_kvm;
mod fig_linux;
mod fig_restart;
mod fig_ring;
mod fig_scale;

use fig_blk::blk_figures;
use fig_kvm::kvm_figures;
use fig_linux::linux_figures;
use fig_restart::restart_figures;
use fig_ring::ring_figures;
use fig_scale::scale_figures;

/// Sizes of one run.
pub(super) struct Plan {
    latency_iters: usize,
    posted_writes: u64,
    storm: u64,
    kvm_accesses: u32,
    blk_ops: usize,
    backends: usize,
    /// Repetitions of the Linux guest's tests (figure 9) and MiB per 1 MiB
    /// dd (a quarter of it for 4 KiB dd, half for 4 KiB AIO).
    linux_reps: u32,
    linux_mib: u32,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                latency_iters: 2_000,
                posted_writes: 200_000,
                storm: 20_000,
                kvm_accesses: 5_000,
                blk_ops: 1_000,
                backends: 64,
                linux_reps: 3,
                linux_mib: 32,
            }
        } else {
            Plan {
                latency_iters: 20_000,
                posted_writes: 1_000_000,
                storm: 100_000,
                kvm_accesses: 50_000,
                blk_ops: 10_000,
                backends: 64,
                linux_reps: 7,
                linux_mib: 64,
            }
        }
    }
}

/// One line of the table.
pub(super) struct Figure {
    id: &'static str,
    name: String,
    /// Median (latency, ns) or rate (per second).
    value: f64,
    unit: &'static str,
    p99: Option<f64>,
    baseline: Option<(String, f64)>,
    /// The ratio the table shows: value over baseline, or baseline over value.
    ratio: Option<f64>,
    target: Option<(String, bool)>,
}

pub(super) struct Report {
    figures: Vec<Figure>,
}

impl Report {
    fn add(&mut self, f: Figure) {
        let ratio = f.ratio.map(|r| format!("{r:.2}x")).unwrap_or_default();
        let target = f
            .target
            .as_ref()
            .map(|(t, met)| format!("{t}: {}", if *met { "met" } else { "NOT met" }))
            .unwrap_or_default();
        println!(
            "  {:<4} {:<58} {:>12} {:<6} {:>10} {:>8}  {}",
            f.id,
            f.name,
            fmt_num(f.value),
            f.unit,
            f.p99.map(fmt_num).unwrap_or_default(),
            ratio,
            target
        );
        self.figures.push(f);
    }

    fn json(&self, date: &str, quick: bool) -> String {
        let mut s =
            format!("{{\n  \"date\": \"{date}\",\n  \"quick\": {quick},\n  \"figures\": [\n");
        for (i, f) in self.figures.iter().enumerate() {
            let opt = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.3}"));
            s.push_str(&format!(
                "    {{\"id\": \"{}\", \"name\": \"{}\", \"value\": {:.3}, \"unit\": \"{}\", \"p99\": {}, \"baseline\": {}, \"ratio\": {}, \"target\": {}}}{}\n",
                f.id,
                f.name.replace('"', "'"),
                f.value,
                f.unit,
                opt(f.p99),
                f.baseline
                    .as_ref()
                    .map_or("null".to_owned(), |(n, v)| format!("{{\"name\": \"{}\", \"value\": {v:.3}}}", n.replace('"', "'"))),
                opt(f.ratio),
                f.target.as_ref().map_or("null".to_owned(), |(t, met)| format!(
                    "{{\"target\": \"{}\", \"met\": {met}}}",
                    t.replace('"', "'")
                )),
                if i + 1 < self.figures.len() { "," } else { "" }
            ));
        }
        s.push_str("  ]\n}\n");
        s
    }
}

pub(super) fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Median and 99th percentile of nanosecond samples.
/// The median of `v` (0 when empty).
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(super) fn stats(mut ns: Vec<u64>) -> (f64, f64) {
    if ns.is_empty() {
        return (0.0, 0.0);
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64;
    (at(0.5), at(0.99))
}

pub(super) fn time_each(
    n: usize,
    mut f: impl FnMut() -> Result<(), AnyError>,
) -> Result<Vec<u64>, AnyError> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_nanos() as u64);
    }
    Ok(v)
}

/// The echo peer of the raw ping-pong: `outboard bench-echo PATH [--epoll]`.
/// With `epoll` it waits in epoll_wait before each read, as a backend's
/// event loop does; otherwise it blocks in read.
pub fn echo(path: &Path, use_epoll: bool) -> Result<(), AnyError> {
    let mut s = match path.to_str().and_then(|p| p.strip_prefix("fd:")) {
        Some(fd) => {
            let fd: i32 = fd.parse()?;
            // SAFETY: the fd was inherited for exactly this purpose and is
            // taken once, here.
            unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        }
        None => UnixStream::connect(path)?,
    };
    let mut buf = [0u8; 32];
    let ep = if use_epoll {
        let fd = epoll::create(true)?;
        epoll::ctl(
            fd,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            std::os::fd::AsRawFd::as_raw_fd(&s),
            epoll::Event::new(epoll::Events::EPOLLIN, 0),
        )?;
        Some(fd)
    } else {
        None
    };
    let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 1];
    loop {
        if let Some(fd) = ep {
            epoll::wait(fd, -1, &mut events)?;
        }
        match s.read_exact(&mut buf) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A child process killed when dropped.
pub(super) struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pins every thread of process `pid` to `cpu`.
pub(super) fn pin_process(pid: u32, cpu: usize) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
            pin_thread(tid, cpu);
        }
    }
}

/// Pins thread `tid` (0: the calling thread) to `cpu`.
pub(super) fn pin_thread(tid: i32, cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it and
    // sched_setaffinity reads exactly size_of::<cpu_set_t>() bytes of it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The CPUs the run is spread over: this process on the first, every peer
/// and backend on the second (when there is one), so every figure pays the
/// same cross-CPU wake-up its baseline pays.
///
/// Decided once, before anything is pinned: `available_parallelism` counts
/// the calling thread's allowed CPUs, which is one once this thread is
/// pinned (asking again afterwards put every backend on the frontend's CPU).
pub(super) fn cpus() -> (usize, usize) {
    static CPUS: std::sync::OnceLock<(usize, usize)> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        (0, if n > 1 { 1 } else { 0 })
    })
}

/// Pins every backend process of `fe` to the peers' CPU.
pub(super) fn pin_backends(fe: &Frontend) {
    for d in fe.devices() {
        if let Some(pid) = d.pid() {
            pin_process(pid, cpus().1);
        }
    }
}

pub(super) fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("outboard-bench-{}-{tag}", std::process::id()))
}

pub fn run(options: Options, quick: bool, json: Option<PathBuf>) -> Result<(), AnyError> {
    let plan = Plan::new(quick);
    let started = Instant::now();
    let date = String::from_utf8_lossy(
        &Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()?
            .stdout,
    )
    .trim()
    .to_owned();
    println!(
        "outboard bench{} ({date}); medians, p99 for latencies; ratios measured side by side",
        if quick { " --quick" } else { "" }
    );
    println!(
        "  {:<4} {:<58} {:>12} {:<6} {:>10} {:>8}  target",
        "fig", "what", "value", "unit", "p99", "ratio"
    );
    let mut r = Report {
        figures: Vec::new(),
    };
    let exe = std::env::current_exe()?;
    let (fe_cpu, peer_cpu) = cpus();
    pin_thread(0, fe_cpu);
    println!("  (this process pinned to CPU {fe_cpu}, every peer and backend to CPU {peer_cpu})");

    // (1) Raw ping-pong between two processes: the floor of a synchronous access.
    let sock = temp_path("echo.sock");
    let _ = std::fs::remove_file(&sock);
    // The peer inherits one end of a socketpair, as a spawned backend does.
    let (mut raw, theirs) = UnixStream::pair()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let mut cmd = Command::new(&exe);
    cmd.arg("bench-echo")
        .arg(format!("fd:{fd}"))
        .stdin(Stdio::null());
    // SAFETY: between fork and exec only fcntl on an integer fd runs.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _peer = Reaped(cmd.spawn()?);
    drop(theirs);
    let listener = UnixListener::bind(&sock)?;
    pin_process(_peer.0.id(), peer_cpu);
    let _peer_ep = Reaped(
        Command::new(&exe)
            .arg("bench-echo")
            .arg(&sock)
            .arg("--epoll")
            .stdin(Stdio::null())
            .spawn()?,
    );
    let (mut raw_ep, _) = listener.accept()?;
    pin_process(_peer_ep.0.id(), peer_cpu);
    let _ = std::fs::remove_file(&sock);
    // (2) Synchronous MMIO round trips through the Bus to outboard-scratch
    // on data sockets, sampled interleaved with (1) so both see the same
    // machine state. The command ring has figures of its own (fig_ring.rs).
    let mut fe = Frontend::new(options.clone());
    let base = fe
        .attach(&DeviceSpec::spawn("scratch", "outboard-scratch", &[]).cmd_ring(0))?
        .placed(0)
        .ok_or("scratch not placed")?
        .addr;
    let mut sync_spec = DeviceSpec::spawn("scratch-sync", "outboard-scratch", &[]).cmd_ring(0);
    sync_spec.posted_writes = false;
    let sync_base = fe
        .attach(&sync_spec)?
        .placed(0)
        .ok_or("scratch not placed")?
        .addr;
    // The same backend unconfined (--no-sandbox): what confinement costs.
    let open_base = fe
        .attach(
            &DeviceSpec::spawn("scratch-open", "outboard-scratch", &[])
                .without_sandbox()
                .cmd_ring(0),
        )?
        .placed(0)
        .ok_or("scratch not placed")?
        .addr;
    pin_backends(&fe);
    let mmio = fe.mmio().clone();
    let mut buf = [0u8; 32];
    let (mut raw_ns, mut read_ns, mut write_ns) = (Vec::new(), Vec::new(), Vec::new());
    let (mut raw_ep_ns, mut open_ns) = (Vec::new(), Vec::new());
    for _ in 0..plan.latency_iters {
        let t = Instant::now();
        raw.write_all(&buf)?;
        raw.read_exact(&mut buf)?;
        raw_ns.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        raw_ep.write_all(&buf)?;
        raw_ep.read_exact(&mut buf)?;
        raw_ep_ns.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        mmio.try_read(base + scratch::REG_ID, AccessSize::B4)?;
        read_ns.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        mmio.try_write(sync_base + scratch::BANK, AccessSize::B4, 1)?;
        write_ns.push(t.elapsed().as_nanos() as u64);
    }
    // 2s: confined and unconfined reads back to back, which one goes first
    // alternating, so that neither pays for a neighbour's wake-up.
    let mut confined_ns = Vec::new();
    for i in 0..plan.latency_iters {
        for at in if i % 2 == 0 {
            [base, open_base]
        } else {
            [open_base, base]
        } {
            let t = Instant::now();
            mmio.try_read(at + scratch::REG_ID, AccessSize::B4)?;
            let ns = t.elapsed().as_nanos() as u64;
            if at == base {
                confined_ns.push(ns);
            } else {
                open_ns.push(ns);
            }
        }
    }
    let (raw_med, raw_p99) = stats(raw_ns);
    r.add(Figure {
        id: "1",
        name: "raw 32-byte ping-pong over a socketpair, two processes".into(),
        value: raw_med,
        unit: "ns",
        p99: Some(raw_p99),
        baseline: None,
        ratio: None,
        target: None,
    });
    let (raw_ep_med, raw_ep_p99) = stats(raw_ep_ns);
    r.add(Figure {
        id: "1e",
        name: "raw ping-pong, peer waits in epoll_wait (as a backend does)".into(),
        value: raw_ep_med,
        unit: "ns",
        p99: Some(raw_ep_p99),
        baseline: Some(("raw ping-pong (1)".into(), raw_med)),
        ratio: Some(raw_ep_med / raw_med),
        target: None,
    });
    let (read_med, read_p99) = stats(read_ns);
    r.add(Figure {
        id: "2r",
        name: "MMIO read round trip, Bus -> outboard-scratch, data socket".into(),
        value: read_med,
        unit: "ns",
        p99: Some(read_p99),
        baseline: Some(("raw ping-pong (1)".into(), raw_med)),
        ratio: Some(read_med / raw_med),
        target: Some(("<= 1.15x raw".into(), read_med <= 1.15 * raw_med)),
    });
    let (open_med, _) = stats(open_ns);
    let (confined_med, confined_p99) = stats(confined_ns);
    r.add(Figure {
        id: "2s",
        name: "socket read round trip, confined vs --no-sandbox, alternating".into(),
        value: confined_med,
        unit: "ns",
        p99: Some(confined_p99),
        baseline: Some(("the same, --no-sandbox".into(), open_med)),
        ratio: Some(confined_med / open_med),
        target: Some(("within 5%".into(), confined_med <= 1.05 * open_med)),
    });
    let (write_med, write_p99) = stats(write_ns);
    r.add(Figure {
        id: "2w",
        name: "MMIO write round trip (not posted), data socket".into(),
        value: write_med,
        unit: "ns",
        p99: Some(write_p99),
        baseline: Some(("raw ping-pong (1)".into(), raw_med)),
        ratio: Some(write_med / raw_med),
        target: None,
    });

    // (3) Posted writes ended by a read barrier, against synchronous writes;
    // rounds alternate between the confined and the unconfined backend.
    let posted = |at: u64| -> Result<f64, AnyError> {
        let t = Instant::now();
        for v in 0..plan.posted_writes {
            mmio.try_write(at + scratch::REG_ACCUM, AccessSize::B4, v & 1)?;
        }
        mmio.try_read(at + scratch::REG_ACCUM, AccessSize::B8)?;
        Ok(plan.posted_writes as f64 / t.elapsed().as_secs_f64())
    };
    let (mut confined, mut open) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        confined.push(posted(base)?);
        open.push(posted(open_base)?);
    }
    let (posted_rate, open_rate) = (median(confined), median(open));
    let sync_rate = 1e9 / write_med;
    r.add(Figure {
        id: "3",
        name: format!(
            "posted writes on the socket, {} then a read barrier",
            plan.posted_writes
        ),
        value: posted_rate,
        unit: "/s",
        p99: None,
        baseline: Some(("synchronous writes (2w)".into(), sync_rate)),
        ratio: Some(posted_rate / sync_rate),
        target: Some((">= 5x synchronous".into(), posted_rate >= 5.0 * sync_rate)),
    });
    r.add(Figure {
        id: "3s",
        name: "socket posted writes, confined (3) vs --no-sandbox".into(),
        value: posted_rate,
        unit: "/s",
        p99: None,
        baseline: Some(("the same, --no-sandbox".into(), open_rate)),
        ratio: Some(posted_rate / open_rate),
        target: Some(("within 5%".into(), posted_rate >= 0.95 * open_rate)),
    });

    // (4) Doorbells: ring-to-handled latency, and coalescing under a storm.
    fe.reset("scratch")?;
    let mut seen = 0u64;
    let bell_ns = time_each(plan.latency_iters.min(5_000), || {
        mmio.try_write(base + scratch::REG_DB0, AccessSize::B4, 1)?;
        seen += 1;
        while mmio.try_read(base + scratch::REG_DB0_COUNT, AccessSize::B8)? < seen {}
        Ok(())
    })?;
    let (bell_med, bell_p99) = stats(bell_ns);
    r.add(Figure {
        id: "4l",
        name: "doorbell -> backend handler -> observed by a read".into(),
        value: bell_med,
        unit: "ns",
        p99: Some(bell_p99),
        baseline: Some(("MMIO read (2r)".into(), read_med)),
        ratio: Some(bell_med / read_med),
        target: None,
    });
    fe.reset("scratch")?;
    for _ in 0..plan.storm {
        mmio.try_write(base + scratch::REG_DB0, AccessSize::B4, 1)?;
    }
    while mmio.try_read(base + scratch::REG_DB0_COUNT, AccessSize::B8)? < plan.storm {}
    let wakeups = mmio
        .try_read(base + scratch::REG_DB0_WAKEUPS, AccessSize::B8)?
        .max(1);
    r.add(Figure {
        id: "4c",
        name: format!(
            "doorbell coalescing: {} rings / backend wake-ups",
            plan.storm
        ),
        value: plan.storm as f64 / wakeups as f64,
        unit: "x",
        p99: None,
        baseline: None,
        ratio: None,
        target: None,
    });

    // (5) The command ring beside the socket and beside a device in process.
    let inproc = InProcess::new(Scratch::default())?;
    let local = inproc.region(0).ok_or("scratch has no region 0")?;
    let socket = fig_ring::SocketPath {
        base,
        read_ns: read_med,
    };
    ring_figures(&mut r, &plan, &mut fe, &socket, Arc::clone(&local))?;

    // (6) KVM: guest MMIO reads to an in-frontend device vs an Outboard backend.
    match kvm::available() {
        Ok(()) => kvm_figures(&mut r, &plan, options.clone(), local)?,
        Err(e) => println!("  (6)  skipped: {}", outboard_frontend::error_chain(&e)),
    }

    // (7) virtio-blk 4 KiB random I/O at QD 1 and 16.
    blk_figures(&mut r, &plan, options.clone())?;

    // (10) Replacing a backend under load: live upgrade and restart.
    restart_figures(&mut r, &plan, options.clone())?;

    // (8) Footprint and scale.
    scale_figures(&mut r, &plan, options.clone())?;

    // (9) A Linux guest's dd and AIO on outboard-virtio-blk and qsd (QEMU, TCG).
    linux_figures(&mut r, &plan, &options)?;

    fe.shutdown();
    println!(
        "bench: finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(p) = json {
        std::fs::write(&p, r.json(&date, quick))?;
        println!("bench: wrote {}", p.display());
    }
    Ok(())
}
