//! Region negotiation and guest accesses across real backend processes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use outboard_backends::scratch::{self, ID};
use outboard_backends::uart::COM1;
use outboard_frontend::Error as MachineError;
use outboard_frontend::{AccessError, AccessSize, DeviceSpec, Space};
use outboard_protocol::control::{DeviceKind, REGION_PIO};
use outboard_tests::{frontend, spawn_listening, wait_exit};

const T: Duration = Duration::from_secs(10);

/// A frontend with one scratch backend "s"; returns the frontend and the
/// address of the scratch register region.
fn scratch_frontend() -> (outboard_frontend::Frontend, u64) {
    let mut fe = frontend(T);
    let base = fe
        .attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]))
        .unwrap()
        .placed(0)
        .unwrap()
        .addr;
    (fe, base)
}

#[test]
fn attach_when_scratch_spawned_then_regions_negotiated_and_placed() {
    let mut fe = frontend(T);
    let d = fe
        .attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]))
        .unwrap();
    assert_eq!(d.info().kind, DeviceKind::SCRATCH);
    assert_eq!(d.info().name, "scratch");
    assert_eq!(d.regions().len(), 4);
    assert_eq!(d.info().num_doorbells, 3);
    assert_eq!(d.info().num_irqs, 2);
    assert_eq!(d.doorbells().len(), 3);
    assert_eq!(d.regions()[0].size, scratch::REGS_SIZE);
    assert_eq!(d.regions()[2].flags & REGION_PIO, REGION_PIO);
    let regs = d.placed(0).unwrap();
    assert_eq!(regs.space(), Space::Mmio);
    assert!(regs.posted, "scratch regions accept posted writes");
    assert_eq!(d.placed(2).unwrap().space(), Space::Pio);
    let user_data: Vec<u64> = (0..3).map(|i| d.placed(i).unwrap().user_data).collect();
    assert!(user_data[0] != user_data[1] && user_data[1] != user_data[2]);
}

#[test]
fn access_when_every_size_then_values_round_trip() {
    let (fe, base) = scratch_frontend();
    let mmio = fe.mmio().clone();
    for size in AccessSize::ALL {
        assert_eq!(mmio.try_read(base, size).unwrap(), size.truncate(ID));
        for off in (0..16).step_by(size.bytes() as usize) {
            let addr = base + scratch::BANK + off;
            let v = 0xfedc_ba98_7654_3210u64 ^ off;
            mmio.try_write(addr, size, v).unwrap();
            assert_eq!(
                mmio.try_read(addr, size).unwrap(),
                size.truncate(v),
                "size {size:?} off {off}"
            );
        }
    }
    // A narrow write changes only its bytes.
    mmio.try_write(base + scratch::BANK + 0x40, AccessSize::B8, u64::MAX)
        .unwrap();
    mmio.try_write(base + scratch::BANK + 0x42, AccessSize::B1, 0)
        .unwrap();
    assert_eq!(
        mmio.try_read(base + scratch::BANK + 0x40, AccessSize::B8)
            .unwrap(),
        0xffff_ffff_ff00_ffff
    );
}

#[test]
fn access_when_regions_share_offsets_then_user_data_picks_the_region() {
    let mut fe = frontend(T);
    let d = fe
        .attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]))
        .unwrap();
    let (regs, aux, port) = (
        d.placed(0).unwrap().addr,
        d.placed(1).unwrap().addr,
        d.placed(2).unwrap().addr,
    );
    let (mmio, pio) = (fe.mmio().clone(), fe.pio().clone());
    mmio.try_write(aux, AccessSize::B4, 0xaaaa_0001).unwrap();
    pio.try_write(port, AccessSize::B4, 0xbbbb_0002).unwrap();
    assert_eq!(mmio.try_read(aux, AccessSize::B4).unwrap(), 0xaaaa_0001);
    assert_eq!(pio.try_read(port, AccessSize::B4).unwrap(), 0xbbbb_0002);
    // Offset 0 of region 0 is still the ID register.
    assert_eq!(mmio.try_read(regs, AccessSize::B8).unwrap(), ID);
    assert_eq!(
        mmio.try_read(regs + scratch::REG_WRITE_COUNT, AccessSize::B8)
            .unwrap(),
        2
    );
}

