//! Guest memory shared with backends.
//!
//! Two ways in:
//!
//! * [`GuestRam`], Outboard's own: every RAM region is its own memfd, sealed
//!   against shrinking and growing (a backend that mapped it can never be
//!   made to fault by a later truncation), mapped in the frontend too with
//!   vm-memory; the same fds go to every backend that negotiated the memory
//!   table.
//! * Bring your own: [`memory_table`] builds the memory-table message from
//!   any vm-memory `GuestMemoryMmap` whose regions are file-backed (a VMM's
//!   existing guest memory). Backends accept any file but refuse memfds that
//!   can still shrink, so seal yours (`F_SEAL_SHRINK`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use outboard_protocol::control::{MemRegion, MemTable, MAX_MEM_REGIONS};
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Errors creating guest RAM.
#[derive(Debug, Error)]
pub enum Error {
    /// cannot create a memfd
    #[error("cannot create a memfd")]
    Memfd(#[source] io::Error),
    /// cannot size or seal the memfd
    #[error("cannot size or seal the memfd")]
    Seal(#[source] io::Error),
    /// guest memory region at {0:#x} is not backed by a file
    #[error("guest memory region at {0:#x} is not backed by a file")]
    NotFileBacked(u64),
    /// guest memory region at {0:#x} is not a memfd sealed against shrinking
    #[error("guest memory region at {0:#x} is not a memfd sealed against shrinking")]
    NotSealed(u64),
    /// guest memory has {0} regions, more than a memory table holds
    #[error("guest memory has {0} regions, more than a memory table holds")]
    TooManyRegions(usize),
    /// invalid RAM layout: {0}
    #[error("invalid RAM layout: {0}")]
    Layout(&'static str),
    /// cannot map guest RAM
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// One RAM region and its memfd.
#[derive(Debug)]
struct RamRegion {
    addr: u64,
    size: u64,
    file: File,
}

/// Guest RAM: memfd regions, mapped in the frontend too.
#[derive(Debug)]
pub struct GuestRam {
    regions: Vec<RamRegion>,
    memory: GuestMemoryMmap<()>,
}

impl GuestRam {
    /// Allocates RAM for `(guest address, size)` regions, sorted and
    /// non-overlapping, at most [`MAX_MEM_REGIONS`] of them.
    pub fn new(layout: &[(u64, u64)]) -> Result<Self, Error> {
        if layout.is_empty() || layout.len() > MAX_MEM_REGIONS {
            return Err(Error::Layout("between 1 and 8 regions"));
        }
        let empty = GuestRam {
            regions: Vec::new(),
            memory: GuestMemoryMmap::new(),
        };
        empty.extend(layout)
    }

    /// The frontend's own mapping of guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.memory
    }

    /// The memory-table message and its fds, in entry order.
    pub fn table(&self) -> (MemTable, Vec<RawFd>) {
        let regions = self
            .regions
            .iter()
            .map(|r| MemRegion {
                guest_addr: r.addr,
                size: r.size,
                fd_offset: 0,
            })
            .collect();
        let fds = self.regions.iter().map(|r| r.file.as_raw_fd()).collect();
        (MemTable { regions }, fds)
    }

    /// New guest RAM that keeps every region of this one (the same memfds,
    /// so their contents and anyone's mappings of them stay valid) and adds
    /// `more` regions, as memory hotplug does.
    pub fn extend(&self, more: &[(u64, u64)]) -> Result<GuestRam, Error> {
        let mut layout: Vec<(u64, u64, Option<&File>)> = self
            .regions
            .iter()
            .map(|r| (r.addr, r.size, Some(&r.file)))
            .chain(more.iter().map(|&(a, s)| (a, s, None)))
            .collect();
        layout.sort_by_key(|&(a, _, _)| a);
        if layout.len() > MAX_MEM_REGIONS {
            return Err(Error::Layout("between 1 and 8 regions"));
        }
        let mut regions = Vec::with_capacity(layout.len());
        let mut prev_end: Option<u64> = None;
        for (addr, size, file) in layout {
            let last = size
                .checked_sub(1)
                .and_then(|s| addr.checked_add(s))
                .ok_or(Error::Layout("empty or wrapping region"))?;
            // Backends refuse entries that are not page-aligned (docs/protocol.md 5.8).
            if (addr | size) & (page_size() - 1) != 0 || last == u64::MAX {
                return Err(Error::Layout("region not page-aligned, or ends at 2^64"));
            }
            if prev_end.is_some_and(|p| p >= addr) {
                return Err(Error::Layout("regions unsorted or overlapping"));
            }
            prev_end = Some(last);
            let file = match file {
                Some(f) => f.try_clone().map_err(Error::Memfd)?,
                None => sealed_memfd(size)?,
            };
            regions.push(RamRegion { addr, size, file });
        }
        GuestRam::from_regions(regions)
    }

    fn from_regions(regions: Vec<RamRegion>) -> Result<GuestRam, Error> {
        let ranges = regions
            .iter()
            .map(|r| {
                let file = r.file.try_clone().map_err(Error::Memfd)?;
                Ok((
                    GuestAddress(r.addr),
                    r.size as usize,
                    Some(FileOffset::new(file, 0)),
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(Error::Map)?;
        Ok(GuestRam { regions, memory })
    }

    /// `(guest address, size)` of every region.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.addr, r.size)).collect()
    }
}

/// The memory-table message for any file-backed guest memory, with its fds
/// (borrowed from `mem`: keep it alive until the message is sent).
pub fn memory_table<B: vm_memory::bitmap::Bitmap>(
    mem: &GuestMemoryMmap<B>,
) -> Result<(MemTable, Vec<RawFd>), Error> {
    let mut regions = Vec::new();
    let mut fds = Vec::new();
    for r in mem.iter() {
        let addr = r.start_addr().0;
        let fo = r.file_offset().ok_or(Error::NotFileBacked(addr))?;
        // SAFETY: F_GET_SEALS only queries the seals of an open fd.
        let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            // Backends refuse it (BadFd): one truncate would crash them.
            return Err(Error::NotSealed(addr));
        }
        regions.push(MemRegion {
            guest_addr: addr,
            size: r.len(),
            fd_offset: fo.start(),
        });
        fds.push(fo.file().as_raw_fd());
    }
    if regions.is_empty() || regions.len() > MAX_MEM_REGIONS {
        return Err(Error::TooManyRegions(regions.len()));
    }
    Ok((MemTable { regions }, fds))
}

/// The host's page size.
fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two())
        .unwrap_or(4096)
}

fn sealed_memfd(size: u64) -> Result<File, Error> {
    named_sealed_memfd("outboard-guest-ram", size)
}

/// A memfd of `size` bytes named `name`, sealed against shrinking, growing
/// and further sealing (the state area of [`crate::device`] restarts, say).
pub(crate) fn sealed_area(name: &str, size: u64) -> io::Result<std::os::fd::OwnedFd> {
    named_sealed_memfd(name, size)
        .map(std::os::fd::OwnedFd::from)
        .map_err(|e| match e {
            Error::Memfd(e) | Error::Seal(e) => e,
            other => io::Error::other(other.to_string()),
        })
}

fn named_sealed_memfd(name: &str, size: u64) -> Result<File, Error> {
    let name = CString::new(name).map_err(|_| Error::Layout("name"))?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call;
    // the flags are plain integers.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(Error::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(Error::Seal)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS only changes the seals of a memfd we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::Seal(io::Error::last_os_error()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn new_when_layout_valid_then_mapped_and_sealed() {
        let ram =
            GuestRam::new(&[(0, 0x10000), (0x100000, 0x1000)]).unwrap_or_else(|e| panic!("{e}"));
        ram.memory()
            .write_obj(0xabcd_u64, GuestAddress(0x100008))
            .unwrap_or_else(|e| panic!("{e}"));
        let (table, fds) = ram.table();
        assert_eq!(table.regions.len(), 2);
        assert_eq!(fds.len(), 2);
        // SAFETY: F_GET_SEALS only queries the fd.
        let seals = unsafe { libc::fcntl(fds[0], libc::F_GET_SEALS) };
        assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
        assert!(ram.regions[0].file.set_len(1).is_err(), "cannot shrink");
    }

    #[test]
    fn memory_table_when_file_backed_then_entries_and_fds_else_error() {
        let ram = GuestRam::new(&[(0, 0x10000)]).unwrap_or_else(|e| panic!("{e}"));
        let (table, fds) = memory_table(ram.memory()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(table, ram.table().0);
        assert_eq!(fds.len(), 1);
        let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x1000)])
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            memory_table(&anon),
            Err(Error::NotFileBacked(0x1000))
        ));
        // A file that can still shrink (here an unsealed memfd).
        let name = CString::new("unsealed").unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: memfd_create with a valid name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh fd nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(0x1000).unwrap_or_else(|e| panic!("{e}"));
        let unsealed = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0x2000),
            0x1000,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            memory_table(&unsealed),
            Err(Error::NotSealed(0x2000))
        ));
    }

    #[test]
    fn new_when_layout_bad_then_error() {
        assert!(matches!(GuestRam::new(&[]), Err(Error::Layout(_))));
        assert!(matches!(
            GuestRam::new(&[(0, 0x2000), (0x1000, 0x1000)]),
            Err(Error::Layout(_))
        ));
        assert!(matches!(GuestRam::new(&[(0, 0)]), Err(Error::Layout(_))));
        assert!(matches!(
            GuestRam::new(&[(0, 0x1800)]),
            Err(Error::Layout("region not page-aligned, or ends at 2^64"))
        ));
    }
}
