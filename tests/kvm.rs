//! Real guest code on KVM drives the backends: the same processes, the same
//! buses, with ioeventfd doorbells and irqfd interrupts in the kernel.
//!
//! Where /dev/kvm is not usable each test prints `skipped: /dev/kvm
//! unavailable` (and fails instead when `OUTBOARD_REQUIRE_KVM` is set, as
//! `.ci/run` does on machines that have KVM).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use outboard_frontend::kvm::{self, programs, Machine, RunResult};
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{DeviceSpec, Frontend};
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
    let mut m = Machine::new(fe, vcpus).unwrap();
    for &(dev, line, gsi) in irqs {
        m.connect_irq(fe, dev, line, gsi).unwrap();
    }
    m.load(program).unwrap();
    m.run(Duration::from_secs(60)).unwrap()
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
    assert!(r.stats.pio.load(std::sync::atomic::Ordering::Relaxed) > 50);
    let _ = std::fs::remove_file(&log);
}
