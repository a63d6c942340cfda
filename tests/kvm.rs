//! Real guest code on KVM drives the backends: the same processes, the same
//! buses, with ioeventfd doorbells and irqfd interrupts in the kernel.
//!
//! Where /dev/kvm is not usable each test prints `skipped: /dev/kvm
//! unavailable` (and fails instead when `OUTBOARD_REQUIRE_KVM` is set, as
//! `.ci/run` does on machines that have KVM).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use outboard_frontend::kvm::{self, RunResult};
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{DeviceSpec, Frontend};
use outboard_testkit::loader::{programs, run_program};
use outboard_tests::frontend;

const T: Duration = Duration::from_secs(10);
const SCRATCH: u64 = 0xd000_0000;
const BLK: u64 = 0xd001_0000;
const RNG: u64 = 0xd002_0000;

fn kvm_or_skip() -> bool {
    match kvm::available() {
        Ok(()) => true,
        Err(e) => {
            assert!(
                std::env::var_os("OUTBOARD_REQUIRE_KVM").is_none(),
                "KVM required but unusable: {e}"
            );
            println!("skipped: /dev/kvm unavailable ({e})");
            false
        }
    }
}

fn vm_frontend() -> Frontend {
    let mut fe = frontend(T);
    fe.set_memory(GuestRam::new(&[(0, 16 << 20)]).unwrap())
        .unwrap();
    fe
}

fn run(fe: &mut Frontend, vcpus: usize, program: &[u8], irqs: &[(&str, u32, u32)]) -> RunResult {
    run_program(fe, program, vcpus, irqs, Duration::from_secs(60)).unwrap()
}

fn uart(fe: &mut Frontend, tag: &str) -> std::path::PathBuf {
    let log = std::env::temp_dir().join(format!("outboard-kvm-{tag}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    fe.attach(&DeviceSpec::spawn(
        "com1",
        "outboard-uart",
        &["--output", log.to_str().unwrap()],
    ))
    .unwrap();
    log
}

fn scratch(fe: &mut Frontend) {
    fe.attach(&DeviceSpec::spawn("scratch", "outboard-scratch", &[]).place(0, SCRATCH))
        .unwrap();
}

#[test]
fn hello_when_run_on_kvm_then_greeting_reaches_the_uart_backend() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "hello");
    let r = run(&mut fe, 1, programs::HELLO, &[]);
    assert_eq!(r.exit_code, 0);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "Hello from a KVM guest, through the outboard-uart backend!\n"
    );
    assert!(r.stats.pio_exits() > 50);
    let _ = std::fs::remove_file(&log);
}

#[test]
fn registers_when_run_on_kvm_then_every_size_and_10000_posted_writes_check_out() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "registers");
    scratch(&mut fe);
    let r = run(&mut fe, 1, programs::REGISTERS, &[]);
    assert_eq!(r.exit_code, 0, "guest exit code (see guests/registers.S)");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "registers: all sizes ok, 10000 posted writes arrived\n"
    );
    assert!(r.stats.mmio_exits() >= 10_000);
    let _ = std::fs::remove_file(&log);
}

/// The sectors guests/virtio.S writes through one indirect table and reads
/// back through another: dword `i` of sector `s` holds `(s << 16) | i`.
const RING_SECTORS: std::ops::Range<usize> = 1000..1126;
/// guests/virtio.S's counters (u32, BLK_RING + 0x814 and + 0x818): the
/// QueueNotify writes it made and the ones vring_need_event spared it.
const GUEST_NOTIFIES: u64 = 0x20_0814;
const GUEST_NOTIFIES_SKIPPED: u64 = 0x20_0818;
/// The block requests guests/virtio.S submits, each deciding once whether to notify.
const GUEST_BLK_REQUESTS: u32 = 5;

/// What guests/virtio.S's exit codes mean.
fn virtio_exit(code: u32) -> &'static str {
    match code {
        0 => "ok",
        11..=15 | 21..=25 => "init step failed (magic, version, ID, FEATURES_OK, QueueNumMax)",
        16 | 26 => "a wanted feature is not offered",
        17 => "seg_max below 126",
        30 => "blk status not OK",
        31 | 32 => "sector 0 or 1 data wrong",
        33 => "used element: unknown id or wrong length",
        34 => "read-back data wrong or in the wrong buffer",
        35 => "canary beside a read buffer overwritten",
        36 => "avail_event not the avail index after a completion",
        37 => "no used-buffer interrupt although used_event asked for one",
        38 => "used-buffer interrupt although used_event was far ahead",
        40 | 41 => "rng length or all-zero bytes",
        _ => "unknown",
    }
}

