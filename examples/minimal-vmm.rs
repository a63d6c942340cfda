//! A minimal VMM that embeds Outboard devices without Outboard's `Frontend`:
//! its own bus (vm-device's `IoManager`), its own allocator (vm-allocator),
//! its own guest memory (a sealed memfd) and its own interrupt eventfd. It
//! spawns `outboard-uart` and `outboard-scratch`, places their regions and
//! runs the `interrupts` guest on KVM (10,000 interrupts raised by the
//! scratch backend through the VMM's irqfd; the result printed through the
//! UART). Without KVM it plays the guest over the same bus.
//!
//! ```text
//! cargo build --bins && cargo run --example minimal-vmm
//! ```

use std::error::Error;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_ioctls::{Kvm, VcpuExit};
use outboard_frontend::device::{DeviceOptions, RemoteDevice};
use outboard_frontend::launch::Launcher;
use outboard_frontend::Space;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::resources::Resource;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const RAM: u64 = 16 << 20;
const IRQ_GSI: u32 = 3; // where guests/interrupts.S expects scratch's line
const SCRATCH_IRQ_RAISE: u64 = 0x58;

/// Guest RAM the VMM owns: one memfd, sealed so a backend can map it safely.
fn guest_memory() -> Result<GuestMemoryMmap<()>, Box<dyn Error>> {
    // SAFETY: the name is a NUL-terminated literal; the flags are plain integers.
    let fd = unsafe { libc::memfd_create(c"vmm-ram".as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: memfd_create just returned this fd; nothing else owns it.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(RAM)?;
    // SAFETY: F_ADD_SEALS only changes the seals of the memfd we own.
    if unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error().into());
    }
    let range = (
        GuestAddress(0),
        RAM as usize,
        Some(FileOffset::new(file, 0)),
    );
    Ok(GuestMemoryMmap::from_ranges_with_files([range])?)
}

/// Spawns an Outboard backend and places each region with the VMM's own
/// allocator and bus: the resource handshake.
fn attach(
    io: &mut IoManager,
    mmio: &mut AddressAllocator,
    mem: &GuestMemoryMmap<()>,
    program: &str,
) -> Result<RemoteDevice, Box<dyn Error>> {
    let cmd = Launcher::beside_current_exe().command(program, &[])?;
    let mut dev = RemoteDevice::spawn(program, cmd, false, DeviceOptions::default())?;
    dev.set_memory(mem)?; // only sent if the backend asked for guest memory
    for c in dev.constraints().into_iter().filter(|c| c.index == 0) {
        let base = match c.preferred {
            Some(addr) => addr, // the UART's COM1: the VMM accepts it as is
            None => mmio
                .allocate(c.size, c.align, AllocPolicy::FirstMatch)?
                .start(),
        };
        let region = dev.place(c.index, base, None)?;
        match c.space {
            outboard_frontend::Space::Mmio => io.register_mmio_resources(
                region,
                &[Resource::MmioAddressRange { base, size: c.size }],
            )?,
            outboard_frontend::Space::Pio => io.register_pio_resources(
                region,
                &[Resource::PioAddressRange {
                    base: base as u16,
                    size: c.size as u16,
                }],
            )?,
        }
        println!("vmm: {program} region {} at {} {base:#x}", c.index, c.space);
    }
    Ok(dev)
}

fn main() -> Result<(), Box<dyn Error>> {
    let mem = guest_memory()?;
    let mut io = IoManager::new();
    let mut mmio = AddressAllocator::new(0xd000_0000, 0x1000_0000)?;
    let uart = attach(&mut io, &mut mmio, &mem, "outboard-uart")?;
    let scratch = attach(&mut io, &mut mmio, &mem, "outboard-scratch")?;
    let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    scratch.connect_irq(0, &irq, None)?; // the VMM's own irqfd
    let io = Arc::new(io);
    match Kvm::new() {
        Ok(kvm) => run_kvm(&kvm, &mem, &io, &irq)?,
        Err(e) => {
            println!("vmm: /dev/kvm unusable ({e}); playing the guest over the bus");
            let (mut raised, mut taken) = (0, 0);
            while raised < 1000 {
                io.mmio_write(
                    MmioAddress(0xd000_0000 + SCRATCH_IRQ_RAISE),
                    &1u32.to_le_bytes(),
                )?;
                raised += 1;
                while taken < raised {
                    taken += wait(&irq)?;
                }
            }
            for b in
                format!("socket guest: {raised} raised by the backend, {taken} taken\n").bytes()
            {
                io.pio_write(PioAddress(0x3f8), &[b])?;
            }
        }
    }
    uart.barrier()?; // every posted write the guest made has reached the UART
    for dev in [uart, scratch] {
        let status = dev.shutdown(std::time::Duration::from_secs(1));
        println!("vmm: {} exited: {status:?}", dev.name());
    }
    Ok(())
}

/// Waits for the interrupt eventfd (the backend made it non-blocking).
fn wait(irq: &EventFd) -> std::io::Result<u64> {
    loop {
        match irq.read() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut p = libc::pollfd {
                    fd: irq.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `p` is a live pollfd for an fd `irq` keeps open.
                unsafe { libc::poll(&mut p, 1, 1000) };
            }
            r => return r,
        }
    }
}

/// The guest on KVM: exits go to the VMM's IoManager; the interrupt is the
/// VMM's own eventfd registered as an irqfd.
fn run_kvm(
    kvm: &Kvm,
    mem: &GuestMemoryMmap<()>,
    io: &IoManager,
    irq: &EventFd,
) -> Result<(), Box<dyn Error>> {
    use vm_memory::GuestMemoryBackend;
    let vm = kvm.create_vm()?;
    vm.set_tss_address(0xfffb_d000)?;
    let host = mem.get_host_address(GuestAddress(0))?;
    let slot = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` maps all RAM bytes of `mem`, which outlives the VM.
    unsafe { vm.set_user_memory_region(slot)? };
    vm.create_irq_chip()?;
    vm.register_irqfd(irq, IRQ_GSI)?;
    let mut vcpu = vm.create_vcpu(0)?;
    outboard_testkit::loader::load(mem, outboard_testkit::loader::programs::INTERRUPTS)?;
    outboard_testkit::loader::setup_vcpu(&vcpu, 0)?;
    println!("vmm: running the interrupts guest on KVM");
    loop {
        match vcpu.run()? {
            VcpuExit::IoOut(0x501, data) => {
                println!("vmm: guest exited with code {}", data[0]);
                return if data[0] == 0 {
                    Ok(())
                } else {
                    Err("guest failed".into())
                };
            }
            VcpuExit::IoOut(port, data) => io.pio_write(PioAddress(port), data)?,
            VcpuExit::IoIn(port, data) => io.pio_read(PioAddress(port), data)?,
            VcpuExit::MmioWrite(addr, data) => io.mmio_write(MmioAddress(addr), data)?,
            VcpuExit::MmioRead(addr, data) => io.mmio_read(MmioAddress(addr), data)?,
            VcpuExit::Hlt | VcpuExit::Intr => {}
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    }
}
