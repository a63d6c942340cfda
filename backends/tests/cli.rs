//! The backends' shared command line, run as real processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run backend");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_when_asked_then_shared_and_device_options_listed() {
    let (code, out, _) = run(env!("CARGO_BIN_EXE_outboard-uart"), &["--help"]);
    assert_eq!(code, 0);
    for opt in ["--control-fd", "--socket", "--log-level", "--output"] {
        assert!(out.contains(opt), "{opt} missing from:\n{out}");
    }
    let (code, out, _) = run(env!("CARGO_BIN_EXE_outboard-scratch"), &["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--control-fd"));
}

#[test]
fn help_when_plain_device_then_no_vhost_user_but_virtio_devices_offer_it() {
    for bin in [
        env!("CARGO_BIN_EXE_outboard-uart"),
        env!("CARGO_BIN_EXE_outboard-scratch"),
    ] {
        let (code, out, _) = run(bin, &["--help"]);
        assert_eq!(code, 0);
        assert!(!out.contains("--vhost-user"), "{bin}:\n{out}");
    }
    for bin in [
        env!("CARGO_BIN_EXE_outboard-virtio-blk"),
        env!("CARGO_BIN_EXE_outboard-virtio-rng"),
        env!("CARGO_BIN_EXE_outboard-virtio-console"),
    ] {
        let (code, out, _) = run(bin, &["--help"]);
        assert_eq!(code, 0);
        assert!(out.contains("--vhost-user"), "{bin}:\n{out}");
    }
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_outboard-uart"),
        &["--vhost-user", "/tmp/unused-outboard-vu.sock"],
    );
    assert_eq!(code, 1, "an unknown option is a usage error");
    assert!(err.contains("--vhost-user"), "{err}");
}

#[test]
fn control_fd_when_not_a_socket_then_exit_1_with_reason() {
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_outboard-scratch"),
        &["--control-fd", "0"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("fd 0 is not an open stream socket"), "{err}");
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_outboard-scratch"),
        &["--control-fd", "77"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("fd 77"), "{err}");
}

#[test]
fn options_when_neither_fd_nor_socket_then_usage_error_exit_1() {
    let (code, _, err) = run(env!("CARGO_BIN_EXE_outboard-uart"), &[]);
    assert_eq!(code, 1, "usage errors are start-up failures");
    assert!(err.contains("--control-fd"), "{err}");
}

#[test]
fn uart_when_output_unwritable_then_exit_1_with_reason() {
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_outboard-uart"),
        &[
            "--socket",
            "/tmp/unused-outboard.sock",
            "--output",
            "/nonexistent/dir/uart.log",
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("cannot set up the device"), "{err}");
}

#[test]
fn uart_when_input_stdin_is_dev_null_then_serves_and_exits_cleanly() {
    let path = std::env::temp_dir().join(format!("outboard-uart-null-{}.sock", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_outboard-uart"))
        .args(["--input", "stdin", "--output", "/dev/null", "--socket"])
        .arg(&path)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn uart");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let sock = loop {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    drop(sock);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
