//! `outboard demo`: the first thing to run.

use std::sync::Arc;
use std::time::Instant;

use crate::script;
use outboard_backends::scratch::{self, ID};
use outboard_backends::uart::COM1;
use outboard_frontend::kvm;
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{AccessSize, DeviceSpec, Frontend, Options};
use outboard_testkit::guest::{
    blk, rng_read, BlkClient, DriverOptions, GuestAllocator, VirtioMmioDriver,
};
use outboard_testkit::loader::{self, layout, programs};

use crate::AnyError;

const POSTED_WRITES: u64 = 10_000;
const GREETING: &str = "Hello from an Outboard guest, through an out-of-process 16550 UART!";

struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            eprintln!("demo: check failed: {what}");
        }
    }
}

const RAM_SIZE: u64 = 16 << 20;
const DISK_SECTORS: u64 = 8192;

/// A scratch disk image that is removed when dropped.
struct TempImage(std::path::PathBuf);

impl TempImage {
    /// A file of `len` bytes in the temporary directory that starts with
    /// `contents` (the rest a hole reading as zeros); returns it and its path.
    fn new(tag: &str, contents: &[u8], len: u64) -> Result<(Self, String), AnyError> {
        let path =
            std::env::temp_dir().join(format!("outboard-demo-{tag}-{}.img", std::process::id()));
        let image = TempImage(path);
        std::fs::write(&image.0, contents)?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image.0)?
            .set_len(len)?;
        let path = image
            .0
            .to_str()
            .ok_or("temporary path is not UTF-8")?
            .to_owned();
        Ok((image, path))
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn options_again() -> Options {
    crate::options(std::time::Duration::from_secs(10))
}

/// Runs every guest program on KVM against fresh backends at the addresses
/// the programs expect; returns the backends' exit statuses.
fn kvm_demo(
    options: Options,
    c: &mut Checks,
) -> Result<Vec<(String, Option<std::process::ExitStatus>)>, AnyError> {
    let mut sectors = [0u8; 1024];
    sectors[..8].copy_from_slice(b"OUTBOARD");
    sectors[512..520].copy_from_slice(b"SECTOR-1");
    let (_image, image_path) = TempImage::new("kvm", &sectors, 1 << 20)?;
    let mut fe = Frontend::new(options);
    fe.set_memory(GuestRam::new(&[(0, RAM_SIZE)])?)?;
    fe.attach(&DeviceSpec::spawn("com1", "outboard-uart", &[]))?;
    fe.attach(&DeviceSpec::spawn("scratch", "outboard-scratch", &[]).place(0, layout::SCRATCH))?;
    fe.attach(
        &DeviceSpec::spawn("disk", "outboard-virtio-blk", &["--path", &image_path])
            .place(0, layout::VIRTIO_BLK),
    )?;
    fe.attach(&DeviceSpec::spawn("rng", "outboard-virtio-rng", &[]).place(0, layout::VIRTIO_RNG))?;
    /// Program name, code, vCPUs, interrupt lines (device, line, GSI).
    type GuestRun<'a> = (&'a str, &'a [u8], usize, Vec<(&'a str, u32, u32)>);
    let runs: [GuestRun<'_>; 6] = [
        ("hello", programs::HELLO, 1, vec![]),
        ("registers", programs::REGISTERS, 1, vec![]),
        (
            "virtio",
            programs::VIRTIO,
            1,
            vec![("disk", 0, layout::GSI_BLK), ("rng", 0, layout::GSI_RNG)],
        ),
        ("doorbells", programs::DOORBELLS, 1, vec![]),
        (
            "interrupts",
            programs::INTERRUPTS,
            1,
            vec![("scratch", 0, layout::GSI_SCRATCH)],
        ),
        ("smp", programs::SMP, 2, vec![]),
    ];
    for (name, program, vcpus, irqs) in runs {
        fe.reset("scratch")?;
        let r = loader::run_program(
            &mut fe,
            program,
            vcpus,
            &irqs,
            std::time::Duration::from_secs(120),
        )?;
        println!(
            "demo: kvm: {name} on {vcpus} vCPU(s): exit code {}, {} MMIO exits, {} port exits, {:.1} ms",
            r.exit_code,
            r.stats.mmio_exits(),
            r.stats.pio_exits(),
            r.elapsed.as_secs_f64() * 1e3
        );
        c.check(&format!("KVM guest {name} exits with 0"), r.exit_code == 0);
    }
    Ok(fe.shutdown())
}

