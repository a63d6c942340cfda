//! `outboard-scratch`: a register bank for tests and benchmarks.
//!
//! Region 0, `regs` (MMIO, 4 KiB, every access size, posted writes):
//!
//! | offset        | register    | access | meaning                                      |
//! |---------------|-------------|--------|----------------------------------------------|
//! | 0x000         | ID          | RO     | `0x4843_5452_4353_424f` ("OBSCRTCH" in LE bytes) |
//! | 0x008         | VERSION     | RO     | 1                                            |
//! | 0x010         | WRITE_COUNT | RO     | writes received, all regions, since reset    |
//! | 0x018         | ACCUM       | RW     | a write adds its value (wrapping); read: sum |
//! | 0x020         | LAST        | RO     | last value written anywhere                  |
//! | 0x100..0x200  | BANK        | RW     | 256 bytes of plain storage, little endian    |
//!
//! Region 1, `aux` (MMIO, 256 bytes) and region 2, `port` (PIO, 16 bytes)
//! are plain byte banks of their own, so tests can tell regions apart by
//! `user_data`. Every register is readable at 1, 2, 4 and 8 bytes: a
//! narrower read returns the addressed bytes of the little-endian value.
//! Unlisted offsets read as zero and ignore writes (the write still counts).

use std::convert::Infallible;
use std::ffi::OsString;
use std::process::ExitCode;

use outboard::{AccessSize, Device, DeviceKind, Region};

/// Value of the ID register.
pub const ID: u64 = u64::from_le_bytes(*b"OBSCRTCH");
/// Offset of the ID register.
pub const REG_ID: u64 = 0x000;
/// Offset of the VERSION register.
pub const REG_VERSION: u64 = 0x008;
/// Offset of the WRITE_COUNT register.
pub const REG_WRITE_COUNT: u64 = 0x010;
/// Offset of the ACCUM register.
pub const REG_ACCUM: u64 = 0x018;
/// Offset of the LAST register.
pub const REG_LAST: u64 = 0x020;
/// Offset of the byte bank in region 0.
pub const BANK: u64 = 0x100;
/// Size of the byte bank in region 0.
pub const BANK_SIZE: u64 = 0x100;
/// Size of region 0.
pub const REGS_SIZE: u64 = 0x1000;
/// Size of region 1.
pub const AUX_SIZE: u64 = 0x100;
/// Size of region 2.
pub const PORT_SIZE: u64 = 0x10;

/// `outboard-scratch`: a register bank for tests and benchmarks (no device options).
#[derive(Debug, clap::Args)]
pub struct ScratchArgs {}

/// The scratch device model.
#[derive(Debug, Clone)]
pub struct Scratch {
    write_count: u64,
    accum: u64,
    last: u64,
    bank: [u8; BANK_SIZE as usize],
    aux: [u8; AUX_SIZE as usize],
    port: [u8; PORT_SIZE as usize],
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            write_count: 0,
            accum: 0,
            last: 0,
            bank: [0; BANK_SIZE as usize],
            aux: [0; AUX_SIZE as usize],
            port: [0; PORT_SIZE as usize],
        }
    }
}

fn load(bytes: &[u8], offset: u64, size: AccessSize) -> u64 {
    let mut v = [0u8; 8];
    let start = offset as usize;
    let n = size.bytes() as usize;
    if let Some(src) = bytes.get(start..start + n) {
        v[..n].copy_from_slice(src);
    }
    u64::from_le_bytes(v)
}

fn store(bytes: &mut [u8], offset: u64, size: AccessSize, value: u64) {
    let start = offset as usize;
    let n = size.bytes() as usize;
    if let Some(dst) = bytes.get_mut(start..start + n) {
        dst.copy_from_slice(&value.to_le_bytes()[..n]);
    }
}

impl Scratch {
    fn registers(&self) -> [u8; 0x28] {
        let mut r = [0u8; 0x28];
        for (i, v) in [ID, 1, self.write_count, self.accum, self.last]
            .into_iter()
            .enumerate()
        {
            r[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        r
    }
}

impl Device for Scratch {
    fn name(&self) -> &str {
        "scratch"
    }

    fn kind(&self) -> DeviceKind {
        DeviceKind::SCRATCH
    }

    fn regions(&self) -> Vec<Region> {
        vec![
            Region::mmio("regs", REGS_SIZE).posted_writes(),
            Region::mmio("aux", AUX_SIZE).posted_writes(),
            Region::pio("port", PORT_SIZE).posted_writes(),
        ]
    }

    fn read(&mut self, region: u32, offset: u64, size: AccessSize) -> u64 {
        match region {
            0 if offset < BANK => load(&self.registers(), offset, size),
            0 => offset
                .checked_sub(BANK)
                .map_or(0, |o| load(&self.bank, o, size)),
            1 => load(&self.aux, offset, size),
            _ => load(&self.port, offset, size),
        }
    }

    fn write(&mut self, region: u32, offset: u64, size: AccessSize, value: u64) {
        self.write_count += 1;
        self.last = value;
        match region {
            0 if offset == REG_ACCUM => self.accum = self.accum.wrapping_add(value),
            0 if offset >= BANK => store(&mut self.bank, offset - BANK, size, value),
            0 => {}
            1 => store(&mut self.aux, offset, size, value),
            _ => store(&mut self.port, offset, size, value),
        }
    }

    fn reset(&mut self) {
        *self = Scratch::default();
    }
}

/// `main` of `outboard-scratch`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    outboard::run("outboard-scratch", args, |_: ScratchArgs| {
        Ok::<_, Infallible>(Scratch::default())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_id_when_narrow_then_addressed_bytes() {
        let mut s = Scratch::default();
        assert_eq!(s.read(0, REG_ID, AccessSize::B8), ID);
        assert_eq!(s.read(0, REG_ID, AccessSize::B1), u64::from(b'O'));
        assert_eq!(
            s.read(0, REG_ID + 4, AccessSize::B4),
            u64::from(u32::from_le_bytes(*b"RTCH"))
        );
    }

    #[test]
    fn write_bank_when_sizes_mixed_then_little_endian() {
        let mut s = Scratch::default();
        s.write(0, BANK, AccessSize::B8, 0x1122_3344_5566_7788);
        s.write(0, BANK + 1, AccessSize::B2, 0xaabb);
        assert_eq!(s.read(0, BANK, AccessSize::B8), 0x1122_3344_55aa_bb88);
        assert_eq!(s.read(0, REG_WRITE_COUNT, AccessSize::B8), 2);
        assert_eq!(s.read(0, REG_LAST, AccessSize::B8), 0xaabb);
    }

    #[test]
    fn accum_when_written_then_sums_and_reset_clears() {
        let mut s = Scratch::default();
        for v in 1..=10 {
            s.write(0, REG_ACCUM, AccessSize::B4, v);
        }
        assert_eq!(s.read(0, REG_ACCUM, AccessSize::B8), 55);
        s.write(2, 3, AccessSize::B1, 9);
        assert_eq!(s.read(2, 3, AccessSize::B1), 9);
        s.reset();
        assert_eq!(s.read(0, REG_ACCUM, AccessSize::B8), 0);
        assert_eq!(s.read(2, 3, AccessSize::B1), 0);
        assert_eq!(s.read(0, REG_ID, AccessSize::B8), ID);
    }
}
