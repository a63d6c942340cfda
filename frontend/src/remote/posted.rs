//! The posted writes of one region that no response has confirmed yet,
//! kept to be sent again to a restarted backend whose saved state lacks
//! them (docs/architecture.md, "Restart and live upgrade").

use std::collections::VecDeque;

use outboard_protocol::ioregionfd::CMD_SIZE;
use outboard_protocol::Cmd;

/// Posted writes at most kept for a replay; past that the oldest go (and a
/// restart that needed them says so).
pub(super) const POSTED_LOG: usize = 4096;

/// Commands sent on the current placement, and the posted writes among
/// them that no later response has confirmed (docs/architecture.md,
/// "Restart and live upgrade").
#[derive(Debug, Default)]
pub(crate) struct PostedLog {
    /// Commands sent and known to have arrived (numbered from 1).
    pub(super) sent: u64,
    /// (number, encoded command), oldest first.
    pub(super) unconfirmed: VecDeque<(u64, [u8; CMD_SIZE])>,
    /// Posted writes were dropped from the front of `unconfirmed`.
    overflowed: bool,
}

impl PostedLog {
    /// A command went out and, if it had a response, came back.
    pub(super) fn record(&mut self, cmd: &Cmd) {
        self.sent += 1;
        if cmd.resp {
            // The response follows every earlier command on the stream.
            self.unconfirmed.clear();
            self.overflowed = false;
        } else {
            if self.unconfirmed.len() == POSTED_LOG {
                self.unconfirmed.pop_front();
                self.overflowed = true;
            }
            self.unconfirmed.push_back((self.sent, cmd.encode()));
        }
    }

    /// A new backend took over the region. `served` is how many of this
    /// placement's commands its restored state holds (`None`: it keeps no
    /// state, and the log starts over). The posted writes numbered after
    /// that go to `send` again, in order, and stay logged, renumbered to
    /// follow `served`; once `send` fails (that backend is gone too) the
    /// rest are only logged, for its successor. Returns the numbers of
    /// posted writes that were needed but had been dropped from a full log.
    pub(super) fn resume(
        &mut self,
        served: Option<u64>,
        mut send: impl FnMut(&[u8; CMD_SIZE]) -> bool,
    ) -> Option<(u64, u64)> {
        let Some(served) = served else {
            *self = PostedLog::default();
            return None;
        };
        let first = self.unconfirmed.front().map(|(n, _)| *n);
        let lost = match first {
            Some(f) if self.overflowed && f > served + 1 => Some((served + 1, f - 1)),
            _ => None,
        };
        let again: Vec<_> = self
            .unconfirmed
            .drain(..)
            .filter(|(n, _)| *n > served)
            .map(|(_, c)| c)
            .collect();
        self.sent = served;
        let mut sending = true;
        for c in again {
            sending = sending && send(&c);
            self.sent += 1;
            self.unconfirmed.push_back((self.sent, c));
        }
        self.overflowed = false;
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outboard_protocol::AccessSize;

    #[test]
    fn posted_log_when_response_arrives_then_earlier_posted_writes_confirmed() {
        let mut log = PostedLog::default();
        let w = |v| Cmd::write(1, 0, AccessSize::B1, v, true);
        log.record(&w(1));
        log.record(&w(2));
        assert_eq!(log.sent, 2);
        assert_eq!(
            log.unconfirmed.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [1, 2]
        );
        log.record(&Cmd::read(1, 0, AccessSize::B1));
        assert!(log.unconfirmed.is_empty() && log.sent == 3);
        for v in 0..(POSTED_LOG as u64 + 2) {
            log.record(&w(v));
        }
        assert_eq!(log.unconfirmed.len(), POSTED_LOG);
        assert!(log.overflowed);
        assert_eq!(log.unconfirmed.front().map(|(n, _)| *n), Some(6));
    }

    #[test]
    fn resume_when_state_holds_part_then_rest_sent_renumbered_and_a_failed_send_keeps_them() {
        let mut log = PostedLog::default();
        for v in 1..=4 {
            log.record(&Cmd::write(1, v, AccessSize::B1, v, true));
        }
        let mut sent = Vec::new();
        let mut ok = 1;
        let lost = log.resume(Some(2), |c| {
            sent.push(Cmd::decode(c).map(|c| c.offset).unwrap());
            ok -= 1;
            ok >= 0
        });
        assert_eq!(lost, None);
        // The second send failed: nothing is sent after it, both stay logged.
        assert_eq!(sent, [3, 4]);
        assert_eq!(log.sent, 4);
        assert_eq!(
            log.unconfirmed.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(log.resume(None, |_| true), None);
        assert!(log.unconfirmed.is_empty() && log.sent == 0);
    }
}
