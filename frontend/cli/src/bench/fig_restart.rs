//! Figures 10u and 10r: replacing a backend under load. A confined
//! outboard-virtio-blk under `restart = "on-failure"` serves 4 KiB random
//! I/O at queue depth 16 from the bench's test-guest driver while another
//! thread replaces its backend, first by live upgrades (10u: the blackout,
//! from the pause to the first register read served afterwards: the time
//! accesses were held plus one read), then by
//! SIGKILL (10r: the restart time, from the kill to the first register
//! read served by the new backend). The baseline, in the same run, is
//! attaching the same device from nothing (spawn, negotiate, place). Any
//! I/O error under the load fails the bench.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outboard_frontend::{AccessSize, DeviceSpec, Frontend, Options};

use super::fig_blk::{blk_iops, blk_setup, RESTARTABLE};
use super::*;
use crate::AnyError;

/// A register read through the bus: virtio-mmio MagicValue.
fn served(bus: &outboard_frontend::Bus, addr: u64) -> Result<(), AnyError> {
    let v = bus.try_read(addr, AccessSize::B4)?;
    if v != 0x7472_6976 {
        return Err(format!("MagicValue read {v:#x}").into());
    }
    Ok(())
}

pub(super) fn restart_figures(
    r: &mut Report,
    plan: &Plan,
    options: Options,
) -> Result<(), AnyError> {
    let image = temp_path("restart.img");
    std::fs::File::create(&image)?.set_len(super::fig_blk::IMAGE_SECTORS * 512)?;
    let rounds = if plan.blk_ops < 10_000 { 10 } else { 30 };
    // The baseline: the same device attached from nothing, `rounds` times.
    let path = image.to_str().ok_or("image path is not UTF-8")?.to_owned();
    let mut attach_ns = Vec::new();
    for _ in 0..rounds {
        let mut fe = Frontend::new(options.clone());
        fe.set_memory(outboard_frontend::memory::GuestRam::new(&[(0, 64 << 20)])?)?;
        let t = Instant::now();
        fe.attach(&DeviceSpec::spawn(
            "blk",
            "outboard-virtio-blk",
            &["--path", &path],
        ))?;
        attach_ns.push(t.elapsed().as_nanos() as u64);
        fe.shutdown();
    }
    // 10k: what keeping the state costs (a commit into the state area
    // whenever an interrupt moves a queue's signalled index), QD1, the same
    // device with and without a restart policy, alternating who goes first.
    let mut kept = blk_setup(RESTARTABLE, options.clone(), &image, 1)?;
    let mut plain = blk_setup(
        "outboard-virtio-blk (ioregionfd)",
        options.clone(),
        &image,
        1,
    )?;
    let loads = [(false, "randread"), (true, "randwrite")];
    let mut samples = vec![(Vec::new(), Vec::new()); loads.len()];
    for round in 0..4u64 {
        for (k, &(write, _)) in loads.iter().enumerate() {
            let seed = 0xc0de + round * 4 + k as u64;
            let ops = plan.blk_ops / 2;
            if round % 2 == 0 {
                samples[k].0.push(blk_iops(&mut kept, ops, 1, write, seed)?);
                samples[k]
                    .1
                    .push(blk_iops(&mut plain, ops, 1, write, seed)?);
            } else {
                samples[k]
                    .1
                    .push(blk_iops(&mut plain, ops, 1, write, seed)?);
                samples[k].0.push(blk_iops(&mut kept, ops, 1, write, seed)?);
            }
        }
    }
    kept.fe.shutdown();
    plain.fe.shutdown();
    for ((on, off), (_, name)) in samples.into_iter().zip(loads) {
        let (on, off) = (median(on), median(off));
        r.add(Figure {
            id: "10k",
            name: format!("virtio-blk 4K {name} QD1, state kept (restart on-failure)"),
            value: on,
            unit: "IOPS",
            p99: None,
            baseline: Some(("the same, restart never".into(), off)),
            ratio: Some(on / off),
            target: None,
        });
    }
    let mut s = blk_setup(RESTARTABLE, options, &image, 1)?;
    let dev = s.fe.device("blk")?;
    let link = Arc::clone(dev.remote().ok_or("not an Outboard device")?.link());
    let addr = dev.placed(0).ok_or("blk not placed")?.addr;
    let bus = Arc::clone(s.fe.mmio());
    let done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&done);
    let disrupter = std::thread::spawn(move || -> Result<(Vec<u64>, Vec<u64>), String> {
        let mut blackout = Vec::new();
        let mut restart = Vec::new();
        let mut run = || -> Result<(), AnyError> {
            for _ in 0..rounds {
                std::thread::sleep(Duration::from_millis(10));
                // Accesses are held from the pause until the new backend
                // has its sockets; the first one served after that costs
                // one round trip. (The old backend's exit, which upgrade()
                // waits for afterwards, holds nothing up.)
                let held = link.upgrade(None)?;
                let t = Instant::now();
                served(&bus, addr)?;
                blackout.push((held + t.elapsed()).as_nanos() as u64);
            }
            for _ in 0..rounds {
                std::thread::sleep(Duration::from_millis(10));
                let pid = link.conn().pid().ok_or("no backend pid")?;
                let pid = libc::pid_t::try_from(pid)?;
                let t = Instant::now();
                // SAFETY: a signal to the backend this bench spawned.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                served(&bus, addr)?;
                restart.push(t.elapsed().as_nanos() as u64);
            }
            Ok(())
        };
        let result = run();
        flag.store(true, Ordering::Release);
        result
            .map(|()| (blackout, restart))
            .map_err(|e| outboard_frontend::error_chain(&*e))
    });
    let mut ops = 0usize;
    let mut seed = 0x7e57;
    while !done.load(Ordering::Acquire) {
        blk_iops(&mut s, 256, 16, seed % 2 == 0, seed)?;
        ops += 256;
        seed += 1;
    }
    let (blackout, restart) = disrupter
        .join()
        .map_err(|_| "the disrupting thread panicked")??;
    s.fe.shutdown();
    let _ = std::fs::remove_file(&image);
    let (attach_med, _) = stats(attach_ns);
    let (b_med, b_p99) = stats(blackout);
    let (r_med, r_p99) = stats(restart);
    println!("       (10u/10r: {ops} requests at QD16 under replacement, none failed)");
    r.add(Figure {
        id: "10u",
        name: "live upgrade blackout under QD16 load: pause to first served access".into(),
        value: b_med,
        unit: "ns",
        p99: Some(b_p99),
        baseline: Some(("attach from nothing".into(), attach_med)),
        ratio: Some(b_med / attach_med),
        target: None,
    });
    r.add(Figure {
        id: "10r",
        name: "restart under QD16 load: SIGKILL to first served access".into(),
        value: r_med,
        unit: "ns",
        p99: Some(r_p99),
        baseline: Some(("attach from nothing".into(), attach_med)),
        ratio: Some(r_med / attach_med),
        target: None,
    });
    Ok(())
}
