//! Guest memory, doorbells and interrupts between the frontend and a real
//! backend process (`outboard-scratch`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::thread;
use std::time::{Duration, Instant};

use outboard_backends::scratch::*;
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{AccessError, AccessSize, DeviceSpec, Frontend};
use outboard_tests::{frontend, signal, HANG_GUARD};
use vm_memory::{Bytes, GuestAddress};

const T: Duration = Duration::from_secs(10);

fn scratch(fe: &mut Frontend) -> (u64, u64) {
    let d = fe
        .attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]))
        .unwrap();
    (d.placed(0).unwrap().addr, d.placed(3).unwrap().addr)
}

fn reg(fe: &Frontend, base: u64, off: u64) -> u64 {
    fe.mmio().try_read(base + off, AccessSize::B8).unwrap()
}

/// Polls a register until it reaches `want` (doorbells and data commands
/// travel on different fds, so a read may overtake a doorbell).
fn wait_reg(fe: &Frontend, base: u64, off: u64, want: u64) {
    let t = Instant::now();
    loop {
        let v = reg(fe, base, off);
        if v == want {
            return;
        }
        assert!(v < want, "register {off:#x} overshot: {v} > {want}");
        assert!(
            t.elapsed() < HANG_GUARD,
            "register {off:#x} stuck at {v}, want {want}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

fn wait_stopped(pid: u32) {
    let t = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        if stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().next())
            == Some("T")
        {
            return;
        }
        assert!(t.elapsed() < HANG_GUARD);
        thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn memory_table_when_set_then_backend_reads_and_writes_guest_ram() {
    let mut fe = frontend(T);
    fe.set_memory(GuestRam::new(&[(0, 0x10_0000), (0x4000_0000, 0x1000)]).unwrap())
        .unwrap();
    let (base, _) = scratch(&mut fe);
    let ram = fe.memory().unwrap().clone();
    ram.memory()
        .write_obj(0xfeed_f00d_u64, GuestAddress(0x1000))
        .unwrap();
    let mmio = fe.mmio().clone();
    mmio.try_write(base + REG_MEM_ADDR, AccessSize::B8, 0x1000)
        .unwrap();
    assert_eq!(reg(&fe, base, REG_MEM_DATA), 0xfeed_f00d);
    // The backend writes; the frontend sees it in the same memfd.
    mmio.try_write(base + REG_MEM_ADDR, AccessSize::B8, 0x4000_0ff8)
        .unwrap();
    mmio.try_write(base + REG_MEM_DATA, AccessSize::B8, 0x1122_3344)
        .unwrap();
    assert_eq!(reg(&fe, base, REG_MEM_DATA), 0x1122_3344);
    assert_eq!(
        ram.memory()
            .read_obj::<u64>(GuestAddress(0x4000_0ff8))
            .unwrap(),
        0x1122_3344
    );
    // Outside the table, and straddling its end: refused by vm-memory, not a host access.
    for addr in [0x2000_0000u64, 0x4000_0ffc, u64::MAX - 3] {
        mmio.try_write(base + REG_MEM_ADDR, AccessSize::B8, addr)
            .unwrap();
        assert_eq!(reg(&fe, base, REG_MEM_DATA), u64::MAX, "{addr:#x}");
        mmio.try_write(base + REG_MEM_DATA, AccessSize::B8, 5)
            .unwrap();
    }
    assert!(!fe.device("s").unwrap().is_failed());
    assert_eq!(reg(&fe, base, REG_ID), ID);
}

#[test]
fn memory_table_when_swapped_while_idle_then_new_mapping_used() {
    let mut fe = frontend(T);
    fe.set_memory(GuestRam::new(&[(0, 0x10000)]).unwrap())
        .unwrap();
    let (base, _) = scratch(&mut fe);
    fe.memory()
        .unwrap()
        .memory()
        .write_obj(1u64, GuestAddress(0x100))
        .unwrap();
    fe.mmio()
        .try_write(base + REG_MEM_ADDR, AccessSize::B8, 0x100)
        .unwrap();
    assert_eq!(reg(&fe, base, REG_MEM_DATA), 1);
    // New RAM: different memfds, a different layout.
    let ram2 = GuestRam::new(&[(0, 0x1000), (0x8000_0000, 0x2000)]).unwrap();
    ram2.memory().write_obj(2u64, GuestAddress(0x100)).unwrap();
    ram2.memory()
        .write_obj(3u64, GuestAddress(0x8000_1000))
        .unwrap();
    fe.set_memory(ram2).unwrap();
    assert_eq!(reg(&fe, base, REG_MEM_DATA), 2, "same address, new memfd");
    fe.mmio()
        .try_write(base + REG_MEM_ADDR, AccessSize::B8, 0x8000_1000)
        .unwrap();
    assert_eq!(reg(&fe, base, REG_MEM_DATA), 3);
    fe.mmio()
        .try_write(base + REG_MEM_ADDR, AccessSize::B8, 0x8000)
        .unwrap();
    assert_eq!(
        reg(&fe, base, REG_MEM_DATA),
        u64::MAX,
        "the old layout is gone"
    );
}

#[test]
fn doorbell_when_rung_while_backend_stopped_then_coalesced_without_loss() {
    let mut fe = frontend(T);
    let (base, _) = scratch(&mut fe);
    let pid = fe.device("s").unwrap().pid().unwrap();
    let writes_before = reg(&fe, base, REG_WRITE_COUNT);
    signal(pid, libc::SIGSTOP);
    wait_stopped(pid);
    for _ in 0..1000 {
        // The backend is stopped: these complete without it, as ioeventfd writes do.
        fe.mmio()
            .try_write(base + REG_DB0, AccessSize::B4, 7)
            .unwrap();
    }
    signal(pid, libc::SIGCONT);
    wait_reg(&fe, base, REG_DB0_COUNT, 1000);
    assert_eq!(
        reg(&fe, base, REG_DB0_WAKEUPS),
        1,
        "1000 rings, one wake-up"
    );
    assert_eq!(
        reg(&fe, base, REG_WRITE_COUNT),
        writes_before,
        "doorbell writes never travel as data commands"
    );
}

#[test]
fn doorbell_when_datamatch_differs_then_write_takes_the_command_path() {
    let mut fe = frontend(T);
    let (base, _) = scratch(&mut fe);
    let mmio = fe.mmio().clone();
    mmio.try_write(base + REG_DB1, AccessSize::B4, DB1_MATCH)
        .unwrap();
    mmio.try_write(base + REG_DB1, AccessSize::B4, 0x9999)
        .unwrap();
    // Wrong size: not the doorbell either.
    mmio.try_write(base + REG_DB1, AccessSize::B2, DB1_MATCH)
        .unwrap();
    mmio.try_write(base + REG_DB1, AccessSize::B4, DB1_MATCH)
        .unwrap();
    wait_reg(&fe, base, REG_DB1_COUNT, 2);
    assert_eq!(reg(&fe, base, REG_DB1_MISSES), 2);
    assert_eq!(
        reg(&fe, base, REG_LAST),
        DB1_MATCH,
        "the 2-byte write came as a command"
    );
}

#[test]
fn fast_mmio_when_written_at_any_size_then_doorbell_rings_and_data_ignored() {
    let mut fe = frontend(T);
    let (base, kick) = scratch(&mut fe);
    let mmio = fe.mmio().clone();
    for (size, v) in [
        (AccessSize::B1, 1),
        (AccessSize::B4, 0xdead),
        (AccessSize::B8, u64::MAX),
    ] {
        mmio.try_write(kick, size, v).unwrap();
    }
    wait_reg(&fe, base, REG_DB2_COUNT, 3);
    assert!(matches!(
        mmio.try_read(kick, AccessSize::B4),
        Err(AccessError::Denied)
    ));
    assert!(matches!(
        mmio.try_write(kick + 4, AccessSize::B4, 1),
        Err(AccessError::Denied)
    ));
    assert_eq!(
        reg(&fe, base, REG_WRITE_COUNT),
        0,
        "nothing reached the data socket"
    );
}

#[test]
fn interrupts_when_10000_raised_then_all_delivered() {
    let mut fe = frontend(T);
    let (base, _) = scratch(&mut fe);
    let line = fe.device("s").unwrap().irq(0).unwrap().clone();
    assert!(
        line.resample_eventfd().is_none(),
        "line 0 is edge-triggered"
    );
    for _ in 0..10 {
        fe.mmio()
            .try_write(base + REG_IRQ_RAISE, AccessSize::B8, 1000)
            .unwrap();
    }
    let t = Instant::now();
    let mut seen = 0;
    while seen < 10_000 {
        seen = line
            .wait_beyond(seen, HANG_GUARD)
            .expect("interrupts stopped arriving");
        assert!(t.elapsed() < HANG_GUARD);
    }
    assert_eq!(seen, 10_000);
}

#[test]
fn level_interrupt_when_still_asserted_at_eoi_then_resampled_and_raised_again() {
    let mut fe = frontend(T);
    let (base, _) = scratch(&mut fe);
    let line = fe.device("s").unwrap().irq(1).unwrap().clone();
    assert!(line.resample_eventfd().is_some());
    fe.mmio()
        .try_write(base + REG_IRQ_LEVEL, AccessSize::B8, 1)
        .unwrap();
    let n = line.wait_beyond(0, HANG_GUARD).unwrap();
    line.end_of_interrupt().unwrap();
    let n = line
        .wait_beyond(n, HANG_GUARD)
        .expect("re-raised after EOI while asserted");
    fe.mmio()
        .try_write(base + REG_IRQ_LEVEL, AccessSize::B8, 0)
        .unwrap();
    // The write is posted and the EOI travels on another fd: read it back
    // first, as a driver does, so the backend has deasserted before the EOI.
    assert_eq!(reg(&fe, base, REG_IRQ_LEVEL), 0);
    line.end_of_interrupt().unwrap();
    assert_eq!(line.wait_beyond(n, Duration::from_millis(200)), None);
}
