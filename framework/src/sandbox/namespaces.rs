//! New namespaces, an empty root and the pid-namespace supervisor.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{privileges, seccomp, Error, Report};

/// Which namespaces [`isolate`] obtained.
#[derive(Debug, Clone, Copy)]
pub(super) struct Isolation {
    /// A new pid namespace for children: [`fork_supervised`] must follow.
    pub pid: bool,
    /// The process is in a user namespace of its own.
    pub own_user: bool,
}

/// True when the process has exactly one thread (from `/proc/self/task`;
/// false when that cannot be read).
pub(super) fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.count() == 1)
}

fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes plain flags and changes only this process's
    // namespace memberships.
    if unsafe { libc::unshare(flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const NAMESPACES: [(libc::c_int, &str); 5] = [
    (libc::CLONE_NEWNS, "mount"),
    (libc::CLONE_NEWIPC, "ipc"),
    (libc::CLONE_NEWNET, "network"),
    (libc::CLONE_NEWUTS, "uts"),
    (libc::CLONE_NEWPID, "pid"),
];

/// Enters new namespaces and an empty root; as root, also becomes `nobody`
/// (see the module docs of [`super`]). Refusals are reported, not fatal;
/// failing to drop root is fatal.
pub(super) fn isolate(single: bool, report: &mut Report) -> Result<Isolation, Error> {
    // SAFETY: geteuid, getuid and getgid cannot fail and touch no memory.
    let (root, uid, gid) = unsafe { (libc::geteuid() == 0, libc::getuid(), libc::getgid()) };
    let mut own_user = false;
    if !root && single {
        // Without privileges, a user namespace is what makes the others possible.
        match unshare(libc::CLONE_NEWUSER).and_then(|()| map_ids(uid, gid)) {
            Ok(()) => {
                own_user = true;
                report.applied("user namespace");
            }
            Err(e) => report.refused("user namespace", e),
        }
    }
    let wanted: Vec<_> = NAMESPACES
        .iter()
        .filter(|(f, _)| single || *f != libc::CLONE_NEWPID)
        .collect();
    let all = wanted.iter().fold(0, |acc, (f, _)| acc | f);
    let mut got = 0;
    if unshare(all).is_ok() {
        got = all;
    } else {
        for (flag, name) in &wanted {
            match unshare(*flag) {
                Ok(()) => got |= flag,
                Err(e) => report.refused(&format!("{name} namespace"), e),
            }
        }
    }
    for (flag, name) in &wanted {
        // The pid namespace is reported once the fork into it succeeded.
        if got & flag != 0 && *flag != libc::CLONE_NEWPID {
            report.applied(format!("{name} namespace"));
        }
    }
    if got & libc::CLONE_NEWNS != 0 {
        match empty_root() {
            Ok(()) => report.applied("empty read-only root"),
            Err(e) => report.refused("empty root", e),
        }
    } else {
        report.refused("empty root", "no mount namespace");
    }
    if root {
        privileges::become_nobody(report)?;
        if single {
            match unshare(libc::CLONE_NEWUSER) {
                Ok(()) => {
                    own_user = true;
                    report.applied("user namespace");
                }
                Err(e) => report.refused("user namespace", e),
            }
        }
    }
    Ok(Isolation {
        pid: got & libc::CLONE_NEWPID != 0,
        own_user,
    })
}

/// Maps the caller's own uid and gid into its new user namespace (the one
/// mapping an unprivileged process may write), so files it creates and the
/// tmpfs root have an owner.
fn map_ids(uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstr).transpose()?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // until the call returns; mount copies them.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn chdir(path: &str) -> io::Result<()> {
    std::env::set_current_dir(path)
}

/// Makes an empty read-only tmpfs the root of this (new, private) mount
/// namespace and detaches the old root, so no path leads out.
fn empty_root() -> io::Result<()> {
    // Nothing below propagates back to the frontend's mount namespace.
    mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    let dir = ["/tmp", "/mnt", "/dev", "/proc"]
        .into_iter()
        .find(|d| Path::new(d).is_dir())
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let hidden = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        Some("outboard-sandbox"),
        dir,
        Some("tmpfs"),
        hidden,
        Some("size=4k,nr_inodes=2,mode=0555"),
    )?;
    chdir(dir)?;
    let dot = cstr(".")?;
    // SAFETY: pivot_root takes two NUL-terminated paths that live across the
    // call. pivot_root(".", ".") stacks the old root on the new one, which
    // the umount below then detaches.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: umount2 takes a NUL-terminated path and flags.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } < 0 {
        return Err(io::Error::last_os_error());
    }
    chdir("/")?;
    mount(
        None,
        "/",
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | hidden,
        None,
    )
}

/// Forks into the new pid namespace. Returns in the child (pid 1 there),
/// which goes on as the backend and dies with its parent; the parent stays
/// outside as the supervisor and never returns.
pub(super) fn fork_supervised() -> Result<(), Error> {
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    // A pidfd of the parent, for the child to see whether it died before
    // PR_SET_PDEATHSIG took effect (getppid is 0 across the namespace).
    let parent = crate::runtime::pidfd_open(me).map_err(Error::Fork)?;
    use std::io::Write;
    let _ = io::stdout().flush();
    // SAFETY: the process is single-threaded (checked by the caller), so
    // the child is a complete copy with no lock held by a vanished thread.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(Error::Fork(io::Error::last_os_error()));
    }
    if child == 0 {
        // SAFETY: prctl with integer arguments; poll on a one-element array
        // that lives across the call.
        unsafe {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                libc::_exit(1);
            }
            let mut p = libc::pollfd {
                fd: parent.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut p, 1, 0) != 0 {
                // The supervisor is already gone.
                libc::_exit(1);
            }
        }
        return Ok(());
    }
    drop(parent);
    supervise(child)
}

/// The supervisor: holds nothing, may do nothing but wait, and ends the way
/// its child ended.
fn supervise(child: libc::pid_t) -> ! {
    // Hold none of the backend's fds: the frontend must see EOF when the
    // backend exits. stdin, stdout and stderr stay.
    // SAFETY: close_range takes integers and only changes this process's fd table.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    privileges::drop_quietly();
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    if seccomp::install_supervisor(me).is_err() {
        // SAFETY: kill and _exit take integers; the child must not outlive
        // an unconfined supervisor.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::_exit(1);
        }
    }
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: wait4 writes only `status`, which lives across the call.
        let r = unsafe { libc::wait4(child, &mut status, 0, std::ptr::null_mut()) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // SAFETY: _exit takes an integer.
            unsafe { libc::_exit(1) };
        }
        if libc::WIFEXITED(status) {
            // SAFETY: _exit takes an integer.
            unsafe { libc::_exit(libc::WEXITSTATUS(status)) };
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            // SAFETY: signal, kill and _exit take integers; dying by the
            // child's signal reports it to whoever waits for this process.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                libc::kill(me, sig);
                libc::_exit(128 + sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_threaded_when_test_harness_runs_then_false() {
        // The test harness runs tests on threads of their own.
        let t = std::thread::spawn(single_threaded);
        assert!(!t.join().unwrap());
    }
}
