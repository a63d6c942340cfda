//! Figure 6: KVM guest MMIO reads, device in the frontend vs an Outboard backend.

use crate::AnyError;
use outboard::inprocess::InProcessRegion;
use outboard_backends::scratch::{self, Scratch};
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{DeviceSpec, Frontend, Options};
use outboard_testkit::loader::{self, programs, DATA_ADDR};
use std::sync::Arc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

use super::*;

pub(super) fn kvm_figures(
    r: &mut Report,
    plan: &Plan,
    options: Options,
    local: Arc<InProcessRegion<Scratch>>,
) -> Result<(), AnyError> {
    const LOCAL: u64 = 0xd010_0000;
    const SOCKET: u64 = 0xd020_0000;
    let mut fe = Frontend::new(options);
    fe.set_memory(GuestRam::new(&[(0, 16 << 20)])?)?;
    fe.attach(
        &DeviceSpec::spawn("scratch", "outboard-scratch", &[]).place(0, loader::layout::SCRATCH),
    )?;
    // The same backend with its commands on the data socket, for comparison.
    fe.attach(
        &DeviceSpec::spawn("scratch-socket", "outboard-scratch", &[])
            .cmd_ring(0)
            .place(0, SOCKET),
    )?;
    pin_backends(&fe);
    fe.mmio().insert(LOCAL, scratch::REGS_SIZE, local)?;
    let mut run = |mode: u32, addr: u64, count: u32| -> Result<Duration, AnyError> {
        let g = loader::FlatGuest::new(&mut fe, programs::BENCH, 1, &[])?;
        let ram = fe.memory().ok_or("no guest RAM")?.memory();
        for (at, v) in [
            (DATA_ADDR, mode),
            (DATA_ADDR + 4, addr as u32),
            (DATA_ADDR + 8, count),
        ] {
            ram.write_obj(v, GuestAddress(at))?;
        }
        let res = g.run(Duration::from_secs(300))?;
        if res.exit_code != 0 {
            return Err(format!("bench guest exited with {}", res.exit_code).into());
        }
        Ok(res.elapsed)
    };
    let n = plan.kvm_accesses;
    let per =
        |d: Duration, empty: Duration| (d.saturating_sub(empty)).as_nanos() as f64 / f64::from(n);
    let empty = run(0, LOCAL, 0)?;
    let local_ns = per(run(0, LOCAL, n)?, empty);
    let remote_ns = per(run(0, loader::layout::SCRATCH, n)?, empty);
    let socket_ns = per(run(0, SOCKET, n)?, empty);
    r.add(Figure {
        id: "6a",
        name: "KVM guest MMIO read, device in the frontend".into(),
        value: local_ns,
        unit: "ns",
        p99: None,
        baseline: None,
        ratio: None,
        target: None,
    });
    r.add(Figure {
        id: "6b",
        name: "KVM guest MMIO read, Outboard backend, command ring".into(),
        value: remote_ns,
        unit: "ns",
        p99: None,
        baseline: Some(("in-frontend device (6a)".into(), local_ns)),
        ratio: Some(remote_ns / local_ns.max(1.0)),
        target: Some(("<= 1.25x in-frontend".into(), remote_ns <= 1.25 * local_ns)),
    });
    r.add(Figure {
        id: "6s",
        name: "KVM guest MMIO read, Outboard backend, data socket".into(),
        value: socket_ns,
        unit: "ns",
        p99: None,
        baseline: Some(("in-frontend device (6a)".into(), local_ns)),
        ratio: Some(socket_ns / local_ns.max(1.0)),
        target: None,
    });
    let bell = run(1, loader::layout::SCRATCH + scratch::REG_DB0, n * 10)?;
    let rate = f64::from(n * 10) / bell.saturating_sub(empty).as_secs_f64().max(1e-9);
    r.add(Figure {
        id: "6c",
        name: "KVM guest doorbell writes (KVM_IOEVENTFD, no exit)".into(),
        value: rate,
        unit: "/s",
        p99: None,
        baseline: Some((
            "guest MMIO reads to the backend (6b)".into(),
            1e9 / remote_ns.max(1.0),
        )),
        ratio: Some(rate * remote_ns / 1e9),
        target: None,
    });
    fe.shutdown();
    Ok(())
}
