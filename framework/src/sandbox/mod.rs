//! Confinement for a backend process: what a compromised device can still
//! do once [`confine`] has run.
//!
//! A backend opens everything it needs while it starts (its control
//! socket, the files of its device options); everything later arrives as
//! file descriptors over the control socket. [`confine`] then takes away
//! the rest, in this order:
//!
//! 1. **rlimits**: no core files (`RLIMIT_CORE` 0), a bounded fd table
//!    (`RLIMIT_NOFILE`).
//! 2. **namespaces**: new mount, IPC, network, UTS and pid namespaces, and
//!    a new user namespace (as the unprivileged user `nobody` when started
//!    as root). Any the kernel refuses is reported and skipped.
//! 3. **an empty root**: the mount namespace's root becomes an empty,
//!    read-only tmpfs (`pivot_root`), so no path names anything.
//! 4. **pid namespace**: the process forks; the child, pid 1 of the new pid
//!    namespace, goes on as the backend, and the parent stays outside as a
//!    tiny supervisor that only waits for the child and exits the same way
//!    (the pid the frontend spawned). The child dies with the supervisor
//!    (`PR_SET_PDEATHSIG`).
//! 5. **privileges**: every capability dropped (effective, permitted,
//!    inheritable, ambient and bounding sets), `PR_SET_NO_NEW_PRIVS`.
//! 6. **seccomp**: an allowlist ([`BASE_SYSCALLS`] plus the device's
//!    [`Policy::syscalls`]) built with seccompiler; anything else raises
//!    SIGSYS, whose handler writes `PROGRAM: error: sandbox: blocked system
//!    call NAME (NR)` on stderr and ends the process with SIGSYS, so the
//!    frontend can say which call it was. New processes are refused
//!    (`clone` only with `CLONE_THREAD`), executable mappings too.
//!
//! The process must be single-threaded when [`confine`] is called: the
//! kernel refuses a new user namespace to a threaded process, and forking
//! one is unsound. With threads, the namespace and pid steps are skipped and
//! reported; the rest still applies.
//!
//! What applied and what the kernel refused is returned as a [`Report`] and
//! logged at `info` (refusals at `warn`).

use std::io;

use log::{info, warn};
use thiserror::Error;

mod namespaces;
mod privileges;
mod seccomp;
mod syscalls;

pub use seccomp::BASE_SYSCALLS;

/// Errors that stop confinement (the backend must not run unconfined).
#[derive(Debug, Error)]
pub enum Error {
    /// cannot set resource limit {0}
    #[error("cannot set resource limit {0}")]
    Rlimit(&'static str, #[source] io::Error),
    /// cannot drop privileges: {0}
    #[error("cannot drop privileges: {0}")]
    Privileges(&'static str, #[source] io::Error),
    /// cannot fork into the new pid namespace
    #[error("cannot fork into the new pid namespace")]
    Fork(#[source] io::Error),
    /// cannot build the seccomp filter
    #[error("cannot build the seccomp filter")]
    Filter(#[source] seccompiler::BackendError),
    /// cannot install the seccomp filter
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
    /// cannot install the SIGSYS handler
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] io::Error),
}

/// What a device needs beyond the framework's own system calls.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Extra system calls the device makes while serving (numbers from
    /// `libc::SYS_*`): file I/O on its image, accepting on its own
    /// listening socket.
    pub syscalls: Vec<i64>,
}

impl Policy {
    /// A policy that allows `syscalls` on top of [`BASE_SYSCALLS`].
    pub fn with_syscalls(syscalls: &[i64]) -> Self {
        Policy {
            syscalls: syscalls.to_vec(),
        }
    }
}

/// What [`confine`] applied and what the kernel refused.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Steps that took effect.
    pub applied: Vec<String>,
    /// Steps the kernel (or the process's state) refused, with the reason.
    pub refused: Vec<String>,
}

impl Report {
    fn applied(&mut self, what: impl Into<String>) {
        self.applied.push(what.into());
    }

    fn refused(&mut self, what: &str, why: impl std::fmt::Display) {
        self.refused.push(format!("{what} ({why})"));
    }

    /// Logs the report: one `info` line for what applied, one `warn` line
    /// per refusal.
    pub fn log(&self) {
        info!("sandbox: {}", self.applied.join(", "));
        for r in &self.refused {
            warn!("sandbox: not applied: {r}");
        }
    }
}

/// Confines the calling process for good; see the module docs. `program`
/// names the process in the SIGSYS message. In the pid namespace case this
/// returns in the child only; the parent supervises it and never returns.
pub fn confine(program: &str, policy: &Policy) -> Result<Report, Error> {
    let mut report = Report::default();
    let parent = privileges::parent_death()?;
    privileges::limit_resources(&mut report)?;
    let single = namespaces::single_threaded();
    if !single {
        report.refused("user and pid namespaces", "the process already has threads");
    }
    let ns = namespaces::isolate(single, &mut report)?;
    // Becoming another user cleared the parent-death signal a spawning
    // frontend set: set it again, unless that parent is already gone.
    privileges::restore_parent_death(parent)?;
    // The supervisor keeps nothing the backend holds; from here on this is
    // the backend itself.
    if ns.pid {
        namespaces::fork_supervised()?;
        report.applied("pid namespace");
    }
    privileges::drop_all(ns.own_user, &mut report)?;
    fix_malloc_arenas();
    seccomp::install(program, policy, &mut report)?;
    Ok(report)
}

/// glibc's malloc sizes its arena limit from the number of CPUs, read
/// from /sys the first time a ninth thread allocates: fix the limit now
/// (glibc's own default, 8 per CPU), while files can still be read.
fn fix_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let arenas = libc::c_int::try_from(8 * cpus).unwrap_or(libc::c_int::MAX);
        // SAFETY: mallopt takes two integers and only sets a malloc tunable.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_when_steps_recorded_then_listed_in_order() {
        let mut r = Report::default();
        r.applied("a");
        r.refused("b", "no");
        r.applied("c");
        assert_eq!(r.applied, vec!["a", "c"]);
        assert_eq!(r.refused, vec!["b (no)"]);
    }

    #[test]
    fn policy_when_with_syscalls_then_kept() {
        let p = Policy::with_syscalls(&[libc::SYS_pread64]);
        assert_eq!(p.syscalls, vec![libc::SYS_pread64]);
    }
}
