//! The data channel: ioregionfd commands and responses.

use outboard_protocol::ioregionfd::{Error, CMD_SIZE, RESP_SIZE};
use outboard_protocol::{AccessSize, Cmd, Op, Resp};

/// `Cmd::decode` on the first 32 bytes of the input (shorter inputs are
/// ignored): an accepted command re-encodes to the same bytes and obeys
/// section 7.1 (known cmd, size 1/2/4/8, reads with resp); a rejected one
/// names the byte or field that is really wrong. The constructors encode
/// commands that decode to themselves with their data truncated to the size.
pub fn ioregionfd_cmd(data: &[u8]) {
    let Some(b) = data
        .get(..CMD_SIZE)
        .and_then(|s| <[u8; CMD_SIZE]>::try_from(s).ok())
    else {
        return;
    };
    match Cmd::decode(&b) {
        Ok(c) => {
            assert_eq!(c.encode(), b, "accepted command is not canonical: {c:?}");
            assert!(b[0] <= 1 && b[1] & 0xe0 == 0 && b[1] & 0x0f <= 3);
            assert_eq!(c.size.exponent(), b[1] & 0x0f);
            assert_eq!(c.resp, b[1] & 0x10 != 0);
            assert!(c.op == Op::Write || c.resp, "read without resp accepted");
            assert_eq!(b[2..8], [0u8; 6]);
            assert_eq!(AccessSize::from_bytes(c.size.bytes()), Ok(c.size));
            assert_eq!(AccessSize::from_exponent(c.size.exponent()), Ok(c.size));
            assert!(c.size.truncate(c.data) <= c.size.all_ones());
            assert_eq!(c.size.truncate(c.size.all_ones()), c.size.all_ones());
            let rebuilt = match c.op {
                Op::Read => Cmd::read(c.user_data, c.offset, c.size),
                Op::Write => Cmd::write(c.user_data, c.offset, c.size, c.data, !c.resp),
            };
            assert_eq!(Cmd::decode(&rebuilt.encode()), Ok(rebuilt));
            assert_eq!(rebuilt.data, c.size.truncate(rebuilt.data));
            if c.op == Op::Write {
                assert_eq!(rebuilt.data, c.size.truncate(c.data));
            }
        }
        Err(Error::UnknownCommand(x)) => assert!(x == b[0] && x > 1),
        Err(Error::ReservedBits(r)) => {
            assert!(b[0] <= 1 && r != 0 && r == b[1] & 0xe0);
        }
        Err(Error::SizeExponent(e)) => {
            assert!(b[0] <= 1 && b[1] & 0xe0 == 0 && e == b[1] & 0x0f && e > 3);
        }
        Err(Error::Padding(i)) => {
            assert!((2..8).contains(&i) && b[i] != 0, "padding error at {i}");
            assert!(b[2..i].iter().all(|&x| x == 0), "not the first bad byte");
            assert!(b[0] <= 1 && b[1] & 0xe0 == 0 && b[1] & 0x0f <= 3);
        }
        Err(Error::ReadWithoutResp) => {
            assert!(b[0] == 0 && b[1] & 0x10 == 0 && b[2..8] == [0u8; 6]);
        }
        Err(e @ Error::AccessSize(_)) => panic!("decode cannot fail with {e:?}"),
    }
}

/// `Resp::decode` on the first 32 bytes: accepted iff the 24 padding bytes
/// are zero, re-encodes to the same bytes, and a garbled response names its
/// first nonzero padding byte.
pub fn ioregionfd_resp(data: &[u8]) {
    let Some(b) = data
        .get(..RESP_SIZE)
        .and_then(|s| <[u8; RESP_SIZE]>::try_from(s).ok())
    else {
        return;
    };
    match Resp::decode(&b) {
        Ok(r) => {
            assert_eq!(r.encode(), b);
            assert!(b[8..].iter().all(|&x| x == 0));
            assert_eq!(Resp::decode(&r.encode()), Ok(r));
        }
        Err(Error::Padding(i)) => {
            assert!((8..RESP_SIZE).contains(&i) && b[i] != 0);
            assert!(b[8..i].iter().all(|&x| x == 0), "not the first bad byte");
        }
        Err(e) => panic!("Resp::decode cannot fail with {e:?}"),
    }
}
