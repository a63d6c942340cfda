//! KVM: a virtual machine whose exits go through the frontend's buses, and
//! the [`Registrar`] that keeps KVM's ioeventfds and irqfds in sync with
//! placement.
//!
//! [`Machine`] creates a VM over any vm-memory guest memory (Outboard's
//! memfd [`crate::memory::GuestRam`] or a VMM's own), an in-kernel irqchip
//! and vCPU threads. `KVM_EXIT_MMIO` and `KVM_EXIT_IO` are dispatched
//! through the [`Bus`]es on behalf of the vCPU that made them, so a backend
//! cannot tell a KVM guest from the socket test guest. [`KvmRegistrar`]
//! turns doorbells into `KVM_IOEVENTFD`s (a matching guest write signals the
//! backend without an exit) and interrupt lines into `KVM_IRQFD`s; the
//! frontend calls it whenever a region is placed, moved or removed.
//!
//! Concurrency: vCPUs share the buses; a region's accesses are serialized on
//! its data socket (one command in flight per socket, as the ioregionfd RFC
//! has it). Each vCPU counts its exits in its own [`VcpuStats`], so vCPUs
//! never contend on a counter; the vCPU index reaches backends through the
//! region's per-vCPU `user_data` tokens (docs/protocol.md, F_VCPU_TOKENS).
//!
//! The guest stops through a [`StopHandle`] (a device on the bus that the
//! guest writes its exit code to holds one). Before [`Machine::run`]
//! returns it quiesces both buses: every access the guest made, posted
//! writes included, has been served by its backend.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use log::debug;
use outboard_protocol::{AccessSize, Space};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::Bus;
use crate::registrar::{IoEvent, Registrar};

mod vcpu;

pub use vcpu::{ExitStats, VcpuStats};

