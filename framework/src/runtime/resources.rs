//! Resources the frontend hands over on the control socket: the guest
//! memory table, doorbell eventfds, interrupt and resample eventfds, and
//! the checks every such fd must pass before the backend uses it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

use log::{debug, info, warn};
use outboard_protocol::control::{MemTable, Status};
use thiserror::Error;
use vm_memory::mmap::FromRangesError;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Doorbell, GuestMemory, Interrupt, InterruptLine};
use crate::events::{token, Epoll};

/// Why a resource was refused; [`Error::status`] is what the frontend hears.
#[derive(Debug, Error)]
pub enum Error {
    /// fd is not an eventfd
    #[error("fd is not an eventfd")]
    NotEventfd,
    /// cannot make the eventfd non-blocking
    #[error("cannot make the eventfd non-blocking")]
    Flags(#[source] io::Error),
    /// cannot inspect the memory fd
    #[error("cannot inspect the memory fd")]
    Stat(#[source] io::Error),
    /// memory fd holds {len} bytes, the entry needs {end}
    #[error("memory fd holds {len} bytes, the entry needs {end}")]
    TooShort {
        /// Size of the fd.
        len: u64,
        /// `fd_offset + size` of the entry.
        end: u64,
    },
    /// memory fd is not sealed against shrinking
    #[error("memory fd is not sealed against shrinking")]
    NotSealed,
    /// memory entry does not fit this backend's address space
    #[error("memory entry does not fit this backend's address space")]
    TooLarge,
    /// cannot map the memory table
    #[error("cannot map the memory table")]
    Map(#[source] FromRangesError),
    /// index {0} is out of range
    #[error("index {0} is out of range")]
    BadIndex(usize),
    /// resample requested for the edge-triggered line {0}
    #[error("resample requested for the edge-triggered line {0}")]
    ResampleOnEdge(usize),
    /// cannot watch the fd
    #[error("cannot watch the fd")]
    Watch(#[source] io::Error),
}

impl Error {
    /// The status that refuses the request (docs/protocol.md sections 5.8-5.10).
    pub fn status(&self) -> Status {
        match self {
            Error::NotEventfd | Error::Flags(_) | Error::Stat(_) => Status::BadFd,
            Error::TooShort { .. } | Error::NotSealed => Status::BadFd,
            Error::TooLarge => Status::BadPayload,
            Error::Map(_) | Error::Watch(_) => Status::DeviceError,
            Error::BadIndex(_) => Status::BadRegionIndex,
            Error::ResampleOnEdge(_) => Status::Unsupported,
        }
    }
}

/// Guest memory and the device's doorbell and interrupt fds.
#[derive(Debug)]
pub(crate) struct Resources {
    memory: GuestMemory,
    doorbells: Vec<Doorbell>,
    doorbell_fds: Vec<Option<EventFd>>,
    interrupts: Vec<Interrupt>,
    resample_fds: Vec<Option<EventFd>>,
}

impl Resources {
    /// No memory table and no fds yet for the declared doorbells and lines.
    pub(crate) fn new(doorbells: Vec<Doorbell>, interrupts: Vec<Interrupt>) -> Self {
        Resources {
            memory: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            doorbell_fds: doorbells.iter().map(|_| None).collect(),
            doorbells,
            resample_fds: interrupts.iter().map(|_| None).collect(),
            interrupts,
        }
    }

    /// The guest memory handle (its contents change with each table).
    pub(crate) fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The declared doorbells.
    pub(crate) fn doorbells(&self) -> &[Doorbell] {
        &self.doorbells
    }

    /// The declared interrupt lines.
    pub(crate) fn interrupts(&self) -> &[Interrupt] {
        &self.interrupts
    }

    /// SET_MEM_TABLE: maps every entry and swaps the new table in; on any
    /// error the previous table stays.
    pub(crate) fn set_memory_table(
        &self,
        table: &MemTable,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        let mem = map_table(table, fds)?;
        match self.memory.lock() {
            Ok(guard) => guard.replace(mem),
            Err(poisoned) => poisoned.into_inner().replace(mem),
        }
        info!("memory table set: {} regions", table.regions.len());
        Ok(())
    }

    /// SET_DOORBELL: watches `fd` for doorbell `index`, replacing (and
    /// closing) a previous one only once the new one is watched.
    pub(crate) fn set_doorbell(
        &mut self,
        index: usize,
        fd: OwnedFd,
        epoll: &Epoll,
    ) -> Result<(), Error> {
        if index >= self.doorbells.len() {
            return Err(Error::BadIndex(index));
        }
        let efd = eventfd_from(fd)?;
        epoll
            .add(efd.as_raw_fd(), token::DOORBELL | index as u64)
            .map_err(Error::Watch)?;
        if let Some(old) = self.doorbell_fds[index].replace(efd) {
            unwatch(epoll, &old);
        }
        debug!("doorbell {index} connected");
        Ok(())
    }

    /// SET_IRQ: checks line `index`'s fds and watches the resample eventfd;
    /// returns the line for the device.
    pub(crate) fn set_irq(
        &mut self,
        index: usize,
        fd: OwnedFd,
        resample: Option<OwnedFd>,
        epoll: &Epoll,
    ) -> Result<InterruptLine, Error> {
        let irq = *self.interrupts.get(index).ok_or(Error::BadIndex(index))?;
        if resample.is_some() && !irq.level {
            return Err(Error::ResampleOnEdge(index));
        }
        let line = eventfd_from(fd)?;
        let resample = resample.map(eventfd_from).transpose()?;
        if let Some(r) = &resample {
            epoll
                .add(r.as_raw_fd(), token::RESAMPLE | index as u64)
                .map_err(Error::Watch)?;
        }
        if let Some(old) = std::mem::replace(&mut self.resample_fds[index], resample) {
            unwatch(epoll, &old);
        }
        debug!("interrupt {index} connected");
        Ok(InterruptLine::new(line))
    }

    /// Reads doorbell `index`'s count: how many rings since the last read.
    pub(crate) fn take_doorbell(&self, index: usize) -> Option<u64> {
        read_counter(self.doorbell_fds.get(index)?.as_ref()?, "doorbell", index)
    }

    /// Reads line `index`'s resample eventfd: true when the guest ended a
    /// level interrupt since the last read.
    pub(crate) fn take_resample(&self, index: usize) -> bool {
        self.resample_fds
            .get(index)
            .and_then(Option::as_ref)
            .and_then(|fd| read_counter(fd, "resample of interrupt", index))
            .is_some()
    }
}

/// An eventfd's counter; errors other than "nothing yet" are logged, never fatal.
fn read_counter(fd: &EventFd, what: &str, index: usize) -> Option<u64> {
    match fd.read() {
        Ok(n) => Some(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        Err(e) => {
            warn!("{what} {index}: {e}");
            None
        }
    }
}

fn unwatch(epoll: &Epoll, fd: &EventFd) {
    if let Err(e) = epoll.remove(fd.as_raw_fd()) {
        warn!("cannot stop watching fd {}: {e}", fd.as_raw_fd());
    }
}

/// Maps each entry's fd, checking that it is long enough and, for a memfd,
/// sealed against shrinking, so that the frontend cannot turn the mapping
/// into SIGBUS later.
pub(crate) fn map_table(table: &MemTable, fds: Vec<OwnedFd>) -> Result<GuestMemoryMmap<()>, Error> {
    let mut ranges = Vec::with_capacity(fds.len());
    for (r, fd) in table.regions.iter().zip(fds) {
        let file = File::from(fd);
        let len = file.metadata().map_err(Error::Stat)?.len();
        let end = r.fd_offset.checked_add(r.size).ok_or(Error::TooLarge)?;
        if end > len {
            return Err(Error::TooShort { len, end });
        }
        if !shrink_sealed(&file) {
            return Err(Error::NotSealed);
        }
        let size = usize::try_from(r.size).map_err(|_| Error::TooLarge)?;
        ranges.push((
            GuestAddress(r.guest_addr),
            size,
            Some(FileOffset::new(file, r.fd_offset)),
        ));
    }
    GuestMemoryMmap::<()>::from_ranges_with_files(ranges).map_err(Error::Map)
}

/// The host's page size: memory-table entries must be aligned to it
/// (docs/protocol.md section 5.8).
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two())
        .unwrap_or(4096)
}

/// The device and inode numbers of `fd` (`fstat`).
pub(super) fn identity(fd: &impl AsRawFd) -> io::Result<(u64, u64)> {
    // SAFETY: stat is plain data; fstat writes only the struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd we hold, writing the struct above.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

/// True when `fd` is an eventfd. Checked without /proc, which a confined
/// backend cannot see: eventfds share the kernel's anonymous inode (the one
/// a fresh eventfd of ours has), and among the files on that inode only an
/// eventfd accepts an 8-byte write (adding 0 leaves its counter as it was;
/// epoll, timerfd, signalfd and the rest have no write or refuse it).
fn is_eventfd(fd: &OwnedFd) -> bool {
    let Ok(probe) = EventFd::new(libc::EFD_NONBLOCK) else {
        return false;
    };
    match (identity(fd), identity(&probe)) {
        (Ok(ours), Ok(eventfd)) if ours == eventfd => {}
        _ => return false,
    }
    let zero = 0u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live array to an fd we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), zero.as_ptr().cast(), zero.len()) };
    n == 8
}

/// Takes an fd as an eventfd (see [`is_eventfd`]), made non-blocking.
pub(crate) fn eventfd_from(fd: OwnedFd) -> Result<EventFd, Error> {
    if !is_eventfd(&fd) {
        return Err(Error::NotEventfd);
    }
    // SAFETY: F_GETFL only reads the file status flags of an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::Flags(io::Error::last_os_error()));
    }
    // SAFETY: F_SETFL only changes the file status flags of an fd we own.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(Error::Flags(io::Error::last_os_error()));
    }
    // SAFETY: the fd is an open eventfd (checked above) and `into_raw_fd`
    // gives up our ownership, so the EventFd becomes its only owner.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

