//! The vCPU threads: `KVM_RUN`, and every MMIO and port I/O exit dispatched
//! through the buses on behalf of the vCPU that made it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, warn};
use outboard_protocol::AccessSize;

use super::{Error, StopHandle};
use crate::bus::{AccessError, Bus};

/// Exits one vCPU took. Each vCPU thread updates only its own, so vCPUs
/// never contend on a counter.
#[derive(Debug, Default)]
pub struct VcpuStats {
    mmio: Mutex<HashMap<u64, u64>>,
    pio: AtomicU64,
}

impl VcpuStats {
    /// MMIO exits at `addr`.
    pub fn mmio_exits_at(&self, addr: u64) -> u64 {
        let m = self.mmio.lock().unwrap_or_else(PoisonError::into_inner);
        m.get(&addr).copied().unwrap_or(0)
    }

    /// MMIO exits in all.
    pub fn mmio_exits(&self) -> u64 {
        let m = self.mmio.lock().unwrap_or_else(PoisonError::into_inner);
        m.values().sum()
    }

    /// Port I/O exits in all.
    pub fn pio_exits(&self) -> u64 {
        self.pio.load(Ordering::Relaxed)
    }
}

/// Exits every vCPU took; readable while the guest runs.
#[derive(Debug)]
pub struct ExitStats {
    vcpus: Vec<VcpuStats>,
}

impl ExitStats {
    pub(super) fn new(vcpus: usize) -> Self {
        ExitStats {
            vcpus: (0..vcpus).map(|_| VcpuStats::default()).collect(),
        }
    }

    /// vCPU `index`'s own counters.
    pub fn vcpu(&self, index: usize) -> Option<&VcpuStats> {
        self.vcpus.get(index)
    }

    /// MMIO exits at `addr`, all vCPUs.
    pub fn mmio_exits_at(&self, addr: u64) -> u64 {
        self.vcpus.iter().map(|v| v.mmio_exits_at(addr)).sum()
    }

    /// MMIO exits in all.
    pub fn mmio_exits(&self) -> u64 {
        self.vcpus.iter().map(VcpuStats::mmio_exits).sum()
    }

    /// Port I/O exits in all.
    pub fn pio_exits(&self) -> u64 {
        self.vcpus.iter().map(VcpuStats::pio_exits).sum()
    }
}

pub(super) struct VcpuContext {
    pub(super) index: usize,
    pub(super) mmio: Arc<Bus>,
    pub(super) pio: Arc<Bus>,
    pub(super) stop: StopHandle,
    pub(super) stats: Arc<ExitStats>,
    pub(super) unclaimed: Arc<Mutex<HashSet<(bool, u64)>>>,
}

fn le(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

impl VcpuContext {
    /// Logs an access to an address no device claims, once per address.
    fn unclaimed(&self, pio: bool, addr: u64, e: &AccessError) {
        if !matches!(e, AccessError::Unmapped(_)) {
            return;
        }
        let first = self
            .unclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((pio, addr));
        if first {
            warn!(
                "vCPU {}: unclaimed {} address {addr:#x} (reads all-ones, writes dropped)",
                self.index,
                if pio { "port" } else { "MMIO" }
            );
        }
    }

    fn access(&self, pio: bool, addr: u64, data: &mut [u8], write: bool) {
        let bus = if pio { &self.pio } else { &self.mmio };
        let Ok(size) = AccessSize::from_bytes(data.len() as u64) else {
            data.fill(0xff);
            return;
        };
        let vcpu = Some(self.index as u32);
        if write {
            if let Err(e) = bus.try_write_by(vcpu, addr, size, le(data)) {
                self.unclaimed(pio, addr, &e);
            }
        } else {
            let v = bus.try_read_by(vcpu, addr, size).unwrap_or_else(|e| {
                self.unclaimed(pio, addr, &e);
                size.all_ones()
            });
            data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        }
    }

    fn own_stats(&self) -> Option<&VcpuStats> {
        self.stats.vcpu(self.index)
    }

    fn count_mmio(&self, addr: u64) {
        if let Some(s) = self.own_stats() {
            *s.mmio
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(addr)
                .or_insert(0) += 1;
        }
    }

    fn count_pio(&self) {
        if let Some(s) = self.own_stats() {
            s.pio.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn run(self, mut vcpu: VcpuFd) {
        while !self.stop.is_stopped() {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.count_pio();
                    let mut buf = [0u8; 8];
                    let n = data.len().min(8);
                    buf[..n].copy_from_slice(&data[..n]);
                    self.access(true, u64::from(port), &mut buf[..n], true);
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.count_pio();
                    self.access(true, u64::from(port), data, false);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.count_mmio(addr);
                    self.access(false, addr, data, false);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.count_mmio(addr);
                    let mut buf = [0u8; 8];
                    let n = data.len().min(8);
                    buf[..n].copy_from_slice(&data[..n]);
                    self.access(false, addr, &mut buf[..n], true);
                }
                Ok(VcpuExit::Hlt) => debug!("vCPU {} halted", self.index),
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    let what = format!("{other:?}");
                    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    self.stop.fail(Error::VcpuFailed {
                        vcpu: self.index,
                        why: format!("unexpected exit {what} at rip {rip:#x}"),
                    });
                    return;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    self.stop.fail(Error::VcpuFailed {
                        vcpu: self.index,
                        why: format!("KVM_RUN: {e}"),
                    });
                    return;
                }
            }
        }
    }
}
