//! Test payloads that say who sent them: `(publisher id, sequence number)`, so a checker can find
//! missing, duplicated and reordered messages.

use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 4] = b"FMQ1";
/// Bytes taken by the header (magic, publisher id, sequence number).
pub const HEADER_LEN: usize = 4 + 4 + 8;

/// Who sent a message and which of theirs it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId {
    pub publisher: u32,
    pub seq: u64,
}

impl std::fmt::Display for MsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{}#{}", self.publisher, self.seq)
    }
}

/// Encodes `id` followed by `pad` filler bytes (so payload sizes can be chosen).
pub fn encode(id: MsgId, pad: usize) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + pad);
    buf.put_slice(MAGIC);
    buf.put_u32(id.publisher);
    buf.put_u64(id.seq);
    // Filler derived from the id, so a corrupted payload is caught by `decode`.
    let fill = (id.seq as u8) ^ (id.publisher as u8);
    buf.put_bytes(fill, pad);
    buf.freeze()
}

/// Decodes a payload written by [`encode`]; `None` when it is not one (or is corrupted).
pub fn decode(payload: &[u8]) -> Option<MsgId> {
    if payload.len() < HEADER_LEN || &payload[..4] != MAGIC {
        return None;
    }
    let publisher = u32::from_be_bytes(payload[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(payload[8..16].try_into().ok()?);
    let fill = (seq as u8) ^ (publisher as u8);
    if payload[HEADER_LEN..].iter().any(|b| *b != fill) {
        return None;
    }
    Some(MsgId { publisher, seq })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let id = MsgId {
            publisher: 3,
            seq: 123_456,
        };
        let bytes = encode(id, 10);
        assert_eq!(bytes.len(), HEADER_LEN + 10);
        assert_eq!(decode(&bytes), Some(id));
        let mut bad = bytes.to_vec();
        bad[20] ^= 1;
        assert_eq!(decode(&bad), None);
        assert_eq!(decode(b"hello"), None);
    }
}
