//! What a frontend message may look like before the relay passes it on.
//!
//! vhost-user-backend (over the vhost crate) receives at most 32 fds per
//! message, and a message with more loses its header while the crate
//! retries, so its payload is then read as a request of its own. The relay
//! (see `super::relay`) therefore receives every message itself and checks
//! it here first: the request must be one this backend serves, its payload
//! within that request's size, its fds within that request's count. The
//! maxima follow the vhost-user specification, strictly: a memory table has
//! at most 8 regions (VHOST_MEMORY_BASELINE_NREGIONS, without
//! CONFIGURE_MEM_SLOTS), a vring fd message and SET_BACKEND_REQ_FD carry at
//! most one fd, a config access at most 256 bytes of config space
//! (QEMU's VHOST_USER_MAX_CONFIG_SIZE). GET_INFLIGHT_FD and
//! SET_INFLIGHT_FD carry exactly the 24-byte inflight description, and
//! SET_INFLIGHT_FD exactly one fd (the relay answers both itself, see
//! `super::inflight`). Requests behind protocol features the adapter never
//! offers (LOG_SHMFD, CONFIGURE_MEM_SLOTS, STATUS, DEVICE_STATE, ...) are
//! refused as unknown.

use thiserror::Error;

/// Size of a vhost-user message header: request, flags, size (`u32` each).
pub(super) const HEADER_SIZE: usize = 12;

/// The largest payload any allowed request carries (a config access).
pub(super) const MAX_PAYLOAD: usize = CONFIG_HEADER + MAX_CONFIG;

/// The most fds any allowed request carries (a memory table).
pub(super) const MAX_FDS: usize = MAX_REGIONS;

const MAX_REGIONS: usize = 8;
const REGION_SIZE: u32 = 32;
const CONFIG_HEADER: usize = 12;
const MAX_CONFIG: usize = 256;
/// Header flags: version 1 in bits 0..1; REPLY (bit 2) never comes from a
/// frontend; NEED_REPLY (bit 3) is the only other bit defined.
const VERSION_MASK: u32 = 0x3;
const VERSION: u32 = 0x1;
const NEED_REPLY: u32 = 0x8;

/// SET_PROTOCOL_FEATURES: the relay notes whether INFLIGHT_SHMFD was taken.
pub(super) const SET_PROTOCOL_FEATURES: u32 = 16;
/// The inflight requests, which the relay answers itself.
pub(super) const GET_INFLIGHT_FD: u32 = 31;
/// See [`GET_INFLIGHT_FD`].
pub(super) const SET_INFLIGHT_FD: u32 = 32;

/// Requests whose fd is a kick, call or error eventfd.
pub(super) const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;

/// Why the relay refused a frontend message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refusal {
    /// unknown or unsupported request
    #[error("unknown or unsupported vhost-user request {0}")]
    Unknown(u32),
    /// invalid header flags
    #[error("{request} with header flags {flags:#x} (only version 1 and NEED_REPLY allowed)")]
    Flags {
        /// The request's name.
        request: &'static str,
        /// The flags received.
        flags: u32,
    },
    /// payload size out of range
    #[error("{request} with a {size}-byte payload ({min} to {max} allowed)")]
    Payload {
        /// The request's name.
        request: &'static str,
        /// The size in the header.
        size: u32,
        /// The least allowed.
        min: u32,
        /// The most allowed.
        max: u32,
    },
    /// too few fds for the request
    #[error("{request} with {got} fds ({min} needed)")]
    MissingFds {
        /// The request's name.
        request: &'static str,
        /// The fds received with the message.
        got: usize,
        /// The least needed.
        min: usize,
    },
    /// too many fds for the request
    #[error("{request} with {got} fds (at most {max} allowed)")]
    Fds {
        /// The request's name (or its number when unknown).
        request: String,
        /// The fds received with the message.
        got: usize,
        /// The most allowed.
        max: usize,
    },
    /// an inflight request without INFLIGHT_SHMFD negotiated
    #[error("{0} without the INFLIGHT_SHMFD protocol feature negotiated")]
    NotNegotiated(&'static str),
    /// ancillary data truncated
    #[error("a message with more fds than one recvmsg can hold (ancillary data truncated)")]
    Truncated,
    /// ancillary data other than fds
    #[error("a message with ancillary data other than SCM_RIGHTS")]
    Ancillary,
}

/// What one request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rule {
    /// The request's name in the specification.
    pub name: &'static str,
    min: u32,
    max: u32,
    fds: usize,
    min_fds: usize,
    /// Whether vhost-user-backend answers it (the relay keeps replies in order).
    pub replies: bool,
    /// Whether its fd is an eventfd the vring workers read or write.
    pub eventfd: bool,
}

