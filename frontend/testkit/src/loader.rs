//! Flat 32-bit guest programs on KVM: the loader, the exit port and the
//! programs assembled from `guests/*.S` by the build script.
//!
//! Guests start in 32-bit flat protected mode (see `guests/common.S` for the
//! machine contract), find their devices at the addresses in [`layout`] and
//! end the run by writing their exit code to port [`EXIT_PORT`], which an
//! [`ExitPort`] on the PIO bus turns into [`StopHandle::stop`].

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_mp_state, kvm_segment, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use outboard_frontend::kvm::{self, Machine, RunResult, StopHandle};
use outboard_frontend::{Access, AccessError, Bus, BusDevice, Frontend};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Port a guest writes its exit code to (32 bits).
pub const EXIT_PORT: u16 = 0x501;
/// Where guest programs are loaded and entered.
pub const LOAD_ADDR: u64 = 0x10000;
/// Where the loader builds the GDT.
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
    /// Minimal virtio-mmio driver: blk requests through indirect tables with
    /// event-idx, rng bytes without; interrupts in hlt (see guests/virtio.S).
    pub const VIRTIO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/virtio.bin"));
    /// 100,000 doorbell writes.
    pub const DOORBELLS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/doorbells.bin"));
    /// 10,000 backend-raised interrupts, each awaited in hlt.
    pub const INTERRUPTS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/interrupts.bin"));
    /// Two vCPUs hammering the scratch device.
    pub const SMP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/smp.bin"));
    /// A measurement loop; parameters at [`super::DATA_ADDR`] (see guests/bench.S).
    pub const BENCH: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bench.bin"));
    /// Doorbell rounds at addresses the host moves between rounds (guests/relocate.S).
    pub const RELOCATE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/relocate.bin"));
    /// Reads typed input from the UART, woken by its interrupt (guests/echo.S).
    pub const ECHO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo.bin"));

    /// A program by name.
    pub fn by_name(name: &str) -> Option<&'static [u8]> {
        Some(match name {
            "hello" => HELLO,
            "registers" => REGISTERS,
            "virtio" => VIRTIO,
            "doorbells" => DOORBELLS,
            "interrupts" => INTERRUPTS,
            "smp" => SMP,
            "echo" => ECHO,
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
    /// GSI of the UART's interrupt (COM1's IRQ 4).
    pub const GSI_UART: u32 = 4;
    /// GSI of outboard-scratch's edge line.
    pub const GSI_SCRATCH: u32 = 3;
    /// GSI of virtio-blk's interrupt.
    pub const GSI_BLK: u32 = 5;
    /// GSI of virtio-rng's interrupt.
    pub const GSI_RNG: u32 = 6;
}

/// Errors loading or running a flat guest.
#[derive(Debug, Error)]
pub enum Error {
    /// KVM failed
    #[error("KVM failed")]
    Kvm(#[from] kvm::Error),
    /// vCPU {0} register setup failed
    #[error("vCPU {0} register setup failed")]
    Registers(usize, #[source] std::io::Error),
    /// the frontend has no guest RAM
    #[error("the frontend has no guest RAM")]
    NoRam,
    /// the program does not fit guest RAM
    #[error("the program does not fit guest RAM")]
    Load(#[source] vm_memory::GuestMemoryError),
    /// the frontend refused
    #[error("the frontend refused")]
    Frontend(#[from] outboard_frontend::Error),
    /// port {0:#x} is taken
    #[error("port {0:#x} is taken")]
    ExitPort(u16),
}

/// The exit port: a guest's 32-bit write there ends the run with that code.
#[derive(Debug)]
pub struct ExitPort(pub StopHandle);

impl BusDevice for ExitPort {
    fn read(&self, _: Access) -> Result<u64, AccessError> {
        Err(AccessError::Denied)
    }
    fn write(&self, _: Access, value: u64) -> Result<(), AccessError> {
        self.0.stop(value as u32);
        Ok(())
    }
}

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

fn os(index: usize) -> impl Fn(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::Registers(index, std::io::Error::from_raw_os_error(e.errno()))
}

/// Puts vCPU `index` in flat 32-bit protected mode at [`LOAD_ADDR`], with
/// its own stack and its index in `ebx`.
pub fn setup_vcpu(vcpu: &VcpuFd, index: usize) -> Result<(), Error> {
    let mut sregs = vcpu.get_sregs().map_err(os(index))?;
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
    vcpu.set_sregs(&sregs).map_err(os(index))?;
    let mut regs = vcpu.get_regs().map_err(os(index))?;
    regs.rip = LOAD_ADDR;
    regs.rflags = 0x2;
    regs.rsp = STACK_TOP - STACK_PER_VCPU * index as u64;
    regs.rbx = index as u64;
    vcpu.set_regs(&regs).map_err(os(index))?;
    if index > 0 {
        // Application processors start running instead of waiting for a SIPI.
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(os(index))?;
    }
    Ok(())
}

/// Clears guest RAM (a fresh machine: no state from an earlier guest),
/// builds the GDT and copies a flat program to [`LOAD_ADDR`].
pub fn load(mem: &GuestMemoryMmap<()>, program: &[u8]) -> Result<(), Error> {
    let zeros = vec![0u8; 1 << 20];
    for (addr, size) in mem.iter().map(|r| (r.start_addr().0, r.len())) {
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

/// A flat guest ready to run: a [`Machine`] over the frontend's RAM and
/// buses, its registrar installed in the frontend (doorbells become
/// ioeventfds, routed lines irqfds), the program loaded, every vCPU set up
/// and the exit port on the PIO bus.
#[derive(Debug)]
pub struct FlatGuest {
    /// The machine (run it with [`FlatGuest::run`]).
    pub machine: Machine,
    pio: Arc<Bus>,
}

impl FlatGuest {
    /// Prepares `program` on `vcpus` vCPUs; `irqs` are (device, line, GSI).
    pub fn new(
        fe: &mut Frontend,
        program: &[u8],
        vcpus: usize,
        irqs: &[(&str, u32, u32)],
    ) -> Result<Self, Error> {
        let ram = fe.memory().ok_or(Error::NoRam)?.clone();
        let machine = Machine::new(ram.memory(), vcpus, fe.mmio().clone(), fe.pio().clone())?;
        fe.set_registrar(machine.registrar())?;
        for &(dev, line, gsi) in irqs {
            fe.route_irq(dev, line, gsi)?;
        }
        load(ram.memory(), program)?;
        for i in 0..machine.num_vcpus() {
            if let Some(v) = machine.vcpu(i) {
                setup_vcpu(v, i)?;
            }
        }
        let exit = Arc::new(ExitPort(machine.stop_handle()));
        fe.pio()
            .insert(u64::from(EXIT_PORT), 4, exit.clone())
            .map_err(|_| Error::ExitPort(EXIT_PORT))?;
        Ok(FlatGuest {
            machine,
            pio: fe.pio().clone(),
        })
    }

    /// Runs the guest until it writes the exit port (or `timeout`); every
    /// access it made has been served when this returns. The exit port is
    /// taken off the bus again.
    pub fn run(self, timeout: Duration) -> Result<RunResult, Error> {
        let r = self.machine.run(timeout);
        let _ = self.pio.remove(u64::from(EXIT_PORT), 4);
        Ok(r?)
    }
}

/// Loads `program` on a new VM over `fe` with `vcpus` vCPUs, routes `irqs`
/// (device, line, GSI) and runs it for at most `timeout`.
pub fn run_program(
    fe: &mut Frontend,
    program: &[u8],
    vcpus: usize,
    irqs: &[(&str, u32, u32)],
    timeout: Duration,
) -> Result<RunResult, Error> {
    let guest = FlatGuest::new(fe, program, vcpus, irqs)?;
    guest.run(timeout)
}