#[test]
fn virtio_when_guest_driver_runs_on_kvm_then_sectors_and_random_bytes_arrive() {
    if !kvm_or_skip() {
        return;
    }
    let image = std::env::temp_dir().join(format!("outboard-kvm-{}.img", std::process::id()));
    // Every sector past the signatures carries a byte the guest must leave alone.
    let mut data: Vec<u8> = (0..1 << 20).map(|i: usize| (i / 512 % 251) as u8).collect();
    data[..512].fill(0);
    data[..8].copy_from_slice(b"OUTBOARD");
    data[512..1024].fill(0);
    data[512..520].copy_from_slice(b"SECTOR-1");
    std::fs::write(&image, &data).unwrap();
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "virtio");
    fe.attach(
        &DeviceSpec::spawn(
            "blk",
            "outboard-virtio-blk",
            &["--path", image.to_str().unwrap()],
        )
        .place(0, BLK),
    )
    .unwrap();
    fe.attach(&DeviceSpec::spawn("rng", "outboard-virtio-rng", &[]).place(0, RNG))
        .unwrap();
    let r = run(
        &mut fe,
        1,
        programs::VIRTIO,
        &[("blk", 0, 5), ("rng", 0, 6)],
    );
    assert_eq!(
        r.exit_code,
        0,
        "guest exit code: {} (see guests/virtio.S)",
        virtio_exit(r.exit_code)
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "virtio: indirect tables of up to 128 descriptors and event-idx on virtio-blk, 64 bytes from virtio-rng\n"
    );
    // QueueNotify writes are ioeventfds: no exit at either device's notify
    // register. The whole run (two initializations, five block requests,
    // one rng request) exits only for register accesses: about 65.
    assert_eq!(r.stats.mmio_exits_at(BLK + 0x50), 0);
    assert_eq!(r.stats.mmio_exits_at(RNG + 0x50), 0);
    assert!(
        r.stats.mmio_exits() <= 100,
        "{} MMIO exits",
        r.stats.mmio_exits()
    );
    // The image holds the 126 sectors the guest wrote and nothing else
    // changed: its reads, 252 segments of them, wrote nothing to the disk.
    let mut want = data;
    for s in RING_SECTORS {
        for i in 0..128 {
            let v = ((s as u32) << 16) | i as u32;
            want[s * 512 + 4 * i..][..4].copy_from_slice(&v.to_le_bytes());
        }
    }
    let got = std::fs::read(&image).unwrap();
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!(diff, None, "first differing byte of the image");
    // Every request made one notify decision; the first four found the
    // device idle with avail_event at the avail index, so they notified.
    use vm_memory::Bytes;
    let ram = fe.memory().unwrap().memory();
    let notifies: u32 = ram
        .read_obj(vm_memory::GuestAddress(GUEST_NOTIFIES))
        .unwrap();
    let skipped: u32 = ram
        .read_obj(vm_memory::GuestAddress(GUEST_NOTIFIES_SKIPPED))
        .unwrap();
    assert_eq!(notifies + skipped, GUEST_BLK_REQUESTS);
    assert!(notifies >= GUEST_BLK_REQUESTS - 1, "{notifies} notifies");
    println!(
        "{notifies} notifies, {skipped} spared by event-idx, {} MMIO exits",
        r.stats.mmio_exits()
    );
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&image);
}

/// A virtio-mmio block device's identification and feature registers, with
/// VERSION_1, INDIRECT_DESC and SEG_MAX but not EVENT_IDX; every other
/// register reads zero and ignores writes.
#[derive(Debug, Default)]
struct BlkWithoutEventIdx {
    features_sel: std::sync::atomic::AtomicU64,
}

impl outboard_frontend::BusDevice for BlkWithoutEventIdx {
    fn read(&self, a: outboard_frontend::Access) -> Result<u64, outboard_frontend::AccessError> {
        let sel = self.features_sel.load(std::sync::atomic::Ordering::SeqCst);
        Ok(match a.offset {
            0x000 => 0x7472_6976, // "virt"
            0x004 => 2,           // version
            0x008 => 2,           // block
            0x010 if sel == 1 => 1,
            0x010 => (1 << 28) | (1 << 2),
            0x034 => 1024,
            _ => 0,
        })
    }