const fn rule(name: &'static str, min: u32, max: u32, fds: usize) -> Rule {
    Rule {
        name,
        min,
        max,
        fds,
        min_fds: 0,
        replies: false,
        eventfd: false,
    }
}

/// A request vhost-user-backend answers (without REPLY_ACK, which the
/// adapter never offers, only these get a reply).
const fn get(name: &'static str, min: u32, max: u32) -> Rule {
    Rule {
        replies: true,
        ..rule(name, min, max, 0)
    }
}

/// A request carrying exactly `fds` fds.
const fn with_fds(name: &'static str, min: u32, max: u32, fds: usize) -> Rule {
    Rule {
        name,
        min,
        max,
        fds,
        min_fds: fds,
        replies: false,
        eventfd: false,
    }
}

const fn vring_fd(name: &'static str) -> Rule {
    Rule {
        name,
        min: 8,
        max: 8,
        fds: 1,
        min_fds: 0,
        replies: false,
        eventfd: true,
    }
}

/// The rule for `request`, if the adapter serves it.
pub(super) fn rule_for(request: u32) -> Option<Rule> {
    const MEM_MIN: u32 = 8 + REGION_SIZE;
    const MEM_MAX: u32 = 8 + REGION_SIZE * MAX_REGIONS as u32;
    const CONFIG_MIN: u32 = CONFIG_HEADER as u32;
    const CONFIG_MAX: u32 = MAX_PAYLOAD as u32;
    const INFLIGHT: u32 = super::inflight::DESCRIPTION_SIZE as u32;
    Some(match request {
        1 => get("GET_FEATURES", 0, 0),
        2 => rule("SET_FEATURES", 8, 8, 0),
        3 => rule("SET_OWNER", 0, 0, 0),
        4 => rule("RESET_OWNER", 0, 0, 0),
        5 => rule("SET_MEM_TABLE", MEM_MIN, MEM_MAX, MAX_REGIONS),
        8 => rule("SET_VRING_NUM", 8, 8, 0),
        9 => rule("SET_VRING_ADDR", 40, 40, 0),
        10 => rule("SET_VRING_BASE", 8, 8, 0),
        11 => get("GET_VRING_BASE", 8, 8),
        SET_VRING_KICK => vring_fd("SET_VRING_KICK"),
        SET_VRING_CALL => vring_fd("SET_VRING_CALL"),
        SET_VRING_ERR => vring_fd("SET_VRING_ERR"),
        15 => get("GET_PROTOCOL_FEATURES", 0, 0),
        SET_PROTOCOL_FEATURES => rule("SET_PROTOCOL_FEATURES", 8, 8, 0),
        17 => get("GET_QUEUE_NUM", 0, 0),
        18 => rule("SET_VRING_ENABLE", 8, 8, 0),
        // The crate refuses it unless BACKEND_REQ was negotiated; its fd is
        // the backend's channel to the frontend, handed on as it is.
        21 => rule("SET_BACKEND_REQ_FD", 0, 8, 1),
        24 => get("GET_CONFIG", CONFIG_MIN, CONFIG_MAX),
        25 => rule("SET_CONFIG", CONFIG_MIN, CONFIG_MAX, 0),
        GET_INFLIGHT_FD => rule("GET_INFLIGHT_FD", INFLIGHT, INFLIGHT, 0),
        SET_INFLIGHT_FD => with_fds("SET_INFLIGHT_FD", INFLIGHT, INFLIGHT, 1),
        34 => rule("RESET_DEVICE", 0, 0, 0),
        _ => return None,
    })
}

/// A message header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// The request code.
    pub request: u32,
    /// The header flags.
    pub flags: u32,
    /// The payload size.
    pub size: u32,
}

impl Header {
    /// Decodes the little-endian header.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }
}

/// Checks a header and the number of fds that came with it; returns the
/// request's rule.
pub(super) fn check(h: &Header, fds: usize) -> Result<Rule, Refusal> {
    let Some(r) = rule_for(h.request) else {
        return Err(if fds > 0 {
            Refusal::Fds {
                request: format!("request {}", h.request),
                got: fds,
                max: 0,
            }
        } else {
            Refusal::Unknown(h.request)
        });
    };
    check_fds(&r, fds)?;
    if h.flags & VERSION_MASK != VERSION || h.flags & !(VERSION_MASK | NEED_REPLY) != 0 {
        return Err(Refusal::Flags {
            request: r.name,
            flags: h.flags,
        });
    }
    if h.size < r.min || h.size > r.max {
        return Err(Refusal::Payload {
            request: r.name,
            size: h.size,
            min: r.min,
            max: r.max,
        });
    }
    Ok(r)
}

