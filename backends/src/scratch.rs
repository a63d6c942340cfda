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
//! | 0x028         | DB0         | WO     | doorbell 0 (4-byte writes, any value)        |
//! | 0x030         | DB0_COUNT   | RO     | doorbell 0 rings received (coalesced sum)    |
//! | 0x038         | DB0_WAKEUPS | RO     | times the backend woke for doorbell 0        |
//! | 0x040         | DB1         | WO     | doorbell 1 (4-byte writes of 0x1234 only)    |
//! | 0x048         | DB1_COUNT   | RO     | doorbell 1 rings received                    |
//! | 0x050         | DB1_MISSES  | RO     | writes to DB1 that came as data commands     |
//! | 0x058         | IRQ_RAISE   | WO     | raise edge interrupt line 0 this many times  |
//! | 0x060         | IRQ_LEVEL   | RW     | level of interrupt line 1 (0 or 1)           |
//! | 0x068         | MEM_ADDR    | RW     | guest-physical address for MEM_DATA          |
//! | 0x070         | MEM_DATA    | RW     | 8 bytes of guest memory at MEM_ADDR; all-ones if unmapped |
//! | 0x078         | DB2_COUNT   | RO     | rings of doorbell 2 (the `kick` region)      |
//! | 0x080         | LAST_VCPU   | RO     | 1 + the vCPU of the last write; 0 if unknown |
//! | 0x100..0x200  | BANK        | RW     | 256 bytes of plain storage, little endian    |
//!
//! Region 1, `aux` (MMIO, 256 bytes) and region 2, `port` (PIO, 16 bytes)
//! are plain byte banks of their own, so tests can tell regions apart by
//! `user_data`. Region 3, `kick` (MMIO, 8 bytes, write-only FAST_MMIO),
//! carries sizeless doorbell 2: any write at offset 0 rings it, whatever its
//! size or value. Interrupt line 0 is edge-triggered, line 1 level-triggered
//! and re-raised on resample while IRQ_LEVEL is 1. Every register is
//! readable at 1, 2, 4 and 8 bytes: a narrower read returns the addressed
//! bytes of the little-endian value. Unlisted offsets read as zero and
//! ignore writes (the write still counts).

use std::convert::Infallible;
use std::ffi::OsString;
use std::process::ExitCode;

use log::warn;
use outboard::{
    Access, AccessSize, Device, DeviceDescription, DeviceKind, Doorbell, GuestMemory, Interrupt,
    InterruptLine, Region,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

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
/// Offset of doorbell 0.
pub const REG_DB0: u64 = 0x028;
/// Offset of the DB0_COUNT register.
pub const REG_DB0_COUNT: u64 = 0x030;
/// Offset of the DB0_WAKEUPS register.
pub const REG_DB0_WAKEUPS: u64 = 0x038;
/// Offset of doorbell 1 (datamatch [`DB1_MATCH`]).
pub const REG_DB1: u64 = 0x040;
/// Value doorbell 1 matches.
pub const DB1_MATCH: u64 = 0x1234;
/// Offset of the DB1_COUNT register.
pub const REG_DB1_COUNT: u64 = 0x048;
/// Offset of the DB1_MISSES register.
pub const REG_DB1_MISSES: u64 = 0x050;
/// Offset of the IRQ_RAISE register.
pub const REG_IRQ_RAISE: u64 = 0x058;
/// Offset of the IRQ_LEVEL register.
pub const REG_IRQ_LEVEL: u64 = 0x060;
/// Offset of the MEM_ADDR register.
pub const REG_MEM_ADDR: u64 = 0x068;
/// Offset of the MEM_DATA register.
pub const REG_MEM_DATA: u64 = 0x070;
/// Offset of the DB2_COUNT register.
pub const REG_DB2_COUNT: u64 = 0x078;
/// Offset of the LAST_VCPU register.
pub const REG_LAST_VCPU: u64 = 0x080;
const REGISTERS: usize = 0x88;
/// Size of region 3 (`kick`).
pub const KICK_SIZE: u64 = 8;
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
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    state: State,
    memory: Option<GuestMemory>,
    lines: [Option<InterruptLine>; 2],
}

