//! What [`super::VirtioMmio`] saves for a restart or live upgrade
//! ([`Saved`]), and the one decision a restored device makes from guest
//! memory: whether its predecessor still owed the driver a used-buffer
//! interrupt ([`interrupt_owed`]).

use outboard_virtio_mmio::{QueueConfig, Registers};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::state::{read_blob, DeviceState, Error as StateError, Writer};

/// Format version of the saved state.
pub const STATE_VERSION: u32 = 1;

/// The transport's registers, the device's own state and, per queue, the
/// used index up to which the driver was sent an interrupt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Saved {
    pub registers: Registers,
    pub device: Vec<u8>,
    pub signalled: Vec<Option<u16>>,
}

impl Saved {
    /// Encodes the state (host byte order; format [`STATE_VERSION`]).
    pub fn encode(&self) -> DeviceState {
        let r = &self.registers;
        let mut w = Writer::default();
        w.u32(r.status)
            .u32(r.device_features_sel)
            .u32(r.driver_features_sel)
            .u64(r.driver_features)
            .u32(r.queue_sel)
            .u32(r.config_generation)
            .u16(r.queues.len() as u16);
        for q in &r.queues {
            w.u16(q.max_size)
                .u16(q.size)
                .u8(u8::from(q.ready))
                .u64(q.desc)
                .u64(q.avail)
                .u64(q.used);
        }
        w.blob(&self.device);
        for i in 0..r.queues.len() {
            let s = self.signalled.get(i).copied().flatten();
            w.u8(u8::from(s.is_some())).u16(s.unwrap_or(0));
        }
        DeviceState::new(STATE_VERSION, w.bytes)
    }

    /// Decodes what [`Saved::encode`] wrote, every field checked.
    pub fn decode(state: &DeviceState) -> Result<Self, StateError> {
        let mut r = state.reader(STATE_VERSION)?;
        let area = StateError::Area;
        let status = r.u32().map_err(area)?;
        let device_features_sel = r.u32().map_err(area)?;
        let driver_features_sel = r.u32().map_err(area)?;
        let driver_features = r.u64().map_err(area)?;
        let queue_sel = r.u32().map_err(area)?;
        let config_generation = r.u32().map_err(area)?;
        let n = r.u16().map_err(area)?;
        let mut queues = Vec::with_capacity(usize::from(n).min(1024));
        for _ in 0..n {
            queues.push(QueueConfig {
                max_size: r.u16().map_err(area)?,
                size: r.u16().map_err(area)?,
                ready: r.u8().map_err(area)? != 0,
                desc: r.u64().map_err(area)?,
                avail: r.u64().map_err(area)?,
                used: r.u64().map_err(area)?,
            });
        }
        let device = read_blob(&mut r)?.to_vec();
        let mut signalled = Vec::with_capacity(queues.len());
        for _ in 0..queues.len() {
            let known = r.u8().map_err(area)? != 0;
            let at = r.u16().map_err(area)?;
            signalled.push(known.then_some(at));
        }
        r.end().map_err(area)?;
        Ok(Saved {
            registers: Registers {
                queues,
                device_features_sel,
                driver_features_sel,
                driver_features,
                queue_sel,
                status,
                config_generation,
            },
            device,
            signalled,
        })
    }
}

/// After a restore: whether the driver may be owed a used-buffer interrupt
/// the previous instance did not raise. With EVENT_IDX, when some ready
/// queue's used index has gone past the driver's `used_event` since the
/// predecessor last interrupted (`signalled`; not known: by less than the
/// queue size, since a used index cannot lead what the driver last saw by
/// more, so anything further is a `used_event` set far ahead); without,
/// unless every ready queue's driver set VRING_AVAIL_F_NO_INTERRUPT.
/// Unreadable rings count as owed.
pub(super) fn interrupt_owed<M: GuestMemory>(
    mem: &M,
    queues: &[QueueConfig],
    signalled: &[Option<u16>],
    event_idx: bool,
) -> bool {
    let read = |addr: u64| mem.read_obj::<u16>(GuestAddress(addr)).ok();
    queues
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ready)
        .any(|(i, c)| {
            if !event_idx {
                return read(c.avail).is_none_or(|flags| flags & 1 == 0);
            }
            let used_event = c
                .avail
                .checked_add(4 + 2 * u64::from(c.size))
                .and_then(read);
            let used = c.used.checked_add(2).and_then(read);
            match (used_event, used) {
                (Some(e), Some(u)) => {
                    let old = signalled.get(i).copied().flatten();
                    let since = old.map_or(c.size, |old| u.wrapping_sub(old));
                    u.wrapping_sub(e).wrapping_sub(1) < since
                }
                _ => true,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::tests::memory;

    fn queue() -> QueueConfig {
        QueueConfig {
            max_size: 16,
            size: 16,
            ready: true,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
        }
    }

    #[test]
    fn saved_when_round_tripped_then_equal_and_cut_short_refused() {
        let s = Saved {
            registers: Registers {
                queues: vec![queue()],
                device_features_sel: 1,
                driver_features_sel: 0,
                driver_features: 0x1_0000_0000,
                queue_sel: 0,
                status: 0xf,
                config_generation: 3,
            },
            device: vec![9, 9],
            signalled: vec![Some(7)],
        };
        let state = s.encode();
        assert_eq!(Saved::decode(&state).unwrap(), s);
        let mut short = state.clone();
        short.bytes.pop();
        assert!(Saved::decode(&short).is_err());
        let other = DeviceState::new(2, state.bytes);
        assert!(matches!(
            Saved::decode(&other),
            Err(StateError::Version { found: 2, .. })
        ));
    }

    #[test]
    fn interrupt_owed_when_used_passed_used_event_since_last_signal_then_true() {
        let mem = memory();
        let q = [queue()];
        let set = |used: u16, used_event: u16| {
            mem.write_obj(used, GuestAddress(0x3002)).unwrap();
            mem.write_obj(used_event, GuestAddress(0x2000 + 4 + 2 * 16))
                .unwrap();
        };
        // The driver asked for an interrupt at entry 5; 6 are used.
        set(6, 5);
        assert!(interrupt_owed(&mem, &q, &[None], true));
        assert!(interrupt_owed(&mem, &q, &[Some(4)], true));
        // The predecessor already interrupted at 6.
        assert!(!interrupt_owed(&mem, &q, &[Some(6)], true));
        // used_event far ahead: never owed.
        set(6, 6 + 0x8000);
        assert!(!interrupt_owed(&mem, &q, &[None], true));
        // Without EVENT_IDX: owed unless NO_INTERRUPT.
        mem.write_obj(1u16, GuestAddress(0x2000)).unwrap();
        assert!(!interrupt_owed(&mem, &q, &[None], false));
        mem.write_obj(0u16, GuestAddress(0x2000)).unwrap();
        assert!(interrupt_owed(&mem, &q, &[None], false));
    }
}
