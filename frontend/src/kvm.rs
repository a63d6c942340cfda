//! Real guests: a KVM virtual machine whose exits go through the same buses.
//!
//! [`Machine`] creates a VM over the frontend's guest RAM (the very memfds
//! the backends map), an in-kernel irqchip and one thread per vCPU.
//! `KVM_EXIT_MMIO` and `KVM_EXIT_IO` are dispatched through the frontend's
//! [`Bus`]es, so a backend cannot tell a KVM guest from the socket test
//! guest. Doorbells are registered with `KVM_IOEVENTFD` (the guest's write
//! signals the backend's eventfd without leaving the kernel) and interrupt
//! lines with `KVM_IRQFD` (a backend's signal injects the interrupt without
//! the frontend). Nothing changes on the backend side.
//!
//! Concurrency: vCPUs share the buses; a region's accesses are serialized on
//! its data socket (one command in flight per socket, as the ioregionfd RFC
//! has it), which keeps per-socket order and costs a wait only when two vCPUs
//! hit the same region at the same moment. The vCPU that made an access is
//! known to the vCPU thread; it does not travel to backends (see
//! `docs/architecture.md`).
//!
//! Guests start in 32-bit flat protected mode (see `guests/common.S` for the
//! machine contract) and end the run by writing their exit code to port
//! [`EXIT_PORT`].

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_mp_state, kvm_segment, kvm_userspace_memory_region, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use log::{debug, info, warn};
use outboard_protocol::AccessSize;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::bus::{AccessError, Bus};
use crate::machine::Frontend;
use crate::memory::GuestRam;

/// Port a guest writes its exit code to (32 bits).
pub const EXIT_PORT: u16 = 0x501;
/// Where guest programs are loaded and entered.
pub const LOAD_ADDR: u64 = 0x10000;
/// Where the frontend builds the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Where guest programs keep their variables (and the bench its parameters).
pub const DATA_ADDR: u64 = 0x6000;
const STACK_TOP: u64 = 0x80000;
const STACK_PER_VCPU: u64 = 0x10000;

/// The guest programs built from `guests/*.S`.
pub mod programs {
    /// Prints a greeting through the UART.
    pub const HELLO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hello.bin"));
    /// Exercises the scratch device; 10,000 posted writes and the read-back.
    pub const REGISTERS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/registers.bin"));
    /// Minimal virtio-mmio driver: blk sectors and rng bytes, interrupts in hlt.
    pub const VIRTIO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/virtio.bin"));
    /// 100,000 doorbell writes.
    pub const DOORBELLS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/doorbells.bin"));
    /// 10,000 backend-raised interrupts, each awaited in hlt.
    pub const INTERRUPTS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/interrupts.bin"));
    /// Two vCPUs hammering the scratch device.
    pub const SMP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/smp.bin"));
    /// A measurement loop; parameters at [`super::DATA_ADDR`] (see guests/bench.S).
    pub const BENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bench.bin"));

    /// A program by name.
    pub fn by_name(name: &str) -> Option<&'static [u8]> {
        Some(match name {
            "hello" => HELLO,
            "registers" => REGISTERS,
            "virtio" => VIRTIO,
            "doorbells" => DOORBELLS,
            "interrupts" => INTERRUPTS,
            "smp" => SMP,
            _ => return None,
        })
    }
}

/// Where the guest programs expect their devices (see `guests/common.S`).
pub mod layout {
    /// outboard-scratch region 0.
    pub const SCRATCH: u64 = 0xd000_0000;
    /// outboard-virtio-blk.
    pub const VIRTIO_BLK: u64 = 0xd001_0000;
    /// outboard-virtio-rng.
    pub const VIRTIO_RNG: u64 = 0xd002_0000;
    /// GSI of outboard-scratch's edge line.
    pub const GSI_SCRATCH: u32 = 3;
    /// GSI of virtio-blk's interrupt.
    pub const GSI_BLK: u32 = 5;
    /// GSI of virtio-rng's interrupt.
    pub const GSI_RNG: u32 = 6;
}

