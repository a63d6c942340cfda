//! Figure 7: virtio-blk 4 KiB random I/O, Outboard vs qemu-storage-daemon;
//! 7m: the same load spread over two queues, against one queue.

use crate::AnyError;
use outboard_frontend::launch::Source;
use outboard_frontend::memory::GuestRam;
use outboard_frontend::{DeviceSpec, Frontend, Options};
use outboard_testkit::guest::{blk, Buffer, DriverOptions, GuestAllocator, VirtioMmioDriver};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

use super::*;

/// One block-device setup under test.
pub(super) struct BlkSetup {
    label: &'static str,
    pub(super) fe: Frontend,
    alloc: GuestAllocator,
    driver: VirtioMmioDriver,
    /// Queues the driver uses.
    queues: usize,
    _proc: Option<Reaped>,
}

pub(super) const IMAGE_SECTORS: u64 = 128 << 11; // 128 MiB

/// The ioregionfd setup under `restart = "on-failure"` (no backoff).
pub(super) const RESTARTABLE: &str = "outboard-virtio-blk (ioregionfd, restart on-failure)";

/// The ioregionfd setup with the backend unconfined (`--no-sandbox`).
const UNCONFINED: &str = "outboard-virtio-blk (ioregionfd, --no-sandbox)";

/// `label`'s device on `image`, driven through `queues` queues.
pub(super) fn blk_setup(
    label: &'static str,
    options: Options,
    image: &Path,
    queues: usize,
) -> Result<BlkSetup, AnyError> {
    // A vhost-user backend is started by hand, found as the frontend finds backends.
    let launcher = options.launcher.clone();
    let mut fe = Frontend::new(options);
    fe.set_memory(GuestRam::new(&[(0, 64 << 20)])?)?;
    let path = image.to_str().ok_or("image path is not UTF-8")?.to_owned();
    let mut proc = None;
    match label {
        "outboard-virtio-blk (ioregionfd)" => {
            fe.attach(&DeviceSpec::spawn(
                "blk",
                "outboard-virtio-blk",
                &["--path", &path],
            ))?;
        }
        RESTARTABLE => {
            fe.attach(
                &DeviceSpec::spawn("blk", "outboard-virtio-blk", &["--path", &path]).restart(
                    outboard_frontend::RestartPolicy {
                        backoff: std::time::Duration::ZERO,
                        ..outboard_frontend::RestartPolicy::on_failure()
                    },
                ),
            )?;
        }
        UNCONFINED => {
            fe.attach(
                &DeviceSpec::spawn("blk", "outboard-virtio-blk", &["--path", &path])
                    .without_sandbox(),
            )?;
        }
        "outboard-virtio-blk --vhost-user" | "qemu-storage-daemon" => {
            let sock = temp_path(if label.starts_with("qemu") {
                "qsd.sock"
            } else {
                "ob.sock"
            });
            let child = if label.starts_with("qemu") {
                Command::new("qemu-storage-daemon")
                    .arg("--blockdev")
                    .arg(format!("driver=file,node-name=d0,filename={path},cache.direct=off,aio=threads"))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
                        sock.display()
                    ))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()?
            } else {
                let args = [
                    "--path".to_owned(),
                    path.clone(),
                    "--vhost-user".to_owned(),
                    sock.display().to_string(),
                ];
                launcher
                    .command("outboard-virtio-blk", &args)?
                    .stdin(Stdio::null())
                    .spawn()?
            };
            proc = Some(Reaped(child));
            fe.attach(&DeviceSpec {
                source: Source::VhostUser {
                    socket: sock.clone(),
                    device: "blk".into(),
                },
                ..DeviceSpec::connect("blk", &sock)
            })?;
        }
        other => return Err(format!("unknown setup {other}").into()),
    }
    pin_backends(&fe);
    if let Some(p) = &proc {
        pin_process(p.0.id(), cpus().1);
    }
    let mut alloc = GuestAllocator::new(0x1000, (64 << 20) - 0x1000);
    let d = fe.device("blk")?;
    let driver = VirtioMmioDriver::init(
        fe.mmio().clone(),
        d.placed(0).ok_or("blk not placed")?.addr,
        fe.memory().ok_or("no RAM")?.clone(),
        d.irq(0).ok_or("no irq")?.clone(),
        &mut alloc,
        DriverOptions::new(0, 256).queues(queues),
    )?;
    if driver.num_queues() != queues {
        return Err(format!("{label}: {} queues, not {queues}", driver.num_queues()).into());
    }
    Ok(BlkSetup {
        label,
        fe,
        alloc,
        driver,
        queues,
        _proc: proc,
    })
}

