//! A thin MQTT 3.1.1 client codec, just what the load generator needs.
//!
//! Encoding writes straight into the caller's `BytesMut` (no per-message allocation: the
//! benchmark payload is stamped in place), decoding borrows from the read buffer. Nothing here
//! panics on what a broker sends: a malformed frame is an [`Error`] the caller counts.

use bytes::{BufMut, BytesMut};

/// Largest frame we accept from a broker (the benchmark never sends more than a few KiB).
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Remaining length longer than 4 bytes or over [`MAX_FRAME`].
    BadLength,
    /// A packet whose body does not fit its type.
    Malformed(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::BadLength => write!(f, "bad remaining length"),
            Error::Malformed(what) => write!(f, "malformed {what}"),
        }
    }
}

impl std::error::Error for Error {}

/// A packet received from the broker, borrowing from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    ConnAck {
        session_present: bool,
        code: u8,
    },
    SubAck {
        pkid: u16,
        codes: &'a [u8],
    },
    Publish {
        qos: u8,
        dup: bool,
        pkid: u16,
        topic: &'a [u8],
        payload: &'a [u8],
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    PingResp,
    /// Anything else (UNSUBACK, ...): counted, never fatal for the benchmark.
    Other(u8),
}

fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// CONNECT for MQTT 3.1.1 (no will, no credentials).
pub fn connect(buf: &mut BytesMut, client_id: &str, clean_session: bool, keep_alive: u16) {
    let len = 10 + 2 + client_id.len();
    buf.put_u8(0x10);
    put_remaining_length(buf, len);
    put_str(buf, b"MQTT");
    buf.put_u8(4);
    buf.put_u8(if clean_session { 0x02 } else { 0x00 });
    buf.put_u16(keep_alive);
    put_str(buf, client_id.as_bytes());
}

pub fn subscribe(buf: &mut BytesMut, pkid: u16, filter: &str, qos: QoS) {
    let len = 2 + 2 + filter.len() + 1;
    buf.put_u8(0x82);
    put_remaining_length(buf, len);
    buf.put_u16(pkid);
    put_str(buf, filter.as_bytes());
    buf.put_u8(qos as u8);
}

/// PUBLISH whose payload is written by `fill` into exactly `payload_len` bytes.
pub fn publish(
    buf: &mut BytesMut,
    topic: &[u8],
    qos: QoS,
    pkid: u16,
    payload_len: usize,
    fill: impl FnOnce(&mut [u8]),
) {
    let pkid_len = if qos == QoS::AtMostOnce { 0 } else { 2 };
    let len = 2 + topic.len() + pkid_len + payload_len;
    buf.put_u8(0x30 | ((qos as u8) << 1));
    put_remaining_length(buf, len);
    put_str(buf, topic);
    if qos != QoS::AtMostOnce {
        buf.put_u16(pkid);
    }
    let start = buf.len();
    buf.put_bytes(0, payload_len);
    fill(&mut buf[start..]);
}

fn ack(buf: &mut BytesMut, header: u8, pkid: u16) {
    buf.put_u8(header);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

pub fn puback(buf: &mut BytesMut, pkid: u16) {
    ack(buf, 0x40, pkid)
}
pub fn pubrec(buf: &mut BytesMut, pkid: u16) {
    ack(buf, 0x50, pkid)
}
pub fn pubrel(buf: &mut BytesMut, pkid: u16) {
    ack(buf, 0x62, pkid)
}
pub fn pubcomp(buf: &mut BytesMut, pkid: u16) {
    ack(buf, 0x70, pkid)
}
pub fn pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0x00]);
}
pub fn disconnect(buf: &mut BytesMut) {
    buf.put_slice(&[0xE0, 0x00]);
}

/// Frames one packet from the front of `buf`: `Ok(None)` when more bytes are needed, else the
/// packet and the number of bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Incoming<'_>, usize)>, Error> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let header = buf[0];
    let mut len = 0usize;
    let mut shift = 0;
    let mut pos = 1;
    loop {
        if pos > 4 {
            return Err(Error::BadLength);
        }
        let Some(&byte) = buf.get(pos) else {
            return Ok(None);
        };
        len |= ((byte & 0x7F) as usize) << shift;
        shift += 7;
        pos += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    if len > MAX_FRAME {
        return Err(Error::BadLength);
    }
    let total = pos + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[pos..total];
    let pkid_of = |what| -> Result<u16, Error> {
        if body.len() < 2 {
            return Err(Error::Malformed(what));
        }
        Ok(u16::from_be_bytes([body[0], body[1]]))
    };
    let packet = match header >> 4 {
        2 => {
            if body.len() != 2 {
                return Err(Error::Malformed("CONNACK"));
            }
            Incoming::ConnAck {
                session_present: body[0] & 1 == 1,
                code: body[1],
            }
        }
        3 => {
            let qos = (header >> 1) & 3;
            if qos == 3 {
                return Err(Error::Malformed("PUBLISH qos"));
            }
            if body.len() < 2 {
                return Err(Error::Malformed("PUBLISH"));
            }
            let tlen = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut at = 2 + tlen;
            if body.len() < at {
                return Err(Error::Malformed("PUBLISH topic"));
            }
            let topic = &body[2..at];
            let mut pkid = 0;
            if qos > 0 {
                if body.len() < at + 2 {
                    return Err(Error::Malformed("PUBLISH packet id"));
                }
                pkid = u16::from_be_bytes([body[at], body[at + 1]]);
                at += 2;
            }
            Incoming::Publish {
                qos,
                dup: header & 0x08 != 0,
                pkid,
                topic,
                payload: &body[at..],
            }
        }
        4 => Incoming::PubAck(pkid_of("PUBACK")?),
        5 => Incoming::PubRec(pkid_of("PUBREC")?),
        6 => Incoming::PubRel(pkid_of("PUBREL")?),
        7 => Incoming::PubComp(pkid_of("PUBCOMP")?),
        9 => Incoming::SubAck {
            pkid: pkid_of("SUBACK")?,
            codes: &body[2..],
        },
        13 => Incoming::PingResp,
        other => Incoming::Other(other),
    };
    Ok(Some((packet, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips() {
        let mut buf = BytesMut::new();
        publish(&mut buf, b"a/b", QoS::AtLeastOnce, 7, 300, |p| p[0] = 9);
        let (packet, used) = decode(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        match packet {
            Incoming::Publish {
                qos,
                pkid,
                topic,
                payload,
                ..
            } => {
                assert_eq!((qos, pkid, topic), (1, 7, &b"a/b"[..]));
                assert_eq!(payload.len(), 300);
                assert_eq!(payload[0], 9);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn partial_and_bad_frames() {
        let mut buf = BytesMut::new();
        puback(&mut buf, 3);
        assert_eq!(decode(&buf[..3]).unwrap(), None);
        assert_eq!(decode(&buf).unwrap(), Some((Incoming::PubAck(3), 4)));
        assert_eq!(
            decode(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(Error::BadLength)
        );
        assert!(decode(&[0x40, 0x00]).is_err());
        assert!(decode(&[0x36, 0x02, 0x00, 0x00]).is_err());
    }
}
