//! Valid encodings to start each target's corpus from.

use outboard_protocol::control::{
    DeviceInfo, DeviceKind, DoorbellInfo, Header, Hello, IrqInfo, MemRegion, MemTable, Payload,
    RegionIndex, RegionInfo, Request, SetCmdRing, SetIrq, SetRegion, Status, StatusReply,
    DOORBELL_DATAMATCH, FEATURES_SUPPORTED, IRQ_LEVEL, IRQ_RESAMPLE, REGION_PIO,
    REGION_POSTED_WRITES, REGION_READ, REGION_WRITE, SET_REGION_POSTED,
};
use outboard_protocol::{AccessSize, Cmd, Resp};

/// A few valid encodings for the fuzz target `target` (empty for an unknown name).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "ioregionfd_cmd" => vec![
            Cmd::read(1, 0x10, AccessSize::B4).encode().to_vec(),
            Cmd::write(2, 0, AccessSize::B1, 0x41, false)
                .encode()
                .to_vec(),
            Cmd::write(3, 0x18, AccessSize::B8, u64::MAX, true)
                .encode()
                .to_vec(),
        ],
        "ioregionfd_resp" => vec![
            Resp { data: 0 }.encode().to_vec(),
            Resp { data: 0xdead_beef }.encode().to_vec(),
        ],
        "control_header" => vec![
            Header::request(Request::Hello, Hello::SIZE, true)
                .encode()
                .to_vec(),
            Header::request(Request::SetMemTable, 32, false)
                .encode()
                .to_vec(),
            Header::reply(Request::GetRegionInfo as u32, 8, true)
                .encode()
                .to_vec(),
        ],
        "hello" => vec![
            Hello::ours(FEATURES_SUPPORTED).encode(),
            Hello {
                min_version: 2,
                max_version: 1,
                features: 0,
            }
            .encode(),
        ],
        "device_info" => vec![DeviceInfo {
            kind: DeviceKind::UART,
            num_regions: 1,
            num_doorbells: 0,
            num_irqs: 1,
            name: "uart".into(),
        }
        .encode()],
        "region_index" => vec![
            RegionIndex { index: 0 }.encode(),
            RegionIndex { index: 7 }.encode(),
        ],
        "region_info" => vec![
            RegionInfo {
                index: 0,
                flags: REGION_READ | REGION_WRITE | REGION_POSTED_WRITES,
                size: 0x1000,
                preferred_addr: 0,
                access_sizes: 0x0f,
                name: "regs".into(),
            }
            .encode(),
            RegionInfo {
                index: 1,
                flags: REGION_PIO | REGION_READ,
                size: 8,
                preferred_addr: 0,
                access_sizes: 1,
                name: String::new(),
            }
            .encode(),
        ],
        "set_region" => vec![
            SetRegion {
                index: 0,
                flags: 0,
                guest_addr: 0xd000_0000,
                user_data: 1,
            }
            .encode(),
            SetRegion {
                index: 1,
                flags: SET_REGION_POSTED | 4 << 16,
                guest_addr: 0x3f8,
                user_data: 9,
            }
            .encode(),
        ],
        "status_reply" => vec![
            StatusReply { status: Status::Ok }.encode(),
            StatusReply {
                status: Status::BadFd,
            }
            .encode(),
        ],
        "doorbell_info" => vec![
            DoorbellInfo {
                index: 0,
                region: 0,
                offset: 0x50,
                size: 4,
                flags: DOORBELL_DATAMATCH,
                datamatch: 2,
            }
            .encode(),
            DoorbellInfo {
                index: 1,
                region: 0,
                offset: 0x60,
                size: 0,
                flags: 0,
                datamatch: 0,
            }
            .encode(),
        ],
        "irq_info" => vec![
            IrqInfo { index: 0, flags: 0 }.encode(),
            IrqInfo {
                index: 1,
                flags: IRQ_LEVEL,
            }
            .encode(),
        ],
        "set_cmd_ring" => vec![
            SetCmdRing {
                index: 0,
                entries: 256,
            }
            .encode(),
            SetCmdRing {
                index: 3,
                entries: 8,
            }
            .encode(),
        ],
        "cmd_ring" => vec![
            // A 256-entry ring: publish, consume, answer, read the answer.
            vec![
                5, 2, 1, 0, 0, 0, 1, 0, 0, 0, 0, 5, 9, 0, 0, 0, 3, 0, 0, 0, 0, 4, 0, 0, 0, 0,
            ],
            // An 8-entry ring whose peer rewrites tail and head.
            vec![
                0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0,
            ],
        ],
        "set_irq" => vec![
            SetIrq { index: 0, flags: 0 }.encode(),
            SetIrq {
                index: 1,
                flags: IRQ_RESAMPLE,
            }
            .encode(),
        ],
        "mem_table" => vec![
            MemTable {
                regions: vec![MemRegion {
                    guest_addr: 0,
                    size: 0x1000,
                    fd_offset: 0,
                }],
            }
            .encode(),
            MemTable {
                regions: vec![
                    MemRegion {
                        guest_addr: 0,
                        size: 0xa_0000,
                        fd_offset: 0,
                    },
                    MemRegion {
                        guest_addr: 0x10_0000,
                        size: 0x10_0000,
                        fd_offset: 0x1000,
                    },
                    MemRegion {
                        guest_addr: u64::MAX - 0xfff,
                        size: 0x1000,
                        fd_offset: 0,
                    },
                ],
            }
            .encode(),
        ],
        "state_area" => {
            // An area with one committed record, cut after it (the target
            // pads to 4 KiB with zeros), and a bare header.
            let mut area = vec![0u8; outboard_protocol::state::MIN_AREA];
            let _ = outboard_protocol::state::open(&mut area);
            let bare = area[..64].to_vec();
            let record = outboard_protocol::state::Snapshot {
                kind: 0x102,
                name: "virtio-blk".into(),
                version: 1,
                served: vec![],
                state: vec![0x0f, 0, 0, 0, 1],
            }
            .encode();
            let _ = outboard_protocol::state::commit(&mut area, &record);
            let end = 64 + 16 + record.len();
            vec![area[..end].to_vec(), bare]
        }
        "host_stream" => {
            use outboard_protocol::host_stream::Message;
            let mut out = Vec::new();
            [
                Message::Out {
                    seq: 3,
                    offset: 0,
                    last: true,
                    fresh: true,
                    data: b"hello\n",
                },
                Message::Ack { delivered: 4096 },
                Message::In {
                    offset: 7,
                    data: b"ls\n",
                },
            ]
            .iter()
            .map(|m| {
                m.encode(&mut out);
                out.clone()
            })
            .collect()
        }
        _ => Vec::new(),
    }
}
