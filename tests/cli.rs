//! The command line of every real binary, as docs/protocol.md section 2.3
//! says: `--version` prints `PROGRAM VERSION` and exits 0; a usage error
//! prints `PROGRAM: error: MESSAGE` and a hint on stderr and exits 1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output, Stdio};

use outboard_tests::bin;

/// Every backend binary and the `outboard` command.
const PROGRAMS: &[&str] = &[
    "outboard-uart",
    "outboard-scratch",
    "outboard-virtio-blk",
    "outboard-virtio-rng",
    "outboard-virtio-console",
    "outboard",
];

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(bin(program))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run")
}

#[test]
fn binaries_when_version_then_program_and_version_on_stdout_and_exit_0() {
    for program in PROGRAMS {
        let out = run(program, &["--version"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{program}: {out:?}");
        assert_eq!(
            stdout,
            format!("{program} {}\n", env!("CARGO_PKG_VERSION")),
            "{program}"
        );
    }
}

#[test]
fn binaries_when_usage_error_then_program_error_message_and_hint_and_exit_1() {
    for program in PROGRAMS {
        for args in [&["--no-such-option"][..], &[]] {
            let out = run(program, args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{program} {args:?}: {stderr}");
            let lines: Vec<&str> = stderr.lines().collect();
            assert_eq!(lines.len(), 2, "{program} {args:?}: {stderr}");
            let prefix = format!("{program}: error: ");
            assert!(
                lines[0].starts_with(&prefix) && lines[0].len() > prefix.len(),
                "{program} {args:?}: {stderr}"
            );
            assert!(
                lines[1].contains(&format!("{program} --help")),
                "{program} {args:?}: {stderr}"
            );
        }
        let out = run(program, &["--no-such-option"]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("'--no-such-option'"),
            "{program}: the message names the option"
        );
    }
}
