//! Device state that outlives the backend process: [`DeviceState`], the
//! [`crate::Device`] hooks that save and restore it, and the
//! runtime's [`Keeper`], which commits a device's state into the
//! frontend-owned state area (SET_STATE_AREA, docs/protocol.md 5.14)
//! whenever it changed, before the backend answers the access that
//! changed it. A backend that is killed at any moment therefore leaves a
//! record of every state change the guest has seen an answer for; the
//! next instance restores it (RESTORE_STATE).
//!
//! The area's layout and the snapshot envelope (device kind, name and
//! state format version, checked on restore) are in
//! [`outboard_protocol::state`].

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;

use outboard_protocol::state::{self as area, Snapshot, MAX_AREA, MIN_AREA};
use thiserror::Error;

use crate::device::Device;

/// Why state cannot be saved or restored.
#[derive(Debug, Error)]
pub enum Error {
    /// the device keeps no state to restore
    #[error("the device keeps no state to restore")]
    Unsupported,
    /// state format {found} is not one this device reads (it reads {supported})
    #[error("state format {found} is not one this device reads (it reads {supported})")]
    Version {
        /// The version in the snapshot.
        found: u32,
        /// The version the device reads.
        supported: u32,
    },
    /// the saved state is invalid: {0}
    #[error("the saved state is invalid: {0}")]
    Invalid(&'static str),
    /// the state area or snapshot is unusable
    #[error("the state area or snapshot is unusable")]
    Area(#[source] area::Error),
    /// the state area is not a memfd sealed against shrinking, or has the wrong size
    #[error("the state area is not a memfd sealed against shrinking, or has the wrong size")]
    BadArea,
    /// cannot map the state area
    #[error("cannot map the state area")]
    Map(#[source] std::io::Error),
    /// no state area was set
    #[error("no state area was set")]
    NoArea,
}

/// A device's saved state: its own format version and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// The device's state format version.
    pub version: u32,
    /// The state.
    pub bytes: Vec<u8>,
}

impl DeviceState {
    /// A device's state `bytes` in its format `version`.
    pub fn new(version: u32, bytes: Vec<u8>) -> Self {
        DeviceState { version, bytes }
    }

    /// A reader over the state, once its version is the one the device
    /// reads.
    pub fn reader(&self, supported: u32) -> Result<Reader<'_>, Error> {
        if self.version != supported {
            return Err(Error::Version {
                found: self.version,
                supported,
            });
        }
        Ok(Reader::new(&self.bytes))
    }
}

/// Appends fields to a state buffer in host byte order.
#[derive(Debug, Default)]
pub struct Writer {
    /// The bytes so far.
    pub bytes: Vec<u8>,
}

impl Writer {
    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes.push(v);
        self
    }
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_ne_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_ne_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes.extend_from_slice(&v.to_ne_bytes());
        self
    }
    /// Appends a length (u32) and the bytes.
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.bytes
            .extend_from_slice(&b[..b.len().min(u32::MAX as usize)]);
        self
    }
}

pub use outboard_protocol::state::Reader;

/// Reads a length-prefixed blob written by [`Writer::blob`].
pub fn read_blob<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], Error> {
    let n = r.u32().map_err(Error::Area)? as usize;
    r.bytes(n).map_err(Error::Area)
}

/// The state area, mapped shared.
#[derive(Debug)]
struct Area {
    ptr: NonNull<u8>,
    len: usize,
    _file: File,
}

