//! What a spawned backend inherits from the frontend's process: exactly the
//! protocol's fds and a clean environment (issue 11, item 5).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::time::Duration;

use outboard_frontend::DeviceSpec;
use outboard_tests::frontend;

const T: Duration = Duration::from_secs(10);

#[test]
fn spawn_when_frontend_holds_inheritable_fd_and_env_then_backend_gets_neither() {
    // A file the frontend's "shell" left open without close-on-exec.
    let marker = std::env::temp_dir().join(format!("outboard-leak-{}", std::process::id()));
    std::fs::write(&marker, b"secret").unwrap();
    let path = CString::new(marker.to_str().unwrap()).unwrap();
    // SAFETY: open(2) with a valid C string; the fd is closed below.
    let leaked = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    assert!(leaked >= 0);
    // SAFETY: this test binary runs this one test; no other thread reads
    // the environment while it is changed.
    unsafe { std::env::set_var("OUTBOARD_TEST_SECRET", "hunter2") };

    let mut fe = frontend(T);
    fe.attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]))
        .unwrap();
    let pid = fe.device("s").unwrap().pid().unwrap();
    let targets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|t| t.display().to_string())
        .collect();
    assert!(
        !targets.iter().any(|t| t.contains("outboard-leak")),
        "the frontend's open file leaked into the backend: {targets:?}"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("OUTBOARD_TEST_SECRET"),
        "the frontend's environment leaked into the backend"
    );
    // The device still works: one register read.
    let base = fe.device("s").unwrap().placed(0).unwrap().addr;
    fe.mmio()
        .try_read(base, outboard_frontend::AccessSize::B4)
        .unwrap();
    fe.shutdown();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(leaked) };
    let _ = std::fs::remove_file(&marker);
}