/// Everything a reset clears.
#[derive(Debug, Clone)]
struct State {
    write_count: u64,
    accum: u64,
    last: u64,
    db0_count: u64,
    db0_wakeups: u64,
    db1_count: u64,
    db1_misses: u64,
    db2_count: u64,
    irq_level: u64,
    mem_addr: u64,
    last_vcpu: u64,
    bank: [u8; BANK_SIZE as usize],
    aux: [u8; AUX_SIZE as usize],
    port: [u8; PORT_SIZE as usize],
}

impl Default for State {
    fn default() -> Self {
        State {
            write_count: 0,
            accum: 0,
            last: 0,
            db0_count: 0,
            db0_wakeups: 0,
            db1_count: 0,
            db1_misses: 0,
            db2_count: 0,
            irq_level: 0,
            mem_addr: 0,
            last_vcpu: 0,
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
    fn registers(&self) -> [u8; REGISTERS] {
        let s = &self.state;
        let mut r = [0u8; REGISTERS];
        let values = [
            ID,
            1,
            s.write_count,
            s.accum,
            s.last,
            0,
            s.db0_count,
            s.db0_wakeups,
            0,
            s.db1_count,
            s.db1_misses,
            0,
            s.irq_level,
            s.mem_addr,
            self.mem_data(),
            s.db2_count,
            s.last_vcpu,
        ];
        for (i, v) in values.into_iter().enumerate() {
            r[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        r
    }

    fn mem_data(&self) -> u64 {
        let Some(mem) = &self.memory else {
            return u64::MAX;
        };
        mem.memory()
            .read_obj::<u64>(GuestAddress(self.state.mem_addr))
            .unwrap_or(u64::MAX)
    }

    fn raise(&self, line: usize) {
        if let Some(l) = &self.lines[line] {
            if let Err(e) = l.trigger() {
                warn!("interrupt line {line}: {e}");
            }
        }
    }
}

impl Device for Scratch {
    fn describe(&self) -> DeviceDescription {
        DeviceDescription::new("scratch")
            .kind(DeviceKind::SCRATCH)
            .region(Region::mmio("regs", REGS_SIZE).posted_writes())
            .region(Region::mmio("aux", AUX_SIZE).posted_writes())
            .region(Region::pio("port", PORT_SIZE).posted_writes())
            .region(Region::mmio("kick", KICK_SIZE).write_only().fast_mmio())
            .doorbell(Doorbell {
                region: 0,
                offset: REG_DB0,
                size: Some(AccessSize::B4),
                datamatch: None,
            })
            .doorbell(Doorbell {
                region: 0,
                offset: REG_DB1,
                size: Some(AccessSize::B4),
                datamatch: Some(DB1_MATCH),
            })
            .doorbell(Doorbell {
                region: 3,
                offset: 0,
                size: None,
                datamatch: None,
            })
            .interrupt(Interrupt { level: false })
            .interrupt(Interrupt { level: true })
            .needs_memory()
    }

    fn doorbell(&mut self, index: usize, count: u64) {
        let s = &mut self.state;
        match index {
            0 => {
                s.db0_count += count;
                s.db0_wakeups += 1;
            }
            1 => s.db1_count += count,
            _ => s.db2_count += count,
        }
    }

    fn connect_interrupt(&mut self, index: usize, line: InterruptLine) {
        if let Some(slot) = self.lines.get_mut(index) {
            *slot = Some(line);
        }
    }

    fn resample(&mut self, index: usize) {
        if index == 1 && self.state.irq_level != 0 {
            self.raise(1);
        }
    }

    fn set_memory(&mut self, mem: GuestMemory) {
        self.memory = Some(mem);
    }

    fn read(&mut self, access: Access) -> u64 {
        let Access {
            region,
            offset,
            size,
            ..
        } = access;
        match region {
            0 if offset < BANK => load(&self.registers(), offset, size),
            0 => offset
                .checked_sub(BANK)
                .map_or(0, |o| load(&self.state.bank, o, size)),
            1 => load(&self.state.aux, offset, size),
            2 => load(&self.state.port, offset, size),
            _ => 0,
        }
    }

    fn write(&mut self, access: Access, value: u64) {
        let Access {
            region,
            offset,
            size,
            vcpu,
        } = access;
        let s = &mut self.state;
        s.last_vcpu = vcpu.map_or(0, |v| u64::from(v) + 1);
        s.write_count += 1;
        s.last = value;
        match (region, offset) {
            (0, REG_ACCUM) => s.accum = s.accum.wrapping_add(value),
            (0, REG_DB1) => s.db1_misses += 1,
            (0, REG_IRQ_RAISE) => {
                for _ in 0..value.min(1 << 20) {
                    self.raise(0);
                }
            }
            (0, REG_IRQ_LEVEL) => {
                s.irq_level = u64::from(value != 0);
                if value != 0 {
                    self.raise(1);
                }
            }
            (0, REG_MEM_ADDR) => s.mem_addr = value,
            (0, REG_MEM_DATA) => {
                let addr = GuestAddress(s.mem_addr);
                let ok = self
                    .memory
                    .as_ref()
                    .is_some_and(|m| m.memory().write_obj(value, addr).is_ok());
                if !ok {
                    warn!("MEM_DATA write to unmapped guest address {:#x}", addr.0);
                }
            }
            (0, o) if o >= BANK => store(&mut s.bank, o - BANK, size, value),
            (0, _) => {}
            (1, o) => store(&mut s.aux, o, size, value),
            (2, o) => store(&mut s.port, o, size, value),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.state = State::default();
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
        assert_eq!(s.read(Access::new(0, REG_ID, AccessSize::B8)), ID);
        assert_eq!(
            s.read(Access::new(0, REG_ID, AccessSize::B1)),
            u64::from(b'O')
        );
        assert_eq!(
            s.read(Access::new(0, REG_ID + 4, AccessSize::B4)),
            u64::from(u32::from_le_bytes(*b"RTCH"))
        );
        assert_eq!(
            s.read(Access::new(0, REG_MEM_DATA, AccessSize::B8)),
            u64::MAX,
            "no memory yet"
        );
    }

    #[test]
    fn write_bank_when_sizes_mixed_then_little_endian() {
        let mut s = Scratch::default();
        s.write(Access::new(0, BANK, AccessSize::B8), 0x1122_3344_5566_7788);
        s.write(Access::new(0, BANK + 1, AccessSize::B2), 0xaabb);
        assert_eq!(
            s.read(Access::new(0, BANK, AccessSize::B8)),
            0x1122_3344_55aa_bb88
        );
        assert_eq!(s.read(Access::new(0, REG_WRITE_COUNT, AccessSize::B8)), 2);
        assert_eq!(s.read(Access::new(0, REG_LAST, AccessSize::B8)), 0xaabb);
    }

    #[test]
    fn accum_when_written_then_sums_and_reset_clears() {
        let mut s = Scratch::default();
        for v in 1..=10 {
            s.write(Access::new(0, REG_ACCUM, AccessSize::B4), v);
        }
        assert_eq!(s.read(Access::new(0, REG_ACCUM, AccessSize::B8)), 55);
        s.write(Access::new(2, 3, AccessSize::B1), 9);
        assert_eq!(s.read(Access::new(2, 3, AccessSize::B1)), 9);
        s.reset();
        assert_eq!(s.read(Access::new(0, REG_ACCUM, AccessSize::B8)), 0);
        assert_eq!(s.read(Access::new(2, 3, AccessSize::B1)), 0);
        assert_eq!(s.read(Access::new(0, REG_ID, AccessSize::B8)), ID);
    }

    #[test]
    fn write_when_vcpu_known_then_last_vcpu_reports_it() {
        let mut s = Scratch::default();
        s.write(Access::new(1, 0, AccessSize::B1).by(Some(3)), 1);
        assert_eq!(s.read(Access::new(0, REG_LAST_VCPU, AccessSize::B8)), 4);
        s.write(Access::new(1, 0, AccessSize::B1), 1);
        assert_eq!(s.read(Access::new(0, REG_LAST_VCPU, AccessSize::B8)), 0);
    }

    #[test]
    fn describe_when_asked_then_four_regions_three_doorbells_and_memory() {
        let d = Scratch::default().describe();
        assert!(d.validate().is_ok());
        assert_eq!(
            (d.regions.len(), d.doorbells.len(), d.interrupts.len()),
            (4, 3, 2)
        );
        assert!(d.needs_memory, "MEM_DATA reaches guest memory");
    }
}
