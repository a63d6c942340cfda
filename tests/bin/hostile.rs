//! A hostile test backend: writing N to register 0 makes it try escape N
//! from inside its process; reading register 0 says how the last attempt
//! went. tests/sandbox.rs drives it.
//!
//! | N | attempt                                   |
//! |---|-------------------------------------------|
//! | 1 | open("/etc/passwd")                       |
//! | 2 | socket(AF_INET, SOCK_STREAM)              |
//! | 3 | execve("/bin/sh")                         |
//! | 4 | ptrace(PTRACE_ATTACH, the frontend's pid) |
//! | 5 | mount a tmpfs on /                        |
//!
//! Register 0 reads 0 before any attempt, 1 when the last attempt
//! succeeded (an escape), 2 when it failed with an error. Confined, the
//! process dies at the attempt instead.

use std::ffi::CString;
use std::process::ExitCode;

use outboard::{Access, AccessSize, Device, DeviceDescription, Region};

/// Attempt outcomes, as register 0 reads them.
const NONE: u64 = 0;
const ESCAPED: u64 = 1;
const FAILED: u64 = 2;

struct Hostile {
    frontend: libc::pid_t,
    last: u64,
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

impl Hostile {
    /// Makes attempt `n`; true when the call succeeded.
    fn attempt(&self, n: u64) -> bool {
        // SAFETY: each call takes NUL-terminated strings that live across
        // it and plain integers; a success is undone where it matters (the
        // fd is closed, a traced frontend is detached, exec replaces this
        // test process only).
        unsafe {
            match n {
                1 => {
                    let fd = libc::open(c("/etc/passwd").as_ptr(), libc::O_RDONLY);
                    fd >= 0 && libc::close(fd) == 0
                }
                2 => {
                    let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                    fd >= 0 && libc::close(fd) == 0
                }
                3 => {
                    let (sh, flag, script) = (c("/bin/sh"), c("-c"), c("exit 0"));
                    let argv = [
                        sh.as_ptr(),
                        flag.as_ptr(),
                        script.as_ptr(),
                        std::ptr::null(),
                    ];
                    libc::execv(sh.as_ptr(), argv.as_ptr());
                    false
                }
                4 => {
                    let r = libc::ptrace(libc::PTRACE_ATTACH, self.frontend, 0, 0);
                    if r == 0 {
                        libc::ptrace(libc::PTRACE_DETACH, self.frontend, 0, 0);
                    }
                    r == 0
                }
                5 => {
                    libc::mount(
                        c("none").as_ptr(),
                        c("/").as_ptr(),
                        c("tmpfs").as_ptr(),
                        0,
                        std::ptr::null(),
                    ) == 0
                }
                _ => false,
            }
        }
    }
}

impl Device for Hostile {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("hostile")
            .region(Region::mmio("hostile", 8).access_sizes(&[AccessSize::B8]))
    }

    fn read(&mut self, _: Access) -> u64 {
        self.last
    }

    fn write(&mut self, access: Access, value: u64) {
        if access.offset == 0 {
            self.last = if self.attempt(value) { ESCAPED } else { FAILED };
        }
    }

    fn reset(&mut self) {
        self.last = NONE;
    }
}

/// Options of the hostile device.
#[derive(clap::Args)]
struct Options {
    /// The pid to try to ptrace.
    #[arg(long, default_value_t = 1)]
    target_pid: libc::pid_t,
}

fn main() -> ExitCode {
    outboard::run("outboard-hostile", std::env::args_os(), |o: Options| {
        Ok::<_, std::convert::Infallible>(Hostile {
            frontend: o.target_pid,
            last: NONE,
        })
    })
}