/// Checks the fds a whole message carried against the least its rule needs.
pub(super) fn check_min_fds(r: &Rule, fds: usize) -> Result<(), Refusal> {
    if fds < r.min_fds {
        return Err(Refusal::MissingFds {
            request: r.name,
            got: fds,
            min: r.min_fds,
        });
    }
    Ok(())
}

/// Checks the fds a message carries against its rule (again after the
/// payload, which may bring more).
pub(super) fn check_fds(r: &Rule, fds: usize) -> Result<(), Refusal> {
    if fds > r.fds {
        return Err(Refusal::Fds {
            request: r.name.to_owned(),
            got: fds,
            max: r.fds,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(request: u32, flags: u32, size: u32) -> Header {
        Header {
            request,
            flags,
            size,
        }
    }

    #[test]
    fn decode_when_le_words_then_fields() {
        let b = [5, 0, 0, 0, 1, 0, 0, 0, 40, 0, 0, 0];
        assert_eq!(Header::decode(&b), h(5, 1, 40));
    }

    #[test]
    fn check_when_fds_beyond_the_request_then_refused() {
        assert_eq!(check(&h(5, 1, 40), 8).map(|r| r.name), Ok("SET_MEM_TABLE"));
        assert!(matches!(
            check(&h(5, 1, 40), 9),
            Err(Refusal::Fds { got: 9, max: 8, .. })
        ));
        assert!(matches!(
            check(&h(12, 1, 8), 2),
            Err(Refusal::Fds { got: 2, max: 1, .. })
        ));
        assert!(matches!(
            check(&h(1, 1, 0), 33),
            Err(Refusal::Fds {
                got: 33,
                max: 0,
                ..
            })
        ));
        assert!(matches!(
            check(&h(99, 1, 0), 1),
            Err(Refusal::Fds { got: 1, max: 0, .. })
        ));
    }

    #[test]
    fn check_when_unknown_or_unoffered_then_refused() {
        for code in [0, 6, 7, 19, 22, 33, 36, 37, 39, 42, 99, u32::MAX] {
            assert_eq!(
                check(&h(code, 1, 0), 0),
                Err(Refusal::Unknown(code)),
                "{code}"
            );
        }
    }

    #[test]
    fn check_when_payload_out_of_range_then_refused() {
        assert!(check(&h(2, 1, 8), 0).is_ok());
        assert!(matches!(
            check(&h(2, 1, 9), 0),
            Err(Refusal::Payload { .. })
        ));
        assert!(matches!(
            check(&h(1, 1, 12), 0),
            Err(Refusal::Payload { .. })
        ));
        assert!(check(&h(24, 1, 12 + 256), 0).is_ok());
        assert!(matches!(
            check(&h(24, 1, 12 + 257), 0),
            Err(Refusal::Payload { .. })
        ));
        assert!(matches!(
            check(&h(5, 1, 8 + 32 * 9), 0),
            Err(Refusal::Payload { .. })
        ));
    }

    #[test]
    fn check_when_flags_other_than_version_and_need_reply_then_refused() {
        assert!(check(&h(1, 1 | NEED_REPLY, 0), 0).is_ok());
        for flags in [0, 2, 1 | 4, 1 | 0x100, 1 << 31] {
            assert!(
                matches!(check(&h(1, flags, 0), 0), Err(Refusal::Flags { .. })),
                "{flags:#x}"
            );
        }
    }

    #[test]
    fn check_when_inflight_requests_then_exact_size_and_fd_count() {
        assert_eq!(
            check(&h(31, 1, 24), 0).map(|r| r.name),
            Ok("GET_INFLIGHT_FD")
        );
        assert!(matches!(
            check(&h(31, 1, 20), 0),
            Err(Refusal::Payload { .. })
        ));
        assert!(matches!(check(&h(31, 1, 24), 1), Err(Refusal::Fds { .. })));
        let set = check(&h(32, 1, 24), 1).unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(check(&h(32, 1, 24), 2), Err(Refusal::Fds { .. })));
        assert!(matches!(
            check_min_fds(&set, 0),
            Err(Refusal::MissingFds { min: 1, .. })
        ));
        assert!(check_min_fds(&set, 1).is_ok());
        assert!(matches!(
            check(&h(32, 1, 32), 1),
            Err(Refusal::Payload { .. })
        ));
    }

    #[test]
    fn rule_when_vring_fd_requests_then_eventfd() {
        for code in [12, 13, 14] {
            assert!(rule_for(code).is_some_and(|r| r.eventfd));
        }
        assert!(rule_for(21).is_some_and(|r| !r.eventfd));
    }
}