/// True when `file` carries F_SEAL_SHRINK, so that nobody can truncate it
/// under our mapping (an access past a truncated end is SIGBUS). A file
/// that does not support seals (a regular file on a disk file system:
/// F_GET_SEALS fails) offers no such guarantee and is refused.
pub(crate) fn shrink_sealed(file: &File) -> bool {
    // SAFETY: F_GET_SEALS only queries the seals of an open fd.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// True when `fd` is a stream socket (the command line's check of a
/// control fd; data sockets get the stricter `sockcheck`).
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn is_stream_socket(fd: &impl AsFd) -> bool {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `ty` and `len` are live locals of the sizes passed; the fd is
    // open for the duration of the borrow.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && ty == libc::SOCK_STREAM
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_protocol::control::MemRegion;
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use vm_memory::{Bytes, GuestAddressSpace};

    /// A memfd of `len` bytes, sealed against shrinking if `seal`.
    fn memfd(len: u64, seal: bool) -> OwnedFd {
        let name = c"outboard-test";
        // SAFETY: `name` is a NUL-terminated string that outlives the call.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .set_len(len)
            .unwrap_or_else(|e| panic!("{e}"));
        if seal {
            // SAFETY: F_ADD_SEALS only changes the seals of the memfd we own.
            let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            assert_eq!(rc, 0);
        }
        fd
    }

    fn table(size: u64) -> MemTable {
        MemTable {
            regions: vec![MemRegion {
                guest_addr: 0x10_0000,
                size,
                fd_offset: 0,
            }],
        }
    }

    fn eventfd() -> OwnedFd {
        let e = EventFd::new(0).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: into_raw_fd gives up the EventFd's ownership of its open fd.
        unsafe { OwnedFd::from_raw_fd(e.into_raw_fd()) }
    }

    fn resources() -> (Resources, Epoll) {
        let r = Resources::new(
            vec![Doorbell {
                region: 0,
                offset: 0,
                size: None,
                datamatch: None,
            }],
            vec![Interrupt { level: false }, Interrupt { level: true }],
        );
        (r, Epoll::new().unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn memory_table_when_sealed_memfd_then_mapped_and_swapped_in() {
        let (r, _) = resources();
        r.set_memory_table(&table(0x1000), vec![memfd(0x1000, true)])
            .unwrap_or_else(|e| panic!("{e}"));
        let mem = r.memory().memory();
        mem.write_obj(0xabu8, GuestAddress(0x10_0fff))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(mem.write_obj(0u8, GuestAddress(0x10_1000)).is_err());
    }

    #[test]
    fn memory_table_when_unsealed_or_short_then_bad_fd_and_old_table_kept() {
        let (r, _) = resources();
        let e = r.set_memory_table(&table(0x1000), vec![memfd(0x1000, false)]);
        assert!(matches!(e, Err(Error::NotSealed)));
        let e = r.set_memory_table(&table(0x2000), vec![memfd(0x1000, true)]);
        assert!(matches!(
            e,
            Err(Error::TooShort {
                len: 0x1000,
                end: 0x2000
            })
        ));
        assert_eq!(e.map_err(|e| e.status()), Err(Status::BadFd));
        assert!(r
            .memory()
            .memory()
            .write_obj(0u8, GuestAddress(0x10_0000))
            .is_err());
    }

    #[test]
    fn eventfd_from_when_not_an_eventfd_then_refused() {
        let (a, _b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(eventfd_from(a.into()), Err(Error::NotEventfd)));
        // Other files on the anonymous inode, and a pipe, are refused too.
        // SAFETY: each call returns a new fd (or -1) that we own at once.
        let others = unsafe {
            let mut pipe = [0; 2];
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            libc::close(pipe[0]);
            [
                libc::epoll_create1(0),
                libc::timerfd_create(libc::CLOCK_MONOTONIC, 0),
                pipe[1],
            ]
        };
        for fd in others {
            assert!(fd >= 0);
            // SAFETY: `fd` was just created above and is owned only here.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            assert!(matches!(eventfd_from(owned), Err(Error::NotEventfd)));
        }
        let e = eventfd_from(eventfd()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            e.read().map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::WouldBlock),
            "made non-blocking"
        );
    }

    #[test]
    fn doorbell_when_rung_twice_then_one_coalesced_count() {
        let (mut r, ep) = resources();
        let fd = eventfd();
        let ring = fd.try_clone().unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: the clone is an open eventfd this test owns.
        let ring = unsafe { EventFd::from_raw_fd(ring.into_raw_fd()) };
        assert!(matches!(
            r.set_doorbell(1, eventfd(), &ep),
            Err(Error::BadIndex(1))
        ));
        r.set_doorbell(0, fd, &ep).unwrap_or_else(|e| panic!("{e}"));
        ring.write(1).unwrap_or_else(|e| panic!("{e}"));
        ring.write(1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.take_doorbell(0), Some(2));
        assert_eq!(r.take_doorbell(0), None);
        assert_eq!(r.take_doorbell(7), None);
    }

    #[test]
    fn set_irq_when_resample_on_edge_line_then_unsupported() {
        let (mut r, ep) = resources();
        let e = r.set_irq(0, eventfd(), Some(eventfd()), &ep);
        assert_eq!(e.err().map(|e| e.status()), Some(Status::Unsupported));
        let e = r.set_irq(2, eventfd(), None, &ep);
        assert_eq!(e.err().map(|e| e.status()), Some(Status::BadRegionIndex));
        assert!(r.set_irq(1, eventfd(), Some(eventfd()), &ep).is_ok());
        assert!(!r.take_resample(1), "nothing signalled yet");
        assert!(r.set_irq(0, eventfd(), None, &ep).is_ok());
    }

    #[test]
    fn is_stream_socket_when_datagram_then_false() {
        let (a, _b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let (c, _d) = UnixDatagram::pair().unwrap_or_else(|e| panic!("{e}"));
        assert!(is_stream_socket(&a));
        assert!(!is_stream_socket(&c));
    }
}