/// Errors creating or running a VM.
#[derive(Debug, Error)]
pub enum Error {
    /// /dev/kvm is not usable
    #[error("/dev/kvm is not usable")]
    Unavailable(#[source] io::Error),
    /// KVM {op} failed
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// guest memory region at {0:#x} is not mapped in this process
    #[error("guest memory region at {0:#x} is not mapped in this process")]
    RamNotMapped(u64),
    /// vCPU {vcpu} stopped: {why}
    #[error("vCPU {vcpu} stopped: {why}")]
    VcpuFailed {
        /// vCPU index.
        vcpu: usize,
        /// What happened.
        why: String,
    },
    /// the guest did not finish within {0:?}
    #[error("the guest did not finish within {0:?}")]
    Timeout(Duration),
    /// cannot start a vCPU thread
    #[error("cannot start a vCPU thread")]
    Thread(#[source] io::Error),
}

pub(crate) fn kvm_err(op: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::Kvm {
        op,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

fn os(e: vmm_sys_util::errno::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// True when /dev/kvm can create a VM here.
pub fn available() -> Result<(), Error> {
    let kvm = Kvm::new().map_err(|e| Error::Unavailable(os(e)))?;
    kvm.create_vm()
        .map(|_| ())
        .map_err(|e| Error::Unavailable(os(e)))
}

/// Ends a run: the guest's exit code, or the error that stopped it.
#[derive(Debug, Clone)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    outcome: Arc<Mutex<Option<Result<u32, Error>>>>,
}

impl StopHandle {
    fn new() -> Self {
        StopHandle {
            stop: Arc::new(AtomicBool::new(false)),
            outcome: Arc::new(Mutex::new(None)),
        }
    }

    /// Stops every vCPU; the run returns `code` (the first outcome wins).
    pub fn stop(&self, code: u32) {
        self.finish(Ok(code));
    }

    fn fail(&self, e: Error) {
        self.finish(Err(e));
    }

    fn finish(&self, r: Result<u32, Error>) {
        let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if o.is_none() {
            *o = Some(r);
        }
        self.stop.store(true, Ordering::Release);
    }

    /// True once the run is ending.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn take(&self) -> Option<Result<u32, Error>> {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// The result of a run.
#[derive(Debug)]
pub struct RunResult {
    /// The guest's exit code.
    pub exit_code: u32,
    /// Exit statistics.
    pub stats: Arc<ExitStats>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// KVM's ioeventfds and irqfds, kept in sync by the frontend.
#[derive(Debug)]
pub struct KvmRegistrar {
    vm: Arc<VmFd>,
}

fn at(ev: &IoEvent) -> IoEventAddress {
    match ev.space {
        Space::Mmio => IoEventAddress::Mmio(ev.addr),
        Space::Pio => IoEventAddress::Pio(ev.addr),
    }
}

impl Registrar for KvmRegistrar {
    fn register_ioevent(&self, ev: &IoEvent, fd: &EventFd) -> io::Result<()> {
        let a = at(ev);
        let r = match (ev.datamatch, ev.size) {
            (Some(d), Some(AccessSize::B1)) => self.vm.register_ioevent(fd, &a, d as u8),
            (Some(d), Some(AccessSize::B2)) => self.vm.register_ioevent(fd, &a, d as u16),
            (Some(d), Some(AccessSize::B4)) => self.vm.register_ioevent(fd, &a, d as u32),
            (Some(d), _) => self.vm.register_ioevent(fd, &a, d),
            // KVM matches length 0 at any size: a doorbell without a
            // datamatch also rings for writes of another width here.
            (None, _) => self.vm.register_ioevent(fd, &a, NoDatamatch),
        };
        debug!("ioeventfd at {} {:#x}", ev.space, ev.addr);
        r.map_err(os)
    }

    fn unregister_ioevent(&self, ev: &IoEvent, fd: &EventFd) -> io::Result<()> {
        let a = at(ev);
        let r = match (ev.datamatch, ev.size) {
            (Some(d), Some(AccessSize::B1)) => self.vm.unregister_ioevent(fd, &a, d as u8),
            (Some(d), Some(AccessSize::B2)) => self.vm.unregister_ioevent(fd, &a, d as u16),
            (Some(d), Some(AccessSize::B4)) => self.vm.unregister_ioevent(fd, &a, d as u32),
            (Some(d), _) => self.vm.unregister_ioevent(fd, &a, d),
            (None, _) => self.vm.unregister_ioevent(fd, &a, NoDatamatch),
        };
        debug!("ioeventfd at {} {:#x} removed", ev.space, ev.addr);
        r.map_err(os)
    }

    fn register_irqfd(&self, gsi: u32, fd: &EventFd, resample: Option<&EventFd>) -> io::Result<()> {
        match resample {
            Some(r) => self.vm.register_irqfd_with_resample(fd, r, gsi),
            None => self.vm.register_irqfd(fd, gsi),
        }
        .map_err(os)
    }

    fn unregister_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(os)
    }
}

/// A KVM virtual machine over guest memory, dispatching exits to two buses.
pub struct Machine {
    vm: Arc<VmFd>,
    vcpus: Vec<VcpuFd>,
    // Keeps guest memory mapped for as long as the VM can use it.
    _memory: GuestMemoryMmap<()>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    stop: StopHandle,
    stats: Arc<ExitStats>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Machine {
    /// A VM over `memory` (every region becomes a memory slot at its guest
    /// address) with an in-kernel irqchip and `vcpus` vCPUs whose exits go
    /// to `mmio` and `pio`.
    pub fn new(
        memory: &GuestMemoryMmap<()>,
        vcpus: usize,
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
    ) -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(|e| Error::Unavailable(os(e)))?;
        let vm = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("SET_TSS_ADDR"))?;
        for (slot, r) in memory.iter().enumerate() {
            let addr = r.start_addr();
            let host = memory
                .get_host_address(addr)
                .map_err(|_| Error::RamNotMapped(addr.0))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: addr.0,
                memory_size: r.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is this process's mapping of the guest
            // memory region, `len` bytes from `host`; the Machine keeps a
            // clone of `memory` (which holds the mappings) for as long as
            // the VM exists.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        }
        vm.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
        let vcpus = (0..vcpus)
            .map(|i| vm.create_vcpu(i as u64).map_err(kvm_err("CREATE_VCPU")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Machine {
            stats: Arc::new(ExitStats::new(vcpus.len())),
            vm: Arc::new(vm),
            vcpus,
            _memory: memory.clone(),
            mmio,
            pio,
            stop: StopHandle::new(),
        })
    }

    /// The registrar that keeps this VM's ioeventfds and irqfds in sync
    /// (give it to [`crate::Frontend::set_registrar`] or call it yourself).
    pub fn registrar(&self) -> Arc<KvmRegistrar> {
        Arc::new(KvmRegistrar {
            vm: Arc::clone(&self.vm),
        })
    }

    /// vCPU `index`, to set its registers before [`Machine::run`].
    pub fn vcpu(&self, index: usize) -> Option<&VcpuFd> {
        self.vcpus.get(index)
    }

    /// How many vCPUs the VM has.
    pub fn num_vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// Ends the run from anywhere (a device the guest writes its exit code to).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Exit statistics, readable while the guest runs.
    pub fn stats(&self) -> Arc<ExitStats> {
        Arc::clone(&self.stats)
    }

    /// Runs every vCPU until the [`StopHandle`] stops the run, a vCPU fails,
    /// or `timeout` passes; then quiesces both buses and returns.
    pub fn run(self, timeout: Duration) -> Result<RunResult, Error> {
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(kvm_err("signal handler"))?;
        let unclaimed = Arc::new(Mutex::new(HashSet::new()));
        let started = Instant::now();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (index, vcpu) in self.vcpus.into_iter().enumerate() {
            let ctx = vcpu::VcpuContext {
                index,
                mmio: Arc::clone(&self.mmio),
                pio: Arc::clone(&self.pio),
                stop: self.stop.clone(),
                stats: Arc::clone(&self.stats),
                unclaimed: Arc::clone(&unclaimed),
            };
            let t = std::thread::Builder::new()
                .name(format!("outboard-vcpu{index}"))
                .spawn(move || ctx.run(vcpu));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.stop.fail(Error::Thread(e));
                    break;
                }
            }
        }
        while !self.stop.is_stopped() && started.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.stop.stop.store(true, Ordering::Release);
        // Kick every vCPU out of KVM_RUN until its thread is gone.
        while threads.iter().any(|t| !t.is_finished()) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(SIGRTMIN());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in threads {
            let _ = t.join();
        }
        // Whatever the guest did before it stopped takes effect before we return.
        self.mmio.quiesce();
        self.pio.quiesce();
        let elapsed = started.elapsed();
        match self.stop.take() {
            Some(Ok(exit_code)) => Ok(RunResult {
                exit_code,
                stats: self.stats,
                elapsed,
            }),
            Some(Err(e)) => Err(e),
            None => Err(Error::Timeout(timeout)),
        }
    }
}
