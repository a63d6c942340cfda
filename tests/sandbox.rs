//! Confined backends (docs/security.md): what a spawned backend holds and
//! what it is stopped from doing, checked from outside through /proc and
//! through the frontend's report.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use outboard_backends::scratch::REG_ACCUM;
use outboard_frontend::{AccessSize, DeviceSpec, Frontend};
use outboard_tests::{frontend, socket_path, temp_image};

const T: Duration = Duration::from_secs(5);

fn status_field(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("{field} missing for pid {pid}"))
}

fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit(')').next().unwrap();
    after.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn ns(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The targets of `pid`'s open fds.
fn fds(pid: u32) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e.file_name().to_str()?.parse().ok()?;
            let t = std::fs::read_link(e.path()).ok()?;
            Some((n, t.to_string_lossy().into_owned()))
        })
        .collect();
    v.sort();
    v
}

fn assert_confined(name: &str, pid: u32) {
    assert_eq!(status_field(pid, "Seccomp"), "2", "{name} pid {pid}");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "{name} pid {pid}");
    assert_eq!(
        status_field(pid, "CapEff"),
        "0000000000000000",
        "{name} pid {pid}"
    );
    assert_eq!(
        status_field(pid, "CapPrm"),
        "0000000000000000",
        "{name} pid {pid}"
    );
}

#[test]
fn reference_backends_when_spawned_then_confined_in_own_namespaces_with_protocol_fds_only() {
    let img = temp_image("sandbox-blk", 2048);
    let out = std::env::temp_dir().join(format!("outboard-sandbox-{}.log", std::process::id()));
    let input = socket_path("sandbox-in");
    let mut fe = frontend(T);
    let image = img.to_str().unwrap();
    let devices: [(&str, &str, Vec<&str>); 5] = [
        ("scratch", "outboard-scratch", vec![]),
        ("uart", "outboard-uart", vec![]),
        ("blk", "outboard-virtio-blk", vec!["--path", image]),
        (
            "con",
            "outboard-virtio-console",
            vec![
                "--output",
                out.to_str().unwrap(),
                "--input-socket",
                input.to_str().unwrap(),
            ],
        ),
        ("rng", "outboard-virtio-rng", vec![]),
    ];
    for (name, program, args) in &devices {
        fe.attach(&DeviceSpec::spawn(name, program, args)).unwrap();
    }
    for (name, _, _) in &devices {
        let backend = fe.device(name).unwrap().pid().unwrap();
        let supervisor = parent_of(backend);
        assert_ne!(supervisor, std::process::id(), "{name}: no supervisor");
        assert_confined(name, backend);
        assert_confined(name, supervisor);
        assert_eq!(
            status_field(backend, "Uid").split_whitespace().next(),
            Some("65534")
        );
        // pid 1 of its own pid namespace; every other namespace its own too.
        assert_eq!(
            status_field(backend, "NSpid").split_whitespace().last(),
            Some("1")
        );
        let me = "self";
        for kind in ["user", "mnt", "net", "ipc", "uts", "pid"] {
            assert_ne!(
                ns(&backend.to_string(), kind),
                ns(me, kind),
                "{name}: {kind} namespace shared with the frontend"
            );
        }
        // The supervisor holds nothing but stdin, stdout and stderr.
        let sup: Vec<u32> = fds(supervisor).into_iter().map(|(n, _)| n).collect();
        assert_eq!(sup, vec![0, 1, 2], "{name}: supervisor fds");
        // The backend: its protocol fds (sockets, eventfds, epoll, the
        // memory table's memfds) and the files its options named.
        for (n, target) in fds(backend) {
            let ok = target.starts_with("socket:")
                || target.starts_with("anon_inode:")
                || target.starts_with("pipe:")
                || target.starts_with("/memfd:")
                || target == "/dev/null"
                || target == "/dev/urandom" && *name == "rng"
                || target == image && *name == "blk"
                || Path::new(&target) == out && *name == "con";
            assert!(ok, "{name}: unexpected fd {n} -> {target}");
        }
    }
    let _ = std::fs::remove_file(img);
    let _ = std::fs::remove_file(out);
}

/// The hostile device's attempts and the system call each must be stopped at.
const ATTEMPTS: [(u64, &str); 5] = [
    (1, "openat"),
    (2, "socket"),
    (3, "execve"),
    (4, "ptrace"),
    (5, "mount"),
];

fn with_hostile(spec: DeviceSpec) -> (Frontend, u64, u64) {
    let mut fe = frontend(T);
    fe.attach(&spec).unwrap();
    fe.attach(&DeviceSpec::spawn("other", "outboard-scratch", &[]))
        .unwrap();
    let hostile = fe.device("hostile").unwrap().placed(0).unwrap().addr;
    let other = fe.device("other").unwrap().placed(0).unwrap().addr;
    (fe, hostile, other)
}

fn hostile_spec() -> DeviceSpec {
    let me = std::process::id().to_string();
    DeviceSpec::spawn("hostile", "outboard-hostile", &["--target-pid", &me])
}

#[test]
fn hostile_backend_when_confined_tries_to_escape_then_killed_reported_and_others_serve() {
    for (attempt, syscall) in ATTEMPTS {
        let (fe, hostile, other) = with_hostile(hostile_spec());
        let _ = fe.mmio().try_write(hostile, AccessSize::B8, attempt);
        // The attempt killed the backend: the read fails, the device is
        // failed with the call named.
        assert!(
            fe.mmio().try_read(hostile, AccessSize::B8).is_err(),
            "attempt {attempt} ({syscall}) was not stopped"
        );
        let why = fe.device("hostile").unwrap().failure().unwrap();
        assert!(
            why.contains(&format!("sandbox: blocked system call {syscall} (")),
            "attempt {attempt}: {why}"
        );
        assert!(why.contains("SIGSYS"), "attempt {attempt}: {why}");
        // The other device goes on serving.
        fe.mmio()
            .try_write(other + REG_ACCUM, AccessSize::B8, attempt)
            .unwrap();
        assert_eq!(
            fe.mmio()
                .try_read(other + REG_ACCUM, AccessSize::B8)
                .unwrap(),
            attempt
        );
        assert!(!fe.device("other").unwrap().is_failed());
    }
}

#[test]
fn hostile_backend_when_unconfined_then_the_same_calls_succeed() {
    // The control experiment: without the sandbox, the device really does
    // what the confined one is stopped from doing.
    let (fe, hostile, _) = with_hostile(hostile_spec().without_sandbox());
    for attempt in [1, 2] {
        fe.mmio()
            .try_write(hostile, AccessSize::B8, attempt)
            .unwrap();
        assert_eq!(
            fe.mmio().try_read(hostile, AccessSize::B8).unwrap(),
            1,
            "attempt {attempt} did not succeed unconfined"
        );
    }
    let pid = fe.device("hostile").unwrap().pid().unwrap();
    assert_eq!(status_field(pid, "Seccomp"), "0");
}
