//! A minimal VMM embedding Outboard devices without Outboard's `Frontend`:
//! its own bus (vm-device's `IoManager`), allocator (vm-allocator), guest
//! memory (a sealed memfd) and interrupt eventfd. It spawns `outboard-uart`
//! and `outboard-scratch` and runs the `interrupts` guest on KVM (10,000
//! interrupts from the scratch backend through the VMM's irqfd, the result
//! printed through the UART); without KVM it plays the guest over the bus.
//!
//! `cargo build --bins && cargo run --example minimal-vmm`

use std::error::Error;
use std::os::fd::AsRawFd;

use kvm_ioctls::{Kvm, VcpuExit};
use outboard_frontend::{launch::Launcher, DeviceOptions, RemoteDevice, Space};
use outboard_testkit::loader::{self, programs};
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::resources::Resource;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

type Result<T> = std::result::Result<T, Box<dyn Error>>;
const RAM: u64 = 16 << 20;
const SCRATCH_IRQ_RAISE: u64 = 0xd000_0000 + 0x58;

/// Guest RAM the VMM owns: one memfd, sealed so a backend can map it safely.
fn guest_memory() -> Result<GuestMemoryMmap<()>> {
    // SAFETY: a NUL-terminated literal name and plain integer flags.
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

/// The resource handshake: spawn, constraints, allocate, place, register.
fn attach(io: &mut IoManager, mmio: &mut AddressAllocator, program: &str) -> Result<RemoteDevice> {
    let cmd = Launcher::beside_current_exe().command(program, &[])?;
    let mut dev = RemoteDevice::spawn(program, cmd, false, DeviceOptions::default())?;
    for c in dev.constraints().into_iter().filter(|c| c.index == 0) {
        let base = match c.preferred {
            Some(addr) => addr, // the UART's COM1, accepted as is
            None => mmio
                .allocate(c.size, c.align, AllocPolicy::FirstMatch)?
                .start(),
        };
        let region = dev.place(c.index, base, None)?;
        let size = c.size;
        if c.space == Space::Mmio {
            io.register_mmio_resources(region, &[Resource::MmioAddressRange { base, size }])?;
        } else {
            let (base, size) = (base as u16, size as u16);
            io.register_pio_resources(region, &[Resource::PioAddressRange { base, size }])?;
        }
        println!("vmm: {program} region {} at {} {base:#x}", c.index, c.space);
    }
    Ok(dev)
}

fn main() -> Result<()> {
    let mem = guest_memory()?;
    let mut io = IoManager::new();
    let mut mmio = AddressAllocator::new(0xd000_0000, 0x1000_0000)?;
    let uart = attach(&mut io, &mut mmio, "outboard-uart")?;
    let scratch = attach(&mut io, &mut mmio, "outboard-scratch")?;
    scratch.set_memory(&mem)?; // sent only to a backend that asked for guest memory
    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    scratch.connect_irq(0, &irq, None)?; // the VMM's own irqfd
    let mut code = 0;
    match Kvm::new() {
        Ok(kvm) => code = run_kvm(&kvm, &mem, &io, &irq)?,
        Err(e) => {
            println!("vmm: /dev/kvm unusable ({e}); playing the guest over the bus");
            let (mut raised, mut taken) = (0, 0);
            while raised < 1000 {
                io.mmio_write(MmioAddress(SCRATCH_IRQ_RAISE), &1u32.to_le_bytes())?;
                raised += 1;
                while taken < raised {
                    taken += wait(&irq)?;
                }
            }
            let line = format!("socket guest: {raised} raised by the backend, {taken} taken\n");
            for b in line.bytes() {
                io.pio_write(PioAddress(0x3f8), &[b])?;
            }
        }
    }
    uart.barrier()?; // every posted write the guest made has reached the UART
    if code != 0 {
        return Err(format!("guest exited with code {code}").into());
    }
    for dev in [uart, scratch] {
        let status = dev.shutdown(std::time::Duration::from_secs(1));
        println!("vmm: {} exited: {status:?}", dev.name());
    }
    Ok(())
}

/// Waits for the interrupt eventfd (backends make their eventfds non-blocking).
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

/// The guest on KVM until it writes its exit code to port 0x501: exits go to
/// the VMM's IoManager; the VMM's eventfd is the scratch device's irqfd on GSI 3.
fn run_kvm(kvm: &Kvm, mem: &GuestMemoryMmap<()>, io: &IoManager, irq: &EventFd) -> Result<u8> {
    let vm = kvm.create_vm()?;
    vm.set_tss_address(0xfffb_d000)?;
    let host = mem.get_host_address(GuestAddress(0))? as u64;
    let slot = kvm_bindings::kvm_userspace_memory_region {
        memory_size: RAM,
        userspace_addr: host,
        ..Default::default()
    };
    // SAFETY: `host` maps all RAM bytes of `mem`, which outlives the VM.
    unsafe { vm.set_user_memory_region(slot)? };
    vm.create_irq_chip()?;
    vm.register_irqfd(irq, 3)?;
    let mut vcpu = vm.create_vcpu(0)?;
    loader::load(mem, programs::INTERRUPTS)?;
    loader::setup_vcpu(&vcpu, 0)?;
    println!("vmm: running the interrupts guest on KVM");
    loop {
        match vcpu.run()? {
            VcpuExit::IoOut(0x501, data) => return Ok(data[0]),
            VcpuExit::IoOut(port, data) => io.pio_write(PioAddress(port), data)?,
            VcpuExit::IoIn(port, data) => io.pio_read(PioAddress(port), data)?,
            VcpuExit::MmioWrite(addr, data) => io.mmio_write(MmioAddress(addr), data)?,
            VcpuExit::MmioRead(addr, data) => io.mmio_read(MmioAddress(addr), data)?,
            VcpuExit::Hlt | VcpuExit::Intr => {}
            other => return Err(format!("unexpected exit {other:?}").into()),
        }
    }
}