/// Creates a VM over `fe`, connects `irqs` (device, line, GSI), loads
/// `program` and runs it on `vcpus` vCPUs for at most `timeout`.
pub fn run_program(
    fe: &mut Frontend,
    program: &[u8],
    vcpus: usize,
    irqs: &[(&str, u32, u32)],
    timeout: Duration,
) -> Result<RunResult, Error> {
    let mut m = Machine::new(fe, vcpus)?;
    for &(dev, line, gsi) in irqs {
        m.connect_irq(fe, dev, line, gsi)?;
    }
    m.load(program)?;
    m.run(timeout)
}

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
    /// the frontend has no guest RAM
    #[error("the frontend has no guest RAM")]
    NoRam,
    /// guest RAM is not mapped in the frontend
    #[error("guest RAM is not mapped in the frontend")]
    RamNotMapped,
    /// the program does not fit guest RAM
    #[error("the program does not fit guest RAM")]
    Load(#[source] vm_memory::GuestMemoryError),
    /// no device {0}, or it has no interrupt line {1}
    #[error("no device {0}, or it has no interrupt line {1}")]
    NoIrq(String, u32),
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

fn kvm_err(op: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::Kvm {
        op,
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

/// True when /dev/kvm can create a VM here.
pub fn available() -> Result<(), Error> {
    let kvm =
        Kvm::new().map_err(|e| Error::Unavailable(io::Error::from_raw_os_error(e.errno())))?;
    kvm.create_vm()
        .map(|_| ())
        .map_err(|e| Error::Unavailable(io::Error::from_raw_os_error(e.errno())))
}

/// What a run observed.
#[derive(Debug, Default)]
pub struct ExitStats {
    /// KVM_EXIT_MMIO exits, by guest-physical address.
    pub mmio: Mutex<HashMap<u64, u64>>,
    /// KVM_EXIT_IO exits in all.
    pub pio: AtomicU64,
}

impl ExitStats {
    /// MMIO exits at `addr`.
    pub fn mmio_exits_at(&self, addr: u64) -> u64 {
        self.mmio
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&addr)
            .copied()
            .unwrap_or(0)
    }

    /// MMIO exits in all.
    pub fn mmio_exits(&self) -> u64 {
        self.mmio
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .sum()
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

/// A KVM virtual machine wired to a [`Frontend`].
pub struct Machine {
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
    ram: Arc<GuestRam>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    // Keeps the eventfds registered with KVM alive for the VM's lifetime.
    _eventfds: Vec<Arc<EventFd>>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl Machine {
    /// A VM over the frontend's guest RAM with `vcpus` vCPUs, the frontend's
    /// doorbells registered as ioeventfds. Interrupt lines are connected with
    /// [`Machine::connect_irq`].
    pub fn new(fe: &mut Frontend, vcpus: usize) -> Result<Self, Error> {
        let ram = fe.memory().ok_or(Error::NoRam)?.clone();
        let kvm =
            Kvm::new().map_err(|e| Error::Unavailable(io::Error::from_raw_os_error(e.errno())))?;
        let vm = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("SET_TSS_ADDR"))?;
        for (slot, (addr, size)) in ram.layout().into_iter().enumerate() {
            let host = ram
                .memory()
                .get_host_address(GuestAddress(addr))
                .map_err(|_| Error::RamNotMapped)?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: addr,
                memory_size: size,
                userspace_addr: host as u64,
            };
            // SAFETY: the region is the frontend's own mapping of the memfd,
            // `size` bytes from `host`, and `ram` (kept in the Machine) keeps it
            // mapped for as long as the VM can use it.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        }
        vm.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
        let mut eventfds = Vec::new();
        for dev in fe.devices() {
            for db in dev.doorbells() {
                let Some(placed) = dev.placed(db.info.region) else {
                    continue;
                };
                let addr = placed.addr + db.info.offset;
                let at = if placed.info.is_pio() {
                    IoEventAddress::Pio(addr)
                } else {
                    IoEventAddress::Mmio(addr)
                };
                let datamatch = db.info.flags & outboard_protocol::control::DOORBELL_DATAMATCH != 0;
                let fd = &*db.eventfd;
                let r = match (datamatch, db.info.size) {
                    (true, 1) => vm.register_ioevent(fd, &at, db.info.datamatch as u8),
                    (true, 2) => vm.register_ioevent(fd, &at, db.info.datamatch as u16),
                    (true, 4) => vm.register_ioevent(fd, &at, db.info.datamatch as u32),
                    (true, _) => vm.register_ioevent(fd, &at, db.info.datamatch),
                    // KVM matches length 0 at any size: a doorbell without a
                    // datamatch also rings for writes of another width here.
                    (false, _) => vm.register_ioevent(fd, &at, NoDatamatch),
                };
                r.map_err(kvm_err("IOEVENTFD"))?;
                eventfds.push(Arc::clone(&db.eventfd));
                debug!("{}: doorbell at {addr:#x} is an ioeventfd", dev.name());
            }
            if let (Some(v), Some(placed)) = (dev.vhost_user(), dev.placed(0)) {
                let notify = placed.addr + outboard_protocol::virtio_mmio::QUEUE_NOTIFY;
                for q in 0.. {
                    let Some(kick) = v.kick_eventfd(q) else {
                        break;
                    };
                    vm.register_ioevent(kick, &IoEventAddress::Mmio(notify), q as u32)
                        .map_err(kvm_err("IOEVENTFD"))?;
                }
            }
        }
        let vcpus = (0..vcpus)
            .map(|i| vm.create_vcpu(i as u64).map_err(kvm_err("CREATE_VCPU")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Machine {
            vm,
            vcpus,
            ram,
            mmio: fe.mmio().clone(),
            pio: fe.pio().clone(),
            _eventfds: eventfds,
        })
    }

    /// Routes device `name`'s interrupt line `line` to `gsi` with KVM_IRQFD
    /// (with resample for a level line); the socket-mode sink stops watching it.
    pub fn connect_irq(
        &mut self,
        fe: &Frontend,
        name: &str,
        line: u32,
        gsi: u32,
    ) -> Result<(), Error> {
        let dev = fe
            .device(name)
            .map_err(|_| Error::NoIrq(name.to_owned(), line))?;
        let irq = dev.irq(line).ok_or(Error::NoIrq(name.to_owned(), line))?;
        fe.release_irq(name, line);
        match irq.resample_eventfd() {
            Some(resample) => self
                .vm
                .register_irqfd_with_resample(irq.eventfd(), resample, gsi)
                .map_err(kvm_err("IRQFD"))?,
            None => self
                .vm
                .register_irqfd(irq.eventfd(), gsi)
                .map_err(kvm_err("IRQFD"))?,
        }
        info!("{name}: interrupt line {line} is KVM GSI {gsi}");
        Ok(())
    }

    /// Writes a 32-bit value into guest RAM (after [`Machine::load`]).
    pub fn poke(&self, addr: u64, value: u32) -> Result<(), Error> {
        self.ram
            .memory()
            .write_obj(value, GuestAddress(addr))
            .map_err(Error::Load)
    }

    /// Clears guest RAM (a fresh machine: no state from an earlier guest),
    /// builds the GDT and copies a flat program to [`LOAD_ADDR`].
    pub fn load(&self, program: &[u8]) -> Result<(), Error> {
        let mem = self.ram.memory();
        let zeros = vec![0u8; 1 << 20];
        for (addr, size) in self.ram.layout() {
            let mut at = 0;
            while at < size {
                let n = (size - at).min(zeros.len() as u64) as usize;
                mem.write_slice(&zeros[..n], GuestAddress(addr + at))
                    .map_err(Error::Load)?;
                at += n as u64;
            }
        }
        let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
        for (i, e) in gdt.iter().enumerate() {
            mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
                .map_err(Error::Load)?;
        }
        mem.write_slice(program, GuestAddress(LOAD_ADDR))
            .map_err(Error::Load)
    }

    fn setup_vcpu(vcpu: &VcpuFd, index: usize) -> Result<(), Error> {
        let mut sregs = vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?;
        sregs.cs = segment(0x08, true);
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            *s = segment(0x10, false);
        }
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = 3 * 8 - 1;
        // Protected mode, no paging; x87/SSE usable (MP, ET; OSFXSR, OSXMMEXCPT).
        sregs.cr0 = 0x1 | 0x2 | 0x10;
        sregs.cr4 = 0x200 | 0x400;
        vcpu.set_sregs(&sregs).map_err(kvm_err("SET_SREGS"))?;
        let mut regs = vcpu.get_regs().map_err(kvm_err("GET_REGS"))?;
        regs.rip = LOAD_ADDR;
        regs.rflags = 0x2;
        regs.rsp = STACK_TOP - STACK_PER_VCPU * index as u64;
        regs.rbx = index as u64;
        vcpu.set_regs(&regs).map_err(kvm_err("SET_REGS"))?;
        if index > 0 {
            // Application processors start running instead of waiting for a SIPI.
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// Runs every vCPU until a guest writes [`EXIT_PORT`], a vCPU fails, or
    /// `timeout` passes (then all vCPUs are stopped).
    pub fn run(self, timeout: Duration) -> Result<RunResult, Error> {
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(kvm_err("signal handler"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let outcome: Arc<Mutex<Option<Result<u32, Error>>>> = Arc::new(Mutex::new(None));
        let stats = Arc::new(ExitStats::default());
        let unclaimed: Arc<Mutex<HashSet<(bool, u64)>>> = Arc::new(Mutex::new(HashSet::new()));
        let started = Instant::now();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (index, vcpu) in self.vcpus.into_iter().enumerate() {
            Self::setup_vcpu(&vcpu, index)?;
            let ctx = VcpuContext {
                index,
                mmio: Arc::clone(&self.mmio),
                pio: Arc::clone(&self.pio),
                stop: Arc::clone(&stop),
                outcome: Arc::clone(&outcome),
                stats: Arc::clone(&stats),
                unclaimed: Arc::clone(&unclaimed),
            };
            let t = std::thread::Builder::new()
                .name(format!("outboard-vcpu{index}"))
                .spawn(move || ctx.run(vcpu))
                .map_err(Error::Thread)?;
            threads.push(t);
        }
        while !stop.load(Ordering::Acquire) && started.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Release);
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
        let elapsed = started.elapsed();
        let result = outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match result {
            Some(Ok(exit_code)) => Ok(RunResult {
                exit_code,
                stats,
                elapsed,
            }),
            Some(Err(e)) => Err(e),
            None => Err(Error::Timeout(timeout)),
        }
    }
}

struct VcpuContext {
    index: usize,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    stop: Arc<AtomicBool>,
    outcome: Arc<Mutex<Option<Result<u32, Error>>>>,
    stats: Arc<ExitStats>,
    unclaimed: Arc<Mutex<HashSet<(bool, u64)>>>,
}

fn le(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

impl VcpuContext {
    fn finish(&self, r: Result<u32, Error>) {
        let mut o = self.outcome.lock().unwrap_or_else(PoisonError::into_inner);
        if o.is_none() {
            *o = Some(r);
        }
        self.stop.store(true, Ordering::Release);
    }

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
        let vcpu = self.index as u32;
        if write {
            if let Err(e) = bus.try_write_from(vcpu, addr, size, le(data)) {
                self.unclaimed(pio, addr, &e);
            }
        } else {
            let v = bus.try_read_from(vcpu, addr, size).unwrap_or_else(|e| {
                self.unclaimed(pio, addr, &e);
                size.all_ones()
            });
            data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        }
    }

    fn run(self, mut vcpu: VcpuFd) {
        while !self.stop.load(Ordering::Acquire) {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.stats.pio.fetch_add(1, Ordering::Relaxed);
                    if port == EXIT_PORT {
                        self.finish(Ok(le(data) as u32));
                        return;
                    }
                    let mut buf = [0u8; 8];
                    let n = data.len().min(8);
                    buf[..n].copy_from_slice(&data[..n]);
                    self.access(true, u64::from(port), &mut buf[..n], true);
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.stats.pio.fetch_add(1, Ordering::Relaxed);
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
                Ok(VcpuExit::Hlt) => {
                    debug!("vCPU {} halted", self.index);
                }
                Ok(VcpuExit::Intr) => {}
                Ok(other) => {
                    let what = format!("{other:?}");
                    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    let why = format!("unexpected exit {what} at rip {rip:#x}");
                    self.finish(Err(Error::VcpuFailed {
                        vcpu: self.index,
                        why,
                    }));
                    return;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    self.finish(Err(Error::VcpuFailed {
                        vcpu: self.index,
                        why: format!("KVM_RUN: {e}"),
                    }));
                    return;
                }
            }
        }
    }

    fn count_mmio(&self, addr: u64) {
        *self
            .stats
            .mmio
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(addr)
            .or_insert(0) += 1;
    }
}