/// Random 4 KiB I/O at queue depth `qd` in all, spread over the setup's
/// queues; returns IOPS.
pub(super) fn blk_iops(
    s: &mut BlkSetup,
    ops: usize,
    qd: usize,
    write: bool,
    seed: u64,
) -> Result<f64, AnyError> {
    struct Slot {
        header: u64,
        data: u64,
        status: u64,
    }
    let slots: Vec<Slot> = (0..qd)
        .map(|_| {
            Ok(Slot {
                header: s.alloc.alloc(16, 16)?,
                data: s.alloc.alloc(4096, 4096)?,
                status: s.alloc.alloc(1, 1)?,
            })
        })
        .collect::<Result<_, AnyError>>()?;
    let mem = s.fe.memory().ok_or("no RAM")?.clone();
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % (IMAGE_SECTORS / 8)) * 8
    };
    let kind = if write { blk::T_OUT } else { blk::T_IN };
    let queues = s.queues.max(1);
    let issue = |driver: &mut VirtioMmioDriver,
                 q: usize,
                 slot: &Slot,
                 sector: u64|
     -> Result<u16, AnyError> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.memory().write_slice(&h, GuestAddress(slot.header))?;
        Ok(driver.submit(
            q,
            &[
                Buffer::readable(slot.header, 16),
                Buffer {
                    addr: slot.data,
                    len: 4096,
                    device_writes: !write,
                },
                Buffer::writable(slot.status, 1),
            ],
        )?)
    };
    let mut inflight = std::collections::VecDeque::new();
    let t = Instant::now();
    let mut issued = 0;
    for (i, slot) in slots.iter().enumerate().take(qd.min(ops)) {
        let sector = next();
        inflight.push_back((issue(&mut s.driver, i % queues, slot, sector)?, i));
        issued += 1;
    }
    for q in 0..queues {
        s.driver.notify(q)?;
    }
    let mut done = 0;
    while done < ops {
        let (head, i) = inflight.pop_front().ok_or("queue drained early")?;
        let q = i % queues;
        s.driver.wait(q, head)?;
        let status: u8 = mem.memory().read_obj(GuestAddress(slots[i].status))?;
        if status != blk::S_OK {
            return Err(format!("{}: request failed with status {status}", s.label).into());
        }
        done += 1;
        if issued < ops {
            let sector = next();
            inflight.push_back((issue(&mut s.driver, q, &slots[i], sector)?, i));
            issued += 1;
            s.driver.notify(q)?;
        }
    }
    Ok(ops as f64 / t.elapsed().as_secs_f64())
}

/// Figure 7s: the four loads of figure 7 on a confined and an unconfined
/// ioregionfd backend, alternating rounds; medians of each (confined,
/// unconfined).
fn confinement_cost(
    plan: &Plan,
    options: &Options,
    image: &Path,
) -> Result<Vec<(f64, f64)>, AnyError> {
    // Every block written first: a write to a hole allocates, a rewrite does
    // not, and whichever backend ran first would pay for the other.
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = std::fs::OpenOptions::new().write(true).open(image)?;
    for _ in 0..(IMAGE_SECTORS * 512) >> 20 {
        std::io::Write::write_all(&mut f, &chunk)?;
    }
    f.sync_all()?;
    drop(f);
    let mut on = blk_setup(
        "outboard-virtio-blk (ioregionfd)",
        options.clone(),
        image,
        1,
    )?;
    let mut off = blk_setup(UNCONFINED, options.clone(), image, 1)?;
    let loads = [(1, false), (1, true), (16, false), (16, true)];
    let mut samples = vec![(Vec::new(), Vec::new()); loads.len()];
    for round in 0..4u64 {
        for (k, &(qd, write)) in loads.iter().enumerate() {
            let seed = 0x5eed + round * 8 + k as u64;
            let ops = plan.blk_ops / 2;
            // Which one goes first alternates from round to round.
            if round % 2 == 0 {
                samples[k].0.push(blk_iops(&mut on, ops, qd, write, seed)?);
                samples[k].1.push(blk_iops(&mut off, ops, qd, write, seed)?);
            } else {
                samples[k].1.push(blk_iops(&mut off, ops, qd, write, seed)?);
                samples[k].0.push(blk_iops(&mut on, ops, qd, write, seed)?);
            }
        }
    }
    on.fe.shutdown();
    off.fe.shutdown();
    Ok(samples
        .into_iter()
        .map(|(a, b)| (median(a), median(b)))
        .collect())
}