    fn write(
        &self,
        a: outboard_frontend::Access,
        v: u64,
    ) -> Result<(), outboard_frontend::AccessError> {
        if a.offset == 0x014 {
            self.features_sel
                .store(v, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
}

#[test]
fn virtio_when_the_blk_device_lacks_event_idx_then_the_guest_driver_exits_16() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    fe.mmio()
        .insert(
            BLK,
            0x1000,
            std::sync::Arc::new(BlkWithoutEventIdx::default()),
        )
        .unwrap();
    let r = run(&mut fe, 1, programs::VIRTIO, &[]);
    assert_eq!(
        r.exit_code,
        16,
        "guest exit code: {} (see guests/virtio.S)",
        virtio_exit(r.exit_code)
    );
}

#[test]
fn doorbells_when_100000_written_by_the_guest_then_no_exit_and_all_counted() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    scratch(&mut fe);
    let r = run(&mut fe, 1, programs::DOORBELLS, &[]);
    assert_eq!(r.exit_code, 0);
    assert_eq!(
        r.stats.mmio_exits_at(SCRATCH + 0x28),
        0,
        "doorbell writes never exit"
    );
    let count = fe
        .mmio()
        .try_read(SCRATCH + 0x30, outboard_frontend::AccessSize::B8)
        .unwrap();
    let wakeups = fe
        .mmio()
        .try_read(SCRATCH + 0x38, outboard_frontend::AccessSize::B8)
        .unwrap();
    assert_eq!(
        count, 100_000,
        "the backend observed every ring (coalesced)"
    );
    println!("100000 doorbell rings reached the backend in {wakeups} wake-ups");
}

#[test]
fn interrupts_when_10000_raised_by_the_backend_then_each_wakes_the_guest_from_hlt() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    scratch(&mut fe);
    let r = run(&mut fe, 1, programs::INTERRUPTS, &[("scratch", 0, 3)]);
    assert_eq!(r.exit_code, 0, "guest exit code (see guests/interrupts.S)");
}

#[test]
fn smp_when_two_vcpus_hammer_one_backend_then_totals_exact() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "smp");
    scratch(&mut fe);
    let r = run(&mut fe, 2, programs::SMP, &[]);
    assert_eq!(r.exit_code, 0, "guest exit code (see guests/smp.S)");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "smp: two vCPUs, 10000 writes, exact totals\n"
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn backend_killed_while_a_vcpu_waits_then_all_ones_and_the_vm_finishes() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    scratch(&mut fe);
    let pid = fe.device("scratch").unwrap().pid().unwrap();
    // The backend cannot answer: the guest's first read waits on it.
    outboard_tests::signal(pid, libc::SIGSTOP);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        outboard_tests::signal(pid, libc::SIGKILL);
    });
    let r = run(&mut fe, 1, programs::REGISTERS, &[]);
    killer.join().unwrap();
    // The ID read came back all-ones (exit code 1: "ID read at 1 byte"), and
    // the guest ran on to its exit instead of wedging the VM.
    assert_eq!(r.exit_code, 1);
    assert!(fe.device("scratch").unwrap().is_failed());
}

#[test]
fn shutdown_when_guest_exits_then_every_backend_exits_cleanly() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    let log = uart(&mut fe, "shutdown");
    scratch(&mut fe);
    let r = run(&mut fe, 1, programs::HELLO, &[]);
    assert_eq!(r.exit_code, 0);
    for (name, status) in fe.shutdown() {
        assert!(status.unwrap().success(), "{name}");
    }
    let _ = std::fs::remove_file(&log);
}

/// Drives guests/relocate.S: one round of `writes` doorbell writes at `addr`.
struct Rounds {
    ram: std::sync::Arc<outboard_frontend::memory::GuestRam>,
    round: u32,
}

impl Rounds {
    const DATA: u64 = outboard_testkit::loader::DATA_ADDR;

    fn poke(&self, off: u64, v: u32) {
        use vm_memory::Bytes;
        self.ram
            .memory()
            .write_obj(v, vm_memory::GuestAddress(Self::DATA + off))
            .unwrap();
    }