#[test]
fn attach_when_two_backends_then_both_serve_independently() {
    let mut fe = frontend(T);
    fe.attach(&DeviceSpec::spawn("a", "outboard-scratch", &[]))
        .unwrap();
    fe.attach(&DeviceSpec::spawn("b", "outboard-scratch", &[]))
        .unwrap();
    let out = std::env::temp_dir().join(format!("outboard-uart-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&out);
    fe.attach(&DeviceSpec::spawn(
        "com1",
        "outboard-uart",
        &["--output", out.to_str().unwrap()],
    ))
    .unwrap();
    let a = fe.device("a").unwrap().placed(0).unwrap().addr;
    let b = fe.device("b").unwrap().placed(0).unwrap().addr;
    assert_ne!(a, b);
    assert_ne!(fe.device("a").unwrap().pid(), fe.device("b").unwrap().pid());
    let mmio = fe.mmio().clone();
    mmio.try_write(a + scratch::REG_ACCUM, AccessSize::B8, 5)
        .unwrap();
    mmio.try_write(b + scratch::REG_ACCUM, AccessSize::B8, 7)
        .unwrap();
    for b_ in b"two backends\n" {
        fe.pio()
            .try_write(COM1, AccessSize::B1, u64::from(*b_))
            .unwrap();
    }
    assert_eq!(
        mmio.try_read(a + scratch::REG_ACCUM, AccessSize::B8)
            .unwrap(),
        5
    );
    assert_eq!(
        mmio.try_read(b + scratch::REG_ACCUM, AccessSize::B8)
            .unwrap(),
        7
    );
    // The LSR read is ordered after the posted THR writes.
    assert_eq!(
        fe.pio().try_read(COM1 + 5, AccessSize::B1).unwrap() & 0x60,
        0x60
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "two backends\n");
    for (name, status) in fe.shutdown() {
        assert!(status.unwrap().success(), "{name} exit status");
    }
    let _ = std::fs::remove_file(&out);
}

#[test]
fn posted_writes_when_10000_then_read_observes_all_in_order() {
    let (fe, base) = scratch_frontend();
    let mmio = fe.mmio().clone();
    for v in 1..=10_000u64 {
        mmio.try_write(base + scratch::REG_ACCUM, AccessSize::B8, v)
            .unwrap();
        mmio.try_write(base + scratch::BANK, AccessSize::B8, v)
            .unwrap();
    }
    assert_eq!(
        mmio.try_read(base + scratch::REG_ACCUM, AccessSize::B8)
            .unwrap(),
        50_005_000
    );
    assert_eq!(
        mmio.try_read(base + scratch::REG_WRITE_COUNT, AccessSize::B8)
            .unwrap(),
        20_000,
        "exact posted-write count"
    );
    // The last write in stream order wins.
    assert_eq!(
        mmio.try_read(base + scratch::BANK, AccessSize::B8).unwrap(),
        10_000
    );
}

#[test]
fn writes_when_not_posted_then_same_results() {
    let mut fe = frontend(T);
    let mut spec = DeviceSpec::spawn("s", "outboard-scratch", &[]);
    spec.posted_writes = false;
    let d = fe.attach(&spec).unwrap();
    assert!(!d.placed(0).unwrap().posted);
    let base = d.placed(0).unwrap().addr;
    let mmio = fe.mmio().clone();
    for v in 1..=1000u64 {
        mmio.try_write(base + scratch::REG_ACCUM, AccessSize::B4, v)
            .unwrap();
    }
    assert_eq!(
        mmio.try_read(base + scratch::REG_ACCUM, AccessSize::B8)
            .unwrap(),
        500_500
    );
}

#[test]
fn attach_when_regions_overlap_then_rejected_and_nothing_mapped() {
    let mut fe = frontend(T);
    fe.attach(&DeviceSpec::spawn("a", "outboard-scratch", &[]).place(0, 0xe000_0000))
        .unwrap();
    let before = fe.mmio().ranges();
    let spec = DeviceSpec::spawn("b", "outboard-scratch", &[]).place(1, 0xe000_0800);
    let err = fe.attach(&spec).unwrap_err();
    assert!(
        matches!(err, MachineError::Placement { index: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("region 1"), "{err}");
    assert_eq!(
        fe.mmio().ranges(),
        before,
        "a refused attach leaves no mapping"
    );
    assert!(fe.device("b").is_err());
    // Two regions of one device colliding with each other are refused as well.
    let spec = DeviceSpec::spawn("c", "outboard-scratch", &[])
        .place(0, 0xf000_0000)
        .place(1, 0xf000_0f00);
    assert!(matches!(
        fe.attach(&spec),
        Err(MachineError::Placement { index: 1, .. })
    ));
    // Port I/O overlaps too: a UART over scratch's port region.
    let port = fe.device("a").unwrap().placed(2).unwrap().addr;
    let spec = DeviceSpec::spawn("u", "outboard-uart", &[]).place(0, port + 4);
    assert!(matches!(
        fe.attach(&spec),
        Err(MachineError::Placement { index: 0, .. })
    ));
}

#[test]
fn remove_when_exact_then_gone_and_access_fails_cleanly() {
    let mut fe = frontend(T);
    let d = fe
        .attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]))
        .unwrap();
    let aux = d.placed(1).unwrap().addr;
    let regs = d.placed(0).unwrap().addr;
    let mmio = fe.mmio().clone();
    mmio.try_write(aux, AccessSize::B4, 1).unwrap();
    assert!(matches!(
        fe.remove_region("s", 1, aux + 0x10),
        Err(MachineError::Device {
            source: outboard_frontend::device::Error::NotPlaced { .. },
            ..
        })
    ));
    assert!(fe.remove_region("s", 1, aux).is_ok());
    assert!(matches!(
        mmio.try_read(aux, AccessSize::B4),
        Err(AccessError::Unmapped(_))
    ));
    assert_eq!(mmio.read(aux, AccessSize::B4), 0xffff_ffff);
    assert!(matches!(
        fe.remove_region("s", 1, aux),
        Err(MachineError::Device {
            source: outboard_frontend::device::Error::NotPlaced { .. },
            ..
        })
    ));
    // The rest of the device is unaffected and the region can come back.
    assert_eq!(mmio.try_read(regs, AccessSize::B8).unwrap(), ID);
    let again = fe.set_region("s", 1, Some(0xd800_0000)).unwrap();
    assert_eq!(again, 0xd800_0000);
    assert_eq!(
        mmio.try_read(again, AccessSize::B4).unwrap(),
        1,
        "device state kept"
    );
    assert!(!fe.device("s").unwrap().is_failed());
}

#[test]
fn reset_when_requested_then_device_state_cleared() {
    let (fe, base) = scratch_frontend();
    let mmio = fe.mmio().clone();
    mmio.try_write(base + scratch::REG_ACCUM, AccessSize::B8, 99)
        .unwrap();
    fe.reset("s").unwrap();
    assert_eq!(
        mmio.try_read(base + scratch::REG_ACCUM, AccessSize::B8)
            .unwrap(),
        0
    );
    assert_eq!(mmio.try_read(base, AccessSize::B8).unwrap(), ID);
}

#[test]
fn connect_when_backend_listening_then_served_and_backend_exits_after_shutdown() {
    let (mut child, path) = spawn_listening("outboard-scratch", &[]);
    let mut fe = frontend(T);
    let d = fe.attach(&DeviceSpec::connect("s", &path)).unwrap();
    let base = d.placed(0).unwrap().addr;
    assert_eq!(fe.mmio().try_read(base, AccessSize::B8).unwrap(), ID);
    fe.detach("s").unwrap();
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status}");
    assert!(!path.exists(), "backend removes its socket on exit");
}

