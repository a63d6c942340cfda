//! Shared-memory command rings (docs/protocol.md section 7.11) across real
//! backend processes: ordering, idle cost, a backend killed mid-spin,
//! hostile indices and the fallback to data sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use outboard_backends::scratch::{self, ID};
use outboard_frontend::{AccessSize, DeviceSpec};
use outboard_tests::frontend;

const T: Duration = Duration::from_secs(10);

/// Clock ticks a process has run (user + system), from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit(')').next().unwrap();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn ring_when_idle_for_a_second_after_a_burst_then_backend_uses_under_one_percent_cpu() {
    let mut fe = frontend(T);
    let d = fe
        .attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]))
        .unwrap();
    let base = d.placed(0).unwrap().addr;
    let pid = d.pid().unwrap();
    let mmio = fe.mmio().clone();
    for v in 0..20_000u64 {
        mmio.try_write(base + scratch::REG_ACCUM, AccessSize::B4, v & 1)
            .unwrap();
        assert_eq!(
            mmio.try_read(base, AccessSize::B4).unwrap(),
            ID & 0xffff_ffff
        );
    }
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    std::thread::sleep(Duration::from_millis(100));
    let before = cpu_ticks(pid);
    let t = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let used = (cpu_ticks(pid) - before) as f64 / hz;
    let share = used / t.elapsed().as_secs_f64();
    eprintln!("idle backend: {:.2}% of a CPU", share * 100.0);
    assert!(
        share < 0.01,
        "idle backend used {:.1}% of a CPU",
        share * 100.0
    );
}

#[test]
#[ignore]
fn explore_latency() {
    let mut fe = frontend(T);
    let a = fe
        .attach(&DeviceSpec::spawn(
            "ring",
            "outboard-scratch",
            &["--log-level", "info"],
        ))
        .unwrap()
        .placed(0)
        .unwrap()
        .addr;
    let b = fe
        .attach(&DeviceSpec::spawn("sock", "outboard-scratch", &[]).cmd_ring(0))
        .unwrap()
        .placed(0)
        .unwrap()
        .addr;
    let pin = std::env::var("PIN").is_ok();
    if pin {
        for d in fe.devices() {
            let pid = d.pid().unwrap();
            std::process::Command::new("taskset")
                .args(["-p", "2", &pid.to_string()])
                .output()
                .unwrap();
        }
        std::process::Command::new("taskset")
            .args(["-p", "1", &std::process::id().to_string()])
            .output()
            .unwrap();
    }
    let mmio = fe.mmio().clone();
    for round in 0..3 {
        let mut ra = Vec::new();
        let mut rb = Vec::new();
        for _ in 0..20000 {
            let t = std::time::Instant::now();
            mmio.try_read(a, AccessSize::B4).unwrap();
            ra.push(t.elapsed().as_nanos());
        }
        std::thread::sleep(Duration::from_millis(5));
        for _ in 0..20000 {
            let t = std::time::Instant::now();
            mmio.try_read(b, AccessSize::B4).unwrap();
            rb.push(t.elapsed().as_nanos());
        }
        ra.sort();
        rb.sort();
        eprintln!(
            "round {round}: ring median {} p99 {}, socket median {} p99 {}",
            ra[10000], ra[19800], rb[10000], rb[19800]
        );
    }
}
