//! The examples, run as a user would run them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// `target/<profile>/examples/NAME`, which `cargo test` builds.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().unwrap().parent().unwrap();
    let p = profile.join("examples").join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo test --workspace`",
        p.display()
    );
    p
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[test]
fn minimal_vmm_when_run_then_devices_on_its_own_bus_serve_the_guest() {
    let out = Command::new(example("minimal-vmm"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("outboard-uart region 0 at pio 0x3f8"),
        "{stdout}"
    );
    assert!(
        stdout.contains("outboard-scratch region 0 at mmio 0xd0000000"),
        "{stdout}"
    );
    if kvm_usable() {
        assert!(
            stdout.contains("interrupts: 10000 raised by the backend, 10000 taken"),
            "{stdout}"
        );
    } else {
        assert!(
            stdout.contains("socket guest: 1000 raised by the backend, 1000 taken"),
            "{stdout}"
        );
    }
    assert_eq!(
        stdout
            .matches("exited: Some(ExitStatus(unix_wait_status(0)))")
            .count(),
        2,
        "{stdout}"
    );
}