pub(super) fn blk_figures(r: &mut Report, plan: &Plan, options: Options) -> Result<(), AnyError> {
    let image = temp_path("blk.img");
    std::fs::File::create(&image)?.set_len(IMAGE_SECTORS * 512)?;
    let labels = [
        "qemu-storage-daemon",
        "outboard-virtio-blk (ioregionfd)",
        "outboard-virtio-blk --vhost-user",
    ];
    let mut results: Vec<(&str, [f64; 4])> = Vec::new();
    for label in labels {
        let mut s = match blk_setup(label, options.clone(), &image, 1) {
            Ok(s) => s,
            Err(e) => {
                println!("  (7)  {label}: skipped: {e}");
                continue;
            }
        };
        let mut v = [0f64; 4];
        for (k, (qd, write)) in [(1, false), (1, true), (16, false), (16, true)]
            .into_iter()
            .enumerate()
        {
            v[k] = blk_iops(&mut s, plan.blk_ops, qd, write, 0x9e37_79b9 + k as u64)?;
        }
        s.fe.shutdown();
        results.push((label, v));
    }
    // 7m: QD16 over two queues (8 each), served by a thread per queue.
    let mut mq: Vec<(&str, f64)> = Vec::new();
    for label in labels {
        match blk_setup(label, options.clone(), &image, 2) {
            Ok(mut s) => {
                mq.push((label, blk_iops(&mut s, plan.blk_ops, 16, false, 0x51)?));
                s.fe.shutdown();
            }
            Err(e) => println!("  (7m) {label}: skipped: {e}"),
        }
    }
    let confinement = confinement_cost(plan, &options, &image);
    let _ = std::fs::remove_file(&image);
    let qsd = results
        .iter()
        .find(|(l, _)| l.starts_with("qemu"))
        .map(|(_, v)| *v);
    let names = [
        "randread QD1",
        "randwrite QD1",
        "randread QD16",
        "randwrite QD16",
    ];
    for (label, v) in &results {
        for k in 0..4 {
            let ratio = qsd.map(|q| v[k] / q[k]);
            let is_target = label.contains("ioregionfd");
            r.add(Figure {
                id: "7",
                name: format!("virtio-blk 4K {} {}", names[k], label),
                value: v[k],
                unit: "IOPS",
                p99: None,
                baseline: qsd.map(|q| ("qemu-storage-daemon".to_owned(), q[k])),
                ratio,
                target: if is_target {
                    ratio.map(|x| (">= 1.0x qsd".to_owned(), x >= 1.0))
                } else {
                    None
                },
            });
        }
    }
    match confinement {
        Ok(pairs) => {
            for (k, (on, off)) in pairs.into_iter().enumerate() {
                r.add(Figure {
                    id: "7s",
                    name: format!("virtio-blk 4K {} ioregionfd, confined", names[k]),
                    value: on,
                    unit: "IOPS",
                    p99: None,
                    baseline: Some(("the same, --no-sandbox".into(), off)),
                    ratio: Some(on / off),
                    target: Some(("within 5%".into(), on / off >= 0.95)),
                });
            }
        }
        Err(e) => println!("  (7s) skipped: {e}"),
    }
    for (label, v) in mq {
        let one = results.iter().find(|(l, _)| *l == label).map(|(_, q)| q[2]);
        r.add(Figure {
            id: "7m",
            name: format!("virtio-blk 4K randread QD16 on 2 queues {label}"),
            value: v,
            unit: "IOPS",
            p99: None,
            baseline: one.map(|o| (format!("{label}, 1 queue QD16"), o)),
            ratio: one.map(|o| v / o),
            target: None,
        });
    }
    Ok(())
}