impl Area {
    fn map(fd: OwnedFd) -> Result<Self, Error> {
        let file = File::from(fd);
        let len = file.metadata().map_err(Error::Map)?.len();
        let len = usize::try_from(len).map_err(|_| Error::BadArea)?;
        if !(MIN_AREA..=MAX_AREA).contains(&len) || !crate::runtime::shrink_sealed(&file) {
            return Err(Error::BadArea);
        }
        // SAFETY: a fresh shared mapping of `len` bytes of an fd we own;
        // the file is sealed against shrinking, so every mapped page stays
        // backed (no SIGBUS), and the mapping lives as long as `Area`.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Map(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or(Error::BadArea)?;
        Ok(Area {
            ptr,
            len,
            _file: file,
        })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` maps `len` bytes for the life of `self`; only this
        // process's event loop writes it while it runs (the frontend hands
        // it to one backend at a time), and a concurrent writer could only
        // make the CRC fail, never make this access unsound for u8 data.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mapping is owned by `Area` alone and only reached through
// `&mut self`.
unsafe impl Send for Area {}

/// Keeps a device's state committed in the state area.
#[derive(Debug)]
pub struct Keeper {
    area: Area,
    name: String,
    kind: u32,
    committed: Option<u64>,
    /// False while the area holds a previous instance's record that
    /// RESTORE_STATE (or RESET, which discards it) has not dealt with:
    /// committing this instance's power-on state would overwrite it.
    armed: bool,
}

impl Keeper {
    /// Maps the state area `fd` for device `name` of `kind`; returns the
    /// keeper and whether the area already held a record.
    pub fn new(fd: OwnedFd, name: &str, kind: u32) -> Result<(Self, bool), Error> {
        let mut area = Area::map(fd)?;
        let had = area::open(area.bytes()).map_err(Error::Area)?;
        Ok((
            Keeper {
                area,
                name: name.to_owned(),
                kind,
                committed: None,
                armed: !had,
            },
            had,
        ))
    }

    /// Commits the device's state if its generation moved since the last
    /// commit. A failure is logged (the device goes on serving; only a
    /// later restart would miss the change).
    pub fn keep<D: Device + ?Sized>(&mut self, device: &D, served: &[u64]) {
        if !self.armed {
            return;
        }
        let generation = device.state_generation();
        if self.committed == Some(generation) {
            return;
        }
        let Some(state) = device.save() else {
            self.committed = Some(generation);
            return;
        };
        let record = self.record(state, served);
        match area::commit(self.area.bytes(), &record) {
            Ok(_) => self.committed = Some(generation),
            Err(e) => log::error!("{}: cannot commit state: {e}", self.name),
        }
    }

    /// Commits the device's state now, whatever its generation; for
    /// SAVE_STATE.
    pub fn save<D: Device + ?Sized>(&mut self, device: &D, served: &[u64]) -> Result<(), Error> {
        self.armed = true;
        self.committed = None;
        let state = device.save().ok_or(Error::Unsupported)?;
        let record = self.record(state, served);
        area::commit(self.area.bytes(), &record).map_err(Error::Area)?;
        self.committed = Some(device.state_generation());
        Ok(())
    }

    /// The envelope of `state` for this device, with the served counts.
    fn record(&self, state: DeviceState, served: &[u64]) -> Vec<u8> {
        Snapshot {
            kind: self.kind,
            name: self.name.clone(),
            version: state.version,
            served: served.to_vec(),
            state: state.bytes,
        }
        .encode()
    }

    /// Starts committing even though the area held a record (after RESET:
    /// the device starts over).
    pub fn arm(&mut self) {
        self.armed = true;
    }

    /// Restores `device` from the newest record; from then on its state
    /// is committed. Returns the record's served counts per region index
    /// (none from an empty area).
    pub fn restore<D: Device + ?Sized>(&mut self, device: &mut D) -> Result<Vec<u64>, Error> {
        // A copy: the frontend maps the area too, and what is checked must
        // be what is decoded.
        let copy = self.area.bytes().to_vec();
        let record = match area::latest(&copy) {
            Ok(r) => r,
            Err(area::Error::Empty) => {
                // The previous instance never changed state: power-on it is.
                log::info!(
                    "{}: the state area holds no record; starting fresh",
                    self.name
                );
                self.armed = true;
                return Ok(Vec::new());
            }
            Err(e) => return Err(Error::Area(e)),
        };
        let snap = Snapshot::decode(record).map_err(Error::Area)?;
        snap.check_device(&self.name, self.kind)
            .map_err(Error::Area)?;
        device.restore(&DeviceState {
            version: snap.version,
            bytes: snap.state,
        })?;
        // Committed after this request: a restored virtio device serves
        // its queues during the restore, and what it did then belongs in
        // the record as much as anything later.
        self.committed = None;
        self.armed = true;
        Ok(snap.served)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A memfd of `len` bytes, sealed against shrinking if `seal`.
    fn memfd(len: u64, seal: bool) -> OwnedFd {
        // SAFETY: a NUL-terminated name; flags are plain integers.
        let fd = unsafe { libc::memfd_create(c"state-test".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: memfd_create returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone().unwrap()).set_len(len).unwrap();
        if seal {
            // SAFETY: only adds seals to the memfd we own.
            let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
            assert_eq!(rc, 0);
        }
        fd
    }

    /// A device with one byte of state.
    #[derive(Default)]
    struct Counter {
        value: u8,
        generation: u64,
    }

    impl Device for Counter {
        fn describe(&self) -> crate::DeviceDescription {
            crate::DeviceDescription::new("counter")
        }
        fn read(&mut self, _: crate::Access) -> u64 {
            u64::from(self.value)
        }
        fn write(&mut self, _: crate::Access, v: u64) {
            self.value = v as u8;
            self.generation += 1;
        }
        fn reset(&mut self) {}
        fn save(&self) -> Option<DeviceState> {
            Some(DeviceState {
                version: 3,
                bytes: vec![self.value],
            })
        }
        fn restore(&mut self, s: &DeviceState) -> Result<(), Error> {
            if s.version != 3 {
                return Err(Error::Version {
                    found: s.version,
                    supported: 3,
                });
            }
            self.value = *s.bytes.first().ok_or(Error::Invalid("empty"))?;
            Ok(())
        }
        fn state_generation(&self) -> u64 {
            self.generation
        }
    }

    #[test]
    fn keeper_when_area_unsealed_or_too_small_then_bad_area() {
        assert!(matches!(
            Keeper::new(memfd(65536, false), "c", 1),
            Err(Error::BadArea)
        ));
        assert!(matches!(
            Keeper::new(memfd(1024, true), "c", 1),
            Err(Error::BadArea)
        ));
    }

    #[test]
    fn keeper_when_state_changes_then_next_instance_restores_it() {
        let area = memfd(65536, true);
        let (mut k, had) = Keeper::new(area.try_clone().unwrap(), "c", 1).unwrap();
        assert!(!had);
        let mut d = Counter::default();
        d.write(crate::Access::new(0, 0, crate::AccessSize::B1), 7);
        k.keep(&d, &[]);
        // The next instance: the record is there; its own power-on state
        // is not committed over it before it restores.
        let (mut k2, had) = Keeper::new(area.try_clone().unwrap(), "c", 1).unwrap();
        assert!(had);
        let fresh = Counter::default();
        k2.keep(&fresh, &[]);
        let mut d2 = Counter::default();
        k2.restore(&mut d2).unwrap();
        assert_eq!(d2.value, 7);
    }

    #[test]
    fn keeper_when_record_is_another_devices_then_refused() {
        let area = memfd(65536, true);
        let (mut k, _) = Keeper::new(area.try_clone().unwrap(), "c", 1).unwrap();
        let mut d = Counter::default();
        d.write(crate::Access::new(0, 0, crate::AccessSize::B1), 7);
        k.keep(&d, &[]);
        let (mut other, _) = Keeper::new(area.try_clone().unwrap(), "d", 1).unwrap();
        assert!(matches!(
            other.restore(&mut Counter::default()),
            Err(Error::Area(area::Error::OtherDevice { .. }))
        ));
        let (mut kind, _) = Keeper::new(area, "c", 2).unwrap();
        assert!(matches!(
            kind.restore(&mut Counter::default()),
            Err(Error::Area(area::Error::OtherDevice { .. }))
        ));
    }

    #[test]
    fn writer_when_fields_written_then_reader_reads_them_back() {
        let mut w = Writer::default();
        w.u8(1).u16(2).u32(3).u64(4).blob(b"xy");
        let mut r = Reader::new(&w.bytes);
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u16().unwrap(), 2);
        assert_eq!(r.u32().unwrap(), 3);
        assert_eq!(r.u64().unwrap(), 4);
        assert_eq!(read_blob(&mut r).unwrap(), b"xy");
        assert!(r.end().is_ok());
    }
}
