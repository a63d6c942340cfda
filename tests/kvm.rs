//! Real guest code on KVM drives the backends: the same processes, the same
//! buses, with ioeventfd doorbells and irqfd interrupts in the kernel.
//!
//! Where /dev/kvm is not usable each test prints `skipped: /dev/kvm
//! unavailable` (and fails instead when `OUTBOARD_REQUIRE_KVM` is set, as
//! `.ci/run` does on machines that have KVM).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use outboard_frontend::kvm::{self, RunResult};
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{DeviceSpec, Frontend};
use outboard_testkit::loader::{programs, run_program};
use outboard_tests::frontend;

const T: Duration = Duration::from_secs(10);
const SCRATCH: u64 = 0xd000_0000;
const BLK: u64 = 0xd001_0000;
const RNG: u64 = 0xd002_0000;

fn kvm_or_skip() -> bool {
    match kvm::available() {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var_os("OUTBOARD_REQUIRE_KVM").is_none(),
                "KVM required but unusable: {e}"
            );
            println!("skipped: /dev/kvm unavailable ({e})");
            false
        }
    }
}

fn vm_frontend() -> Frontend {
    let mut fe = frontend(T);
    fe.set_memory(GuestRam::new(&[(0, 16 << 20)]).unwrap())
        .unwrap();
    fe
}

fn run(fe: &mut Frontend, vcpus: usize, program: &[u8], irqs: &[(&str, u32, u32)]) -> RunResult {
    run_program(fe, program, vcpus, irqs, Duration::from_secs(60)).unwrap()
}

fn uart(fe: &mut Frontend, tag: &str) -> std::path::PathBuf {
    let log = std::env::temp_dir().join(format!("outboard-kvm-{tag}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    fe.attach(&DeviceSpec::spawn(
        "com1",
        "outboard-uart",
        &["--output", log.to_str().unwrap()],
    ))
    .unwrap();
    log
}

fn scratch(fe: &mut Frontend) {
    fe.attach(&DeviceSpec::spawn("scratch", "outboard-scratch", &[]).place(0, SCRATCH))
        .unwrap();
}

#[test]
fn hello_when_run_on_kvm_then_greeting_reaches_the_uart_backend() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "hello");
    let r = run(&mut fe, 1, programs::HELLO, &[]);
    assert_eq!(r.exit_code, 0);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "Hello from a KVM guest, through the outboard-uart backend!\n"
    );
    assert!(r.stats.pio_exits() > 50);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn registers_when_run_on_kvm_then_every_size_and_10000_posted_writes_check_out() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "registers");
    scratch(&mut fe);
    let r = run(&mut fe, 1, programs::REGISTERS, &[]);
    assert_eq!(r.exit_code, 0, "guest exit code (see guests/registers.S)");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "registers: all sizes ok, 10000 posted writes arrived\n"
    );
    assert!(r.stats.mmio_exits() >= 10_000);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn virtio_when_guest_driver_runs_on_kvm_then_sectors_and_random_bytes_arrive() {
    if !kvm_or_skip() {
        return;
    }
    let image = std::env::temp_dir().join(format!("outboard-kvm-{}.img", std::process::id()));
    let mut data = vec![0u8; 1 << 20];
    data[..8].copy_from_slice(b"OUTBOARD");
    data[512..520].copy_from_slice(b"SECTOR-1");
    std::fs::write(&image, &data).unwrap();
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "virtio");
    fe.attach(
        &DeviceSpec::spawn(
            "blk",
            "outboard-virtio-blk",
            &["--path", image.to_str().unwrap()],
        )
        .place(0, BLK),
    )
    .unwrap();
    fe.attach(&DeviceSpec::spawn("rng", "outboard-virtio-rng", &[]).place(0, RNG))
        .unwrap();
    let r = run(
        &mut fe,
        1,
        programs::VIRTIO,
        &[("blk", 0, 5), ("rng", 0, 6)],
    );
    assert_eq!(r.exit_code, 0, "guest exit code (see guests/virtio.S)");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "virtio: read sectors 0 and 1 from virtio-blk and 64 bytes from virtio-rng\n"
    );
    // QueueNotify writes are ioeventfds: no exit at either device's notify register.
    assert_eq!(r.stats.mmio_exits_at(BLK + 0x50), 0);
    assert_eq!(r.stats.mmio_exits_at(RNG + 0x50), 0);
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&image);
}

#[test]
fn doorbells_when_100000_written_by_the_guest_then_no_exit_and_all_counted() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    scratch(&mut fe);
    let r = run(&mut fe, 1, programs::DOORBELLS, &[]);
    assert_eq!(r.exit_code, 0);
    assert_eq!(
        r.stats.mmio_exits_at(SCRATCH + 0x28),
        0,
        "doorbell writes never exit"
    );
    let count = fe
        .mmio()
        .try_read(SCRATCH + 0x30, outboard_frontend::AccessSize::B8)
        .unwrap();
    let wakeups = fe
        .mmio()
        .try_read(SCRATCH + 0x38, outboard_frontend::AccessSize::B8)
        .unwrap();
    assert_eq!(
        count, 100_000,
        "the backend observed every ring (coalesced)"
    );
    println!("100000 doorbell rings reached the backend in {wakeups} wake-ups");
}

#[test]
fn interrupts_when_10000_raised_by_the_backend_then_each_wakes_the_guest_from_hlt() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    scratch(&mut fe);
    let r = run(&mut fe, 1, programs::INTERRUPTS, &[("scratch", 0, 3)]);
    assert_eq!(r.exit_code, 0, "guest exit code (see guests/interrupts.S)");
}

#[test]
fn smp_when_two_vcpus_hammer_one_backend_then_totals_exact() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "smp");
    scratch(&mut fe);
    let r = run(&mut fe, 2, programs::SMP, &[]);
    assert_eq!(r.exit_code, 0, "guest exit code (see guests/smp.S)");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "smp: two vCPUs, 10000 writes, exact totals\n"
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn backend_killed_while_a_vcpu_waits_then_all_ones_and_the_vm_finishes() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    scratch(&mut fe);
    let pid = fe.device("scratch").unwrap().pid().unwrap();
    // The backend cannot answer: the guest's first read waits on it.
    outboard_tests::signal(pid, libc::SIGSTOP);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        outboard_tests::signal(pid, libc::SIGKILL);
    });
    let r = run(&mut fe, 1, programs::REGISTERS, &[]);
    killer.join().unwrap();
    // The ID read came back all-ones (exit code 1: "ID read at 1 byte"), and
    // the guest ran on to its exit instead of wedging the VM.
    assert_eq!(r.exit_code, 1);
    assert!(fe.device("scratch").unwrap().is_failed());
}

#[test]
fn shutdown_when_guest_exits_then_every_backend_exits_cleanly() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "shutdown");
    scratch(&mut fe);
    let r = run(&mut fe, 1, programs::HELLO, &[]);
    assert_eq!(r.exit_code, 0);
    for (name, status) in fe.shutdown() {
        assert!(status.unwrap().success(), "{name}");
    }
    let _ = std::fs::remove_file(&log);
}