#[test]
fn access_when_size_not_allowed_then_denied_without_reaching_backend() {
    let mut fe = frontend(T);
    fe.attach(&DeviceSpec::spawn("com1", "outboard-uart", &[]))
        .unwrap();
    let pio = fe.pio().clone();
    assert!(matches!(
        pio.try_read(COM1, AccessSize::B4),
        Err(AccessError::Denied)
    ));
    assert_eq!(pio.read(COM1, AccessSize::B2), 0xffff);
    assert!(!fe.device("com1").unwrap().is_failed());
    // Scratch register on the UART still answers one-byte accesses.
    pio.try_write(COM1 + 7, AccessSize::B1, 0x42).unwrap();
    assert_eq!(pio.try_read(COM1 + 7, AccessSize::B1).unwrap(), 0x42);
}

#[test]
fn example_backend_when_spawned_by_path_then_served() {
    let example = outboard_tests::bin_dir()
        .join("examples")
        .join("minimal-device");
    assert!(example.exists(), "{} not built", example.display());
    let mut fe = frontend(T);
    let d = fe
        .attach(&DeviceSpec::spawn("mbox", example.to_str().unwrap(), &[]))
        .unwrap();
    assert_eq!(d.info().name, "mailbox");
    let base = d.placed(0).unwrap().addr;
    let mmio = fe.mmio().clone();
    mmio.try_write(base, AccessSize::B4, 42).unwrap();
    mmio.try_write(base, AccessSize::B4, 43).unwrap();
    assert_eq!(mmio.try_read(base, AccessSize::B4).unwrap(), 43);
    assert_eq!(mmio.try_read(base + 4, AccessSize::B4).unwrap(), 2);
    assert!(matches!(
        mmio.try_read(base, AccessSize::B8),
        Err(AccessError::Denied)
    ));
}