pub fn run(options: Options) -> Result<(), AnyError> {
    let (_image, image_path) = TempImage::new("disk", &[], DISK_SECTORS * 512)?;
    let mut fe = Frontend::new(options);
    fe.set_memory(GuestRam::new(&[(0, RAM_SIZE)])?)?;
    fe.attach(&DeviceSpec::spawn("com1", "outboard-uart", &[]))?;
    fe.attach(&DeviceSpec::spawn("scratch", "outboard-scratch", &[]))?;
    fe.attach(&DeviceSpec::spawn(
        "disk",
        "outboard-virtio-blk",
        &["--path", &image_path, "--serial", "outboard-demo"],
    ))?;
    fe.attach(&DeviceSpec::spawn("rng", "outboard-virtio-rng", &[]))?;
    println!(
        "demo: {} backends spawned, one process each, sharing {} MiB of guest RAM:",
        fe.devices().len(),
        RAM_SIZE >> 20
    );
    script::print_map(&fe, &mut std::io::stdout().lock())?;
    let mut c = Checks {
        passed: 0,
        failed: 0,
    };
    let mut accesses = 0u64;

    // The greeting: posted 1-byte writes to the UART's transmit register, then
    // a read of the line status register, which cannot overtake them.
    println!("demo: guest writes a greeting to the UART at pio {COM1:#x}:");
    let pio = fe.pio().clone();
    for b in GREETING.bytes().chain(std::iter::once(b'\n')) {
        pio.try_write(COM1, AccessSize::B1, u64::from(b))?;
        accesses += 1;
    }
    let lsr = pio.try_read(COM1 + 5, AccessSize::B1)?;
    accesses += 1;
    c.check(
        "UART transmitter empty after the greeting",
        lsr & 0x60 == 0x60,
    );

    let s = fe.device("scratch")?;
    let regs = s.placed(0).ok_or("scratch regs not placed")?.addr;
    let aux = s.placed(1).ok_or("scratch aux not placed")?.addr;
    let port = s.placed(2).ok_or("scratch port not placed")?.addr;
    let mmio = fe.mmio().clone();

    // Identification register at every access size.
    for size in AccessSize::ALL {
        let v = mmio.try_read(regs + scratch::REG_ID, size)?;
        accesses += 1;
        c.check(
            &format!("ID read at {} bytes", size.bytes()),
            v == size.truncate(ID),
        );
    }
    // Register bank, aux region and port region at every size: user_data picks the region.
    for (i, size) in AccessSize::ALL.into_iter().enumerate() {
        let pattern = 0x0123_4567_89ab_cdef_u64.rotate_left(8 * i as u32);
        let off = 8 * i as u64;
        mmio.try_write(regs + scratch::BANK + off, size, pattern)?;
        mmio.try_write(aux + off, size, !pattern)?;
        pio.try_write(port + (i as u64 % 2) * 8, size, pattern ^ 0x5a5a)?;
        let a = mmio.try_read(regs + scratch::BANK + off, size)?;
        let b = mmio.try_read(aux + off, size)?;
        let p = pio.try_read(port + (i as u64 % 2) * 8, size)?;
        accesses += 6;
        c.check(
            &format!("bank {}-byte round trip", size.bytes()),
            a == size.truncate(pattern),
        );
        c.check(
            &format!("aux {}-byte round trip", size.bytes()),
            b == size.truncate(!pattern),
        );
        c.check(
            &format!("port {}-byte round trip", size.bytes()),
            p == size.truncate(pattern ^ 0x5a5a),
        );
    }

    // Posted writes, then the one read that proves every one of them arrived in order.
    let count_before = mmio.try_read(regs + scratch::REG_WRITE_COUNT, AccessSize::B8)?;
    let t = Instant::now();
    for v in 1..=POSTED_WRITES {
        mmio.try_write(regs + scratch::REG_ACCUM, AccessSize::B8, v)?;
    }
    let sum = mmio.try_read(regs + scratch::REG_ACCUM, AccessSize::B8)?;
    let posted_time = t.elapsed();
    let count = mmio.try_read(regs + scratch::REG_WRITE_COUNT, AccessSize::B8)? - count_before;
    accesses += POSTED_WRITES + 3;
    c.check(
        "sum of 10,000 posted writes",
        sum == POSTED_WRITES * (POSTED_WRITES + 1) / 2,
    );
    c.check("exact posted-write count", count == POSTED_WRITES);

    // Synchronous round trips, for a feel of the cost (not a benchmark).
    let t = Instant::now();
    for _ in 0..POSTED_WRITES {
        mmio.try_read(regs + scratch::REG_ID, AccessSize::B4)?;
    }
    let read_time = t.elapsed();
    accesses += POSTED_WRITES;

    println!(
        "demo: scratch: ID {:#x}; {POSTED_WRITES} posted writes then one read: sum {sum}, write count {count}",
        ID
    );
    println!(
        "demo: timing on this machine (informal): {:.0} ns per posted write, {:.0} ns per read round trip",
        posted_time.as_nanos() as f64 / POSTED_WRITES as f64,
        read_time.as_nanos() as f64 / POSTED_WRITES as f64
    );
    // Virtio through the test guest's driver: rings in guest RAM, QueueNotify
    // doorbells, completions signalled on the device's interrupt line.
    let ram = fe.memory().ok_or("no guest RAM")?.clone();
    let mut alloc = GuestAllocator::new(0x1000, RAM_SIZE - 0x1000);
    let driver = |fe: &Frontend, name: &str, alloc: &mut GuestAllocator, wanted: u64| {
        let d = fe.device(name)?;
        let base = d.placed(0).ok_or("virtio region not placed")?.addr;
        let irq = d.irq(0).ok_or("no interrupt line")?.clone();
        VirtioMmioDriver::init(
            fe.mmio().clone(),
            base,
            Arc::clone(&ram),
            irq,
            alloc,
            DriverOptions::new(wanted, 128),
        )
        .map_err(AnyError::from)
    };
    let mut disk = BlkClient::new(
        driver(&fe, "disk", &mut alloc, blk::F_FLUSH)?,
        &mut alloc,
        4096,
    )?;
    let capacity = disk.capacity()?;
    let (id_status, id) = disk.get_id()?;
    c.check(
        "virtio-blk GET_ID",
        id_status == blk::S_OK && id == "outboard-demo",
    );
    let t = Instant::now();
    let mut blocks = 0u64;
    let mut all_verified = true;
    for i in 0..256u64 {
        let sector = (i * 97 % (DISK_SECTORS / 8)) * 8;
        let data: Vec<u8> = (0..4096u64)
            .map(|b| (b ^ i.wrapping_mul(31)) as u8)
            .collect();
        let ok_w = disk.write(sector, &data)? == blk::S_OK;
        let mut back = vec![0u8; 4096];
        let ok_r = disk.read(sector, &mut back)? == blk::S_OK;
        all_verified &= ok_w && ok_r && back == data;
        blocks += 2;
    }
    let blk_time = t.elapsed();
    c.check("virtio-blk 256 write/read-back pairs", all_verified);
    c.check("virtio-blk flush", disk.flush()? == blk::S_OK);
    let mut rng = driver(&fe, "rng", &mut alloc, 0)?;
    let buf = alloc.alloc(32, 8)?;
    let random = rng_read(&mut rng, buf, 32)?;
    c.check(
        "virtio-rng 32 bytes, not all zero",
        random.len() == 32 && random.iter().any(|&b| b != 0),
    );
    println!(
        "demo: virtio-blk: {} MiB disk, id {id:?}; {blocks} 4 KiB requests verified ({:.0} us each, informal), flushed",
        (capacity * 512) >> 20,
        blk_time.as_micros() as f64 / blocks as f64
    );
    println!(
        "demo: virtio-rng: {}",
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    accesses += blocks;

    let mut statuses = fe.shutdown();
    match kvm::available() {
        Ok(()) => {
            println!(
                "demo: /dev/kvm is usable: the same backends now serve real guest code on KVM"
            );
            statuses.extend(kvm_demo(options_again(), &mut c)?);
        }
        Err(e) => println!(
            "demo: {}: the socket test driver above stood in for a guest",
            outboard_frontend::error_chain(&e)
        ),
    }
    let clean = statuses.iter().all(|(_, s)| s.is_some_and(|s| s.success()));
    c.check("every backend exited cleanly", clean);
    println!(
        "demo: {accesses} guest accesses and virtio requests over {} backends; {} checks passed, {} failed",
        statuses.len(),
        c.passed,
        c.failed
    );
    if c.failed > 0 {
        return Err(format!("{} checks failed", c.failed).into());
    }
    Ok(())
}
