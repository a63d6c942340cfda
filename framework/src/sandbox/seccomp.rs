//! The seccomp allowlist and the SIGSYS handler that names a blocked call.

use std::collections::BTreeMap;
use std::io;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::{syscalls, Error, Policy, Report};

/// System calls every backend may make with any arguments: I/O on fds it
/// holds, epoll, memory management, threads' housekeeping, time, signals.
/// A few more are allowed with restricted arguments (docs/security.md):
/// `clone` (threads only), `mmap`/`mprotect` (never executable), `ioctl`
/// (FIONBIO, FIONREAD, FIOCLEX), `fcntl` (flags, reading and adding seals), `prctl`
/// (thread names), `tgkill` (this process only).
pub const BASE_SYSCALLS: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_close,
    libc::SYS_shutdown,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
];

/// Byte offset of `si_syscall` in the kernel's `siginfo_t` for SIGSYS on
/// 64-bit Linux: `si_signo`, `si_errno`, `si_code` and padding (16 bytes),
/// then `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }`.
const SI_SYSCALL_OFFSET: usize = 24;

/// The program name the SIGSYS handler prints; set once before the filter.
static PROGRAM: OnceLock<String> = OnceLock::new();

fn arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(not(target_arch = "aarch64"))]
    return TargetArch::x86_64;
}

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Result<SeccompCondition, Error> {
    SeccompCondition::new(arg, len, op, value).map_err(Error::Filter)
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, Error> {
    SeccompRule::new(conditions).map_err(Error::Filter)
}

/// One rule per allowed value of argument `arg`.
fn any_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, Error> {
    values
        .iter()
        .map(|&v| rule(vec![cond(arg, Len::Dword, Op::Eq, v)?]))
        .collect()
}

/// The argument-restricted rules of the allowlist, for a process whose pid
/// (as it sees it) is `pid`.
fn rules(pid: libc::pid_t) -> Result<BTreeMap<i64, Vec<SeccompRule>>, Error> {
    let mut m = BTreeMap::new();
    // Threads only: a clone without CLONE_THREAD would be a new process.
    let thread = libc::CLONE_THREAD as u64;
    m.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            Len::Qword,
            Op::MaskedEq(thread),
            thread,
        )?])?],
    );
    // Never executable memory: the process cannot load code it received.
    let exec = libc::PROT_EXEC as u64;
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        m.insert(
            nr,
            vec![rule(vec![cond(2, Len::Dword, Op::MaskedEq(exec), 0)?])?],
        );
    }
    m.insert(
        libc::SYS_ioctl,
        any_of(1, &[libc::FIONBIO, libc::FIONREAD, libc::FIOCLEX])?,
    );
    let fcntl = [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
        libc::F_GET_SEALS,
        // Sealing a memfd the backend made (vhost-user's inflight area):
        // seals only ever take abilities away.
        libc::F_ADD_SEALS,
    ];
    m.insert(libc::SYS_fcntl, any_of(1, &fcntl.map(|c| c as u64))?);
    m.insert(
        libc::SYS_prctl,
        any_of(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64])?,
    );
    // abort() and raise() signal this process only.
    m.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, pid as u64)?])?],
    );
    Ok(m)
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(rules, mismatch, matched, arch()).map_err(Error::Filter)?;
    BpfProgram::try_from(filter).map_err(Error::Filter)
}

/// Calls that fail with ENOSYS instead of ending the process: `clone3`
/// (its flags live in memory a filter cannot read; the C library falls
/// back to `clone`, which the allowlist checks), and removing a path (a
/// device's socket path at exit: the empty root has nothing to remove; the
/// file outlives a confined backend). One errno for all keeps them in one
/// filter: the kernel runs every filter on every call.
const REFUSED: &[i64] = &[libc::SYS_clone3, libc::SYS_unlink, libc::SYS_unlinkat];

/// The backend's filters: [`REFUSED`] calls, and the allowlist, whose
/// misses raise SIGSYS.
fn programs(pid: libc::pid_t, policy: &Policy) -> Result<(BpfProgram, BpfProgram, usize), Error> {
    let refused = compile(
        REFUSED.iter().map(|&nr| (nr, vec![])).collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )?;
    let mut allowed = rules(pid)?;
    // The kernel applies the most severe verdict of all filters, and SIGSYS
    // is more severe than an error: these pass the allowlist so that the
    // error is the verdict.
    for &nr in REFUSED {
        allowed.insert(nr, vec![]);
    }
    for &nr in BASE_SYSCALLS.iter().chain(&policy.syscalls) {
        // An unconditional entry wins over argument rules for the same call.
        allowed.insert(nr, vec![]);
    }
    let count = allowed.len();
    let allow = compile(allowed, SeccompAction::Trap, SeccompAction::Allow)?;
    Ok((refused, allow, count))
}

