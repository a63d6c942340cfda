//! The `outboard` command line, run as a real process tree.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};

fn outboard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outboard"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run outboard")
}

fn temp(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("outboard-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn demo_when_run_then_greeting_printed_and_all_checks_pass() {
    let out = outboard(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Hello from an Outboard guest"), "{stdout}");
    assert!(
        stdout.contains("sum 50005000, write count 10000"),
        "{stdout}"
    );
    assert!(stdout.contains("checks passed, 0 failed"), "{stdout}");
    assert!(stdout.contains("virtio-blk: 4 MiB disk"), "{stdout}");
    assert!(stdout.contains("512 4 KiB requests verified"), "{stdout}");
    assert!(stdout.contains("demo: virtio-rng: "), "{stdout}");
    assert!(
        stdout.contains("demo: kvm: smp on 2 vCPU(s): exit code 0")
            || stdout.contains("the socket test driver above stood in for a guest"),
        "{stdout}"
    );
}

#[test]
fn run_when_config_and_script_then_accesses_performed() {
    let log = std::env::temp_dir().join(format!("outboard-cli-{}-com1.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let config = temp(
        "cfg.toml",
        &format!(
            r#"
            timeout_ms = 5000
            [[device]]
            name = "com1"
            backend = "outboard-uart"
            args = ["--output", "{}"]
            [[device]]
            name = "scratch"
            backend = "outboard-scratch"
            [[device.region]]
            index = 0
            addr = 0xc0000000
            [[device.region]]
            index = 1
            skip = true
            "#,
            log.display()
        ),
    );
    let script = temp(
        "script.txt",
        "# a test guest\n\
         expect mmio 0xc0000000 8 0x484354524353424f\n\
         repeat 100 write mmio 0xc0000018 4 3\n\
         expect mmio 0xc0000018 8 300\n\
         puts pio 0x3f8 hello from a script\n\
         read pio 0x3fd 1\n\
         place scratch 1 0xc0010000\n\
         write mmio 0xc0010000 2 0xbeef\n\
         expect mmio 0xc0010000 2 0xbeef\n\
         remove scratch 1 0xc0010000\n\
         devices\n",
    );
    let out = outboard(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--script",
        script.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("region 1 aux      unplaced"), "{stdout}");
    assert!(stdout.contains("pio 0x3fd = 0x60"), "{stdout}");
    assert!(
        stdout.contains("scratch region 1 placed at 0xc0010000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("run: 10 commands, 2 devices shut down"),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hello from a script\n"
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn run_when_expect_fails_then_exit_1_with_line() {
    let script = temp("bad.txt", "expect mmio 0xd0000000 8 1\n");
    let out = outboard(&[
        "run",
        "--device",
        "outboard-scratch",
        "--script",
        script.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("line 1: expected 0x1, read 0x484354524353424f"),
        "{stderr}"
    );
}

#[test]
fn run_when_config_invalid_then_exit_1_with_reason() {
    let config = temp("bad.toml", "[[device]]\nname = 'x'\n");
    let out = outboard(&["run", "--config", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("give exactly one of `backend`, `socket` and `vhost-user`"),
        "{stderr}"
    );
    let out = outboard(&["run", "--device", "no-such-backend-program"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("backend program no-such-backend-program not found"),
        "{stderr}"
    );
}

#[test]
fn run_when_config_names_a_guest_then_it_runs_on_kvm_or_says_why_not() {
    let log = std::env::temp_dir().join(format!("outboard-cli-{}-guest.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let config = temp(
        "guest.toml",
        &format!(
            "guest = \"hello\"\nram_mb = 16\n[[device]]\nname = \"com1\"\nbackend = \"outboard-uart\"\nargs = [\"--output\", \"{}\"]\n",
            log.display()
        ),
    );
    let out = outboard(&["run", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    if stdout.contains("/dev/kvm is usable") {
        assert!(stdout.contains("guest exited with code 0"), "{stdout}");
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "Hello from a KVM guest, through the outboard-uart backend!\n"
        );
    } else {
        assert!(
            stdout.contains("running the test-guest script instead of hello"),
            "{stdout}"
        );
    }
    let _ = std::fs::remove_file(&log);
}

#[test]
fn bench_when_quick_with_json_then_every_figure_reported() {
    let json = std::env::temp_dir().join(format!("outboard-cli-{}-bench.json", std::process::id()));
    let out = outboard(&["bench", "--quick", "--json", json.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&json).unwrap();
    // Numbers are machine-dependent and never asserted; the figures must all be there.
    for id in [
        "\"1\"", "\"1e\"", "\"2r\"", "\"2w\"", "\"3\"", "\"4l\"", "\"4c\"", "\"5\"", "\"7\"",
        "\"8s\"", "\"8m\"", "\"8n\"",
    ] {
        assert!(
            text.contains(&format!("\"id\": {id}")),
            "{id} missing from {text}"
        );
    }
    // Figure 9 needs QEMU and the Linux guest's packages; without them it says why.
    assert!(
        text.contains("\"id\": \"9\"") || stdout.contains("(9)  skipped: "),
        "{stdout}"
    );
    assert!(stdout.contains("bench: finished"), "{stdout}");
    let _ = std::fs::remove_file(&json);
}
