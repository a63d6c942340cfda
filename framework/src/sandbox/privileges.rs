//! Resource limits, user identity and capabilities.

use std::io;

use super::{Error, Report};

/// The unprivileged user and group a backend started as root becomes
/// (the kernel's default overflow id, `nobody`/`nogroup` on Debian).
pub(super) const NOBODY: libc::uid_t = 65534;

/// Upper bound on open files: memory-table fds, eventfds and data sockets
/// of the biggest device, with room to spare.
const MAX_FILES: libc::rlim_t = 4096;

/// Upper bound on threads in a backend's own user namespace (the kernel
/// counts RLIMIT_NPROC per user and user namespace): 64 queue threads and
/// the event loop, with room to spare. New processes are refused by seccomp.
const MAX_THREADS: libc::rlim_t = 256;

fn setrlimit(resource: libc::__rlimit_resource_t, value: libc::rlim_t) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct, which lives across the call.
    if unsafe { libc::setrlimit(resource, &lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn getrlimit(resource: libc::__rlimit_resource_t) -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct, which lives across the call.
    if unsafe { libc::getrlimit(resource, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

/// No core files; a bounded fd table.
pub(super) fn limit_resources(report: &mut Report) -> Result<(), Error> {
    setrlimit(libc::RLIMIT_CORE, 0).map_err(|e| Error::Rlimit("RLIMIT_CORE", e))?;
    let files = getrlimit(libc::RLIMIT_NOFILE)
        .map_err(|e| Error::Rlimit("RLIMIT_NOFILE", e))?
        .rlim_max
        .min(MAX_FILES);
    setrlimit(libc::RLIMIT_NOFILE, files).map_err(|e| Error::Rlimit("RLIMIT_NOFILE", e))?;
    report.applied(format!("rlimits (no core, {files} files)"));
    Ok(())
}

/// Drops every capability from the bounding set; EPERM (not allowed to)
/// and EINVAL (past the last capability) end the loop.
fn drop_bounding_set() -> io::Result<()> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINVAL) => Ok(()),
                _ => Err(e),
            };
        }
    }
    Ok(())
}

/// As root: drops the bounding set (while still allowed to), all
/// supplementary groups, and becomes [`NOBODY`] (which clears the
/// effective and permitted capabilities).
pub(super) fn become_nobody(report: &mut Report) -> Result<(), Error> {
    drop_bounding_set().map_err(|e| Error::Privileges("bounding set", e))?;
    // SAFETY: setgroups with size 0 reads no memory; setresgid and
    // setresuid take integers.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) < 0 {
            return Err(Error::Privileges("setgroups", io::Error::last_os_error()));
        }
        if libc::setresgid(NOBODY, NOBODY, NOBODY) < 0 {
            return Err(Error::Privileges("setresgid", io::Error::last_os_error()));
        }
        if libc::setresuid(NOBODY, NOBODY, NOBODY) < 0 {
            return Err(Error::Privileges("setresuid", io::Error::last_os_error()));
        }
    }
    report.applied(format!("uid/gid {NOBODY}, no groups"));
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Clears the effective, permitted and inheritable sets.
fn clear_capabilities() -> io::Result<()> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a version-3 header and two data words, both of
    // which live across the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(option, arg, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One step of dropping privileges.
type Step = fn() -> io::Result<()>;

/// The steps of [`drop_all`] after the bounding set, each named for its error.
const DROP_STEPS: [(&str, Step); 4] = [
    ("ambient capabilities", || {
        prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        )
    }),
    ("capset", clear_capabilities),
    ("no_new_privs", || prctl(libc::PR_SET_NO_NEW_PRIVS, 1)),
    ("dumpable", || prctl(libc::PR_SET_DUMPABLE, 0)),
];

/// Drops every capability in every set, forbids gaining privileges by
/// exec, and makes the process undumpable (no ptrace by same-uid peers,
/// /proc/PID owned by root). In a user namespace of its own, also bounds
/// its threads.
pub(super) fn drop_all(own_user: bool, report: &mut Report) -> Result<(), Error> {
    // Without CAP_SETPCAP the bounding set cannot shrink; the empty
    // permitted set below is what counts then.
    let _ = drop_bounding_set();
    for (what, step) in DROP_STEPS {
        step().map_err(|e| Error::Privileges(what, e))?;
    }
    report.applied("no capabilities, no_new_privs, not dumpable");
    if own_user {
        setrlimit(libc::RLIMIT_NPROC, MAX_THREADS).map_err(|e| Error::Rlimit("RLIMIT_NPROC", e))?;
        report.applied(format!("at most {MAX_THREADS} threads"));
    } else {
        report.refused(
            "thread limit",
            "RLIMIT_NPROC would count every process of the user",
        );
    }
    Ok(())
}

/// The parent-death signal set on this process (0: none) and the parent
/// it refers to.
#[derive(Debug, Clone, Copy)]
pub(super) struct ParentDeath {
    signal: libc::c_int,
    parent: libc::pid_t,
}

/// Reads the parent-death signal and the parent, before anything changes.
pub(super) fn parent_death() -> Result<ParentDeath, Error> {
    let mut signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int to the pointer, which lives
    // across the call.
    if unsafe {
        libc::prctl(
            libc::PR_GET_PDEATHSIG,
            &mut signal as *mut libc::c_int,
            0,
            0,
            0,
        )
    } < 0
    {
        return Err(Error::Privileges(
            "parent-death signal",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: getppid cannot fail.
    let parent = unsafe { libc::getppid() };
    Ok(ParentDeath { signal, parent })
}

/// Sets the parent-death signal again (a change of user clears it) and
/// fails if the parent has died meanwhile. A process that had none (started
/// by hand) is left as it is.
pub(super) fn restore_parent_death(was: ParentDeath) -> Result<(), Error> {
    if was.signal == 0 {
        return Ok(());
    }
    prctl(libc::PR_SET_PDEATHSIG, was.signal as libc::c_ulong)
        .map_err(|e| Error::Privileges("parent-death signal", e))?;
    // SAFETY: getppid cannot fail.
    if unsafe { libc::getppid() } != was.parent {
        return Err(Error::Privileges(
            "parent-death signal",
            io::Error::from_raw_os_error(libc::ESRCH),
        ));
    }
    Ok(())
}

/// [`drop_all`] for the supervisor, which has nothing to report to: every
/// step is tried whatever the others did.
pub(super) fn drop_quietly() {
    let _ = drop_bounding_set();
    for (_, step) in DROP_STEPS {
        let _ = step();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getrlimit_when_nofile_then_soft_not_above_hard() {
        let l = getrlimit(libc::RLIMIT_NOFILE).unwrap();
        assert!(l.rlim_cur <= l.rlim_max);
    }
}