/// Installs the SIGSYS handler and the backend's filters.
pub(super) fn install(program: &str, policy: &Policy, report: &mut Report) -> Result<(), Error> {
    let _ = PROGRAM.set(program.to_owned());
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    let (refused, allow, count) = programs(pid, policy)?;
    install_handler().map_err(Error::Handler)?;
    seccompiler::apply_filter(&refused).map_err(Error::Seccomp)?;
    seccompiler::apply_filter(&allow).map_err(Error::Seccomp)?;
    report.applied(format!(
        "seccomp allowlist ({count} system calls, {} for the device)",
        policy.syscalls.len()
    ));
    Ok(())
}

/// The supervisor's filter: wait for the child, die like it, nothing else.
/// Misses kill the process.
pub(super) fn install_supervisor(pid: libc::pid_t) -> Result<(), Error> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_wait4,
        libc::SYS_exit_group,
        libc::SYS_exit,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_restart_syscall,
        libc::SYS_getpid,
    ]
    .into_iter()
    .map(|nr| (nr, vec![]))
    .collect();
    m.insert(
        libc::SYS_kill,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, pid as u64)?])?],
    );
    let prog = compile(m, SeccompAction::KillProcess, SeccompAction::Allow)?;
    seccompiler::apply_filter(&prog).map_err(Error::Seccomp)
}

fn install_handler() -> io::Result<()> {
    // SAFETY: sigaction is zeroable (plain integers and a mask).
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    // SA_RESETHAND: the handler runs once; the call it makes to end the
    // process meets the default action.
    act.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: `act` is initialised and lives across the call; the handler
    // only makes async-signal-safe calls.
    if unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A fixed buffer the handler formats into (no allocation in a handler).
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The line the handler prints for a blocked call `nr`.
fn blocked_line(program: &str, nr: i64) -> Line {
    let mut l = Line {
        buf: [0; 256],
        len: 0,
    };
    l.push(program.as_bytes());
    l.push(b": error: sandbox: blocked system call ");
    l.push(syscalls::name(nr).unwrap_or("unknown").as_bytes());
    l.push(b" (");
    l.push_number(nr as u64);
    l.push(b")\n");
    l
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t; for a
    // seccomp SIGSYS its `_sigsys` member is the active one, and
    // SI_SYSCALL_OFFSET is where its `_syscall` int sits.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let program = PROGRAM.get().map_or("backend", String::as_str);
    let line = blocked_line(program, i64::from(nr));
    // SAFETY: write from a live stack buffer; then a call no filter allows
    // (reboot with a bad magic number, which fails even unfiltered): the
    // kernel forces SIGSYS with the default action (SA_RESETHAND), which
    // ends the process even as pid 1 of its namespace.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::syscall(libc::SYS_reboot, 0, 0, 0, 0);
        libc::_exit(128 + libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_line_when_known_call_then_names_it() {
        let l = blocked_line("outboard-x", libc::SYS_openat);
        assert_eq!(
            &l.buf[..l.len],
            b"outboard-x: error: sandbox: blocked system call openat (257)\n"
        );
        let l = blocked_line("p", 9999);
        assert_eq!(
            &l.buf[..l.len],
            b"p: error: sandbox: blocked system call unknown (9999)\n"
        );
    }

    #[test]
    fn programs_when_built_then_compile_for_this_arch() {
        let (refused, allow, _) =
            programs(1, &Policy::with_syscalls(&[libc::SYS_pread64])).unwrap();
        assert!(!refused.is_empty());
        assert!(allow.len() > BASE_SYSCALLS.len());
    }

    /// Runs `f` in a forked child and returns its wait status.
    fn in_child(f: impl FnOnce() -> i32) -> libc::c_int {
        // SAFETY: the child only runs `f` and exits; the test harness's
        // other threads are not touched by it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = f();
            // SAFETY: ending the forked child without running destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child, writing `status`.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        status
    }

    #[test]
    fn install_when_blocked_call_made_then_killed_by_sigsys() {
        let status = in_child(|| {
            let mut r = Report::default();
            if install("t", &Policy::default(), &mut r).is_err() {
                return 3;
            }
            // Allowed: the process goes on.
            // SAFETY: getpid cannot fail.
            unsafe { libc::getpid() };
            // SAFETY: a blocked call; it never returns.
            unsafe { libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0) };
            4
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    #[test]
    fn install_when_new_process_or_exec_memory_then_refused() {
        let status = in_child(|| {
            let mut r = Report::default();
            if install("t", &Policy::default(), &mut r).is_err() {
                return 3;
            }
            // unlink and clone3 answer ENOSYS rather than trapping.
            // SAFETY: a NUL-terminated path; refused by the filter.
            let rc = unsafe { libc::unlink(c"/nonexistent".as_ptr()) };
            if rc != -1 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
                return 7;
            }
            // SAFETY: a null clone_args with size 0; refused by the filter.
            let rc = unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
            if rc != -1 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
                return 5;
            }
            // SAFETY: an anonymous executable mapping: trapped.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            6
        });
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