#[test]
fn place_when_posted_writes_disabled_then_later_placements_not_posted_either() {
    let mut fe = frontend(T);
    let mut spec = DeviceSpec::spawn("s", "outboard-scratch", &[]);
    spec.regions.push(outboard_frontend::Placement {
        index: 1,
        addr: None,
        skip: true,
    });
    spec.posted_writes = false;
    fe.attach(&spec).unwrap();
    let at = fe.set_region("s", 1, None).unwrap();
    assert!(!fe.device("s").unwrap().placed(1).unwrap().posted);
    fe.mmio().try_write(at, AccessSize::B2, 0x1234).unwrap();
    assert_eq!(fe.mmio().try_read(at, AccessSize::B2).unwrap(), 0x1234);
}

#[test]
fn refused_request_then_device_not_marked_failed() {
    let mut fe = frontend(T);
    fe.attach(&DeviceSpec::spawn("s", "outboard-scratch", &[]))
        .unwrap();
    // Region 0 is placed already: the backend refuses a second placement.
    let err = fe.set_region("s", 0, Some(0xdf00_0000)).unwrap_err();
    assert!(
        matches!(
            err,
            MachineError::Device {
                source: outboard_frontend::device::Error::Backend(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("s"), "{err}");
    assert!(!fe.device("s").unwrap().is_failed());
    assert!(fe.reset("s").is_ok());
}

#[test]
fn access_when_made_by_a_vcpu_then_backend_learns_which_through_its_token() {
    let (fe, base) = scratch_frontend();
    let d = fe.device("s").unwrap();
    assert_eq!(
        d.placed(0).unwrap().vcpu_tokens,
        outboard_frontend::attached::DEFAULT_VCPU_TOKENS
    );
    let mmio = fe.mmio().clone();
    let last = || {
        mmio.try_read(base + scratch::REG_LAST_VCPU, AccessSize::B8)
            .unwrap()
    };
    mmio.try_write_by(Some(3), base + scratch::BANK, AccessSize::B4, 1)
        .unwrap();
    assert_eq!(last(), 4, "vCPU 3");
    mmio.try_write(base + scratch::BANK, AccessSize::B4, 1)
        .unwrap();
    assert_eq!(last(), 0, "no vCPU");
    mmio.try_write_by(Some(7), base + scratch::BANK, AccessSize::B4, 1)
        .unwrap();
    assert_eq!(last(), 8, "vCPU 7, the last with a token");
    mmio.try_write_by(Some(8), base + scratch::BANK, AccessSize::B4, 1)
        .unwrap();
    assert_eq!(last(), 0, "beyond the tokens: the base token");
    // Reads and posted writes keep working from every vCPU.
    for v in 0..10 {
        assert_eq!(mmio.try_read_by(Some(v), base, AccessSize::B8).unwrap(), ID);
    }
}