    fn peek(&self, off: u64) -> u32 {
        use vm_memory::Bytes;
        self.ram
            .memory()
            .read_obj(vm_memory::GuestAddress(Self::DATA + off))
            .unwrap()
    }

    fn go(&mut self, addr: u64, writes: u32) {
        self.round += 1;
        self.poke(0x14, addr as u32);
        self.poke(0x18, writes);
        self.poke(0x10, self.round);
        let deadline = std::time::Instant::now() + outboard_tests::HANG_GUARD;
        while self.peek(0x1c) != self.round {
            assert!(std::time::Instant::now() < deadline, "round {}", self.round);
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Scratch's doorbell-0 count once it reaches `want` (doorbells are counted
/// when the backend drains the eventfd), or whatever it is at the hang guard.
fn db0_count(fe: &Frontend, base: u64, want: u32) -> u64 {
    let deadline = std::time::Instant::now() + outboard_tests::HANG_GUARD;
    loop {
        let c = fe
            .mmio()
            .try_read(base + 0x30, outboard_frontend::AccessSize::B8)
            .unwrap();
        if c >= u64::from(want) || std::time::Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn doorbells_when_region_moved_and_removed_while_guest_runs_then_registrations_follow() {
    if !kvm_or_skip() {
        return;
    }
    const N: u32 = 1000;
    const MOVED: u64 = 0xd010_0000;
    const DB0: u64 = 0x28;
    let mut fe = vm_frontend();
    scratch(&mut fe);
    let guest =
        outboard_testkit::loader::FlatGuest::new(&mut fe, programs::RELOCATE, 1, &[]).unwrap();
    let stats = guest.machine.stats();
    let runner = std::thread::spawn(move || guest.run(Duration::from_secs(120)));
    let mut rounds = Rounds {
        ram: fe.memory().unwrap().clone(),
        round: 0,
    };
    // Placed at attach: the doorbell is an ioeventfd, no exit.
    rounds.go(SCRATCH + DB0, N);
    assert_eq!(stats.mmio_exits_at(SCRATCH + DB0), 0);
    assert_eq!(db0_count(&fe, SCRATCH, N), u64::from(N));
    // Moved (remove + place elsewhere): the ioeventfd moves with it.
    fe.remove_region("scratch", 0, SCRATCH).unwrap();
    assert_eq!(fe.set_region("scratch", 0, Some(MOVED)).unwrap(), MOVED);
    rounds.go(MOVED + DB0, N);
    assert_eq!(
        stats.mmio_exits_at(MOVED + DB0),
        0,
        "no exit at the new address"
    );
    assert_eq!(db0_count(&fe, MOVED, 2 * N), u64::from(2 * N));
    // The old address is unclaimed now: every write exits and goes nowhere.
    rounds.go(SCRATCH + DB0, N);
    assert_eq!(stats.mmio_exits_at(SCRATCH + DB0), u64::from(N));
    assert_eq!(db0_count(&fe, MOVED, 0), u64::from(2 * N), "nothing rang");
    // Removed altogether: the new address is unclaimed as well.
    fe.remove_region("scratch", 0, MOVED).unwrap();
    rounds.go(MOVED + DB0, N);
    assert_eq!(stats.mmio_exits_at(MOVED + DB0), u64::from(N));
    // Placed back where it began: exit-free again.
    fe.set_region("scratch", 0, Some(SCRATCH)).unwrap();
    rounds.go(SCRATCH + DB0, N);
    assert_eq!(
        stats.mmio_exits_at(SCRATCH + DB0),
        u64::from(N),
        "no new exits"
    );
    assert_eq!(db0_count(&fe, SCRATCH, 3 * N), u64::from(3 * N));
    rounds.poke(0x10, u32::MAX);
    let r = runner.join().unwrap().unwrap();
    assert_eq!(r.exit_code, 0);
}

#[test]
fn uart_when_a_kvm_guest_waits_for_input_then_the_typed_line_arrives_by_interrupt() {
    if !kvm_or_skip() {
        return;
    }
    let mut fe = vm_frontend();
    let log = std::env::temp_dir().join(format!("outboard-kvm-echo-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let input = outboard_tests::socket_path("echo-input");
    fe.attach(&DeviceSpec::spawn(
        "com1",
        "outboard-uart",
        &[
            "--output",
            log.to_str().unwrap(),
            "--input-socket",
            input.to_str().unwrap(),
        ],
    ))
    .unwrap();
    let guest = outboard_testkit::loader::FlatGuest::new(
        &mut fe,
        programs::ECHO,
        1,
        &[("com1", 0, outboard_testkit::loader::layout::GSI_UART)],
    )
    .unwrap();
    let rounds = Rounds {
        ram: fe.memory().unwrap().clone(),
        round: 0,
    };
    let runner = std::thread::spawn(move || guest.run(Duration::from_secs(120)));
    // The guest says when it waits in hlt with the interrupt enabled.
    let deadline = std::time::Instant::now() + outboard_tests::HANG_GUARD;
    while rounds.peek(0x20) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never got ready"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    use std::io::Write;
    let mut typist = outboard_tests::connect_stream(&input);
    typist.write_all(b"typed on the host\n").unwrap();
    let r = runner.join().unwrap().unwrap();
    assert_eq!(r.exit_code, 0, "1: no interrupt taken (see guests/echo.S)");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "echo: typed on the host\n"
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn virtio_when_blk_backend_killed_repeatedly_under_the_kvm_guest_driver_then_it_finishes_ok() {
    if !kvm_or_skip() {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let image =
        std::env::temp_dir().join(format!("outboard-kvm-restart-{}.img", std::process::id()));
    let mut data: Vec<u8> = (0..1 << 20).map(|i: usize| (i / 512 % 251) as u8).collect();
    data[..512].fill(0);
    data[..8].copy_from_slice(b"OUTBOARD");
    data[512..1024].fill(0);
    data[512..520].copy_from_slice(b"SECTOR-1");
    let policy = outboard_frontend::RestartPolicy {
        backoff: Duration::ZERO,
        ..outboard_frontend::RestartPolicy::on_failure()
    };
    let mut kills_total = 0;
    for round in 0..10u64 {
        std::fs::write(&image, &data).unwrap();
        let mut fe = vm_frontend();
        let log = uart(&mut fe, "virtio-restart");
        fe.attach(
            &DeviceSpec::spawn(
                "blk",
                "outboard-virtio-blk",
                &["--path", image.to_str().unwrap()],
            )
            .place(0, BLK)
            .restart(policy),
        )
        .unwrap();
        fe.attach(&DeviceSpec::spawn("rng", "outboard-virtio-rng", &[]).place(0, RNG))
            .unwrap();
        let link = Arc::clone(fe.device("blk").unwrap().remote().unwrap().link());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // Kills at 0-40 ms intervals while the guest runs (its run takes
        // about 160 ms on this nested KVM), from its driver's first
        // register write on: posted writes the dead backend never read
        // are sent again to the next one.
        let killer = std::thread::spawn(move || {
            let mut kills = 0;
            let mut t = 0x1234_5678u64.wrapping_add(round);
            while !flag.load(Ordering::Acquire) {
                t ^= t << 13;
                t ^= t >> 7;
                t ^= t << 17;
                std::thread::sleep(Duration::from_micros(t % 40_000));
                let generation = link.generation();
                let Some(pid) = link.conn().pid() else { break };
                if flag.load(Ordering::Acquire) {
                    break;
                }
                outboard_tests::signal(pid, libc::SIGKILL);
                kills += 1;
                while link.generation() == generation && !flag.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            kills
        });
        let r = run(
            &mut fe,
            1,
            programs::VIRTIO,
            &[("blk", 0, 5), ("rng", 0, 6)],
        );
        stop.store(true, Ordering::Release);
        kills_total += killer.join().unwrap();
        assert_eq!(
            r.exit_code,
            0,
            "round {round}: guest exit code: {} (see guests/virtio.S)",
            virtio_exit(r.exit_code)
        );
        let got = std::fs::read(&image).unwrap();
        for s in RING_SECTORS {
            for i in 0..128 {
                let v = ((s as u32) << 16) | i as u32;
                assert_eq!(got[s * 512 + 4 * i..][..4], v.to_le_bytes(), "sector {s}");
            }
        }
        assert!(!fe.device("blk").unwrap().is_failed());
        let _ = std::fs::remove_file(&log);
    }
    println!("{kills_total} kills over 10 guest runs");
    assert!(kills_total >= 10, "{kills_total} kills");
    let _ = std::fs::remove_file(&image);
}
