//! Feeds arbitrary bytes to `Decoder::decode`, raw and after a valid CONNECT for each version,
//! in chunks, and re-encodes what decodes. Invariants: no panic, `Ok(None)` leaves the buffer
//! untouched, every `Ok(Some)` consumes bytes.
#![no_main]

use bytes::BytesMut;
use ferrymq::protocol::{encode, Decoder, Incoming, Packet};
use libfuzzer_sys::fuzz_target;

/// CONNECT for 3.1 (`MQIsdp`/3), client id "a", clean session, keep alive 60.
const CONNECT_V3_1: &[u8] = &[
    0x10, 15, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 1, b'a',
];
/// CONNECT for 3.1.1 (`MQTT`/4).
const CONNECT_V3_1_1: &[u8] = &[
    0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a',
];
/// CONNECT for 5.0 (`MQTT`/5), empty properties.
const CONNECT_V5: &[u8] = &[
    0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b'a',
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let prefix: &[u8] = match mode & 0b11 {
        0 => &[],
        1 => CONNECT_V3_1,
        2 => CONNECT_V3_1_1,
        _ => CONNECT_V5,
    };
    // Small limits exercise PacketTooLarge; chunked feeding exercises Ok(None).
    let max = if mode & 0b100 != 0 { 64 } else { 1 << 20 };
    let chunk = usize::from(mode >> 3) + 1;

    let mut decoder = Decoder::new(max);
    let mut buf = BytesMut::new();
    let input: Vec<u8> = prefix.iter().chain(data).copied().collect();
    let mut fed = 0;
    while fed < input.len() {
        let end = (fed + chunk).min(input.len());
        buf.extend_from_slice(&input[fed..end]);
        fed = end;
        loop {
            let before = buf.clone();
            match decoder.decode(&mut buf) {
                Ok(Some(incoming)) => {
                    assert!(buf.len() < before.len(), "decode consumed nothing");
                    reencode(&decoder, incoming);
                }
                Ok(None) => {
                    assert_eq!(buf, before, "Ok(None) changed the buffer");
                    break;
                }
                Err(e) => {
                    let _ = (e.disconnect_reason(), e.connack_code(), e.connack_version());
                    return;
                }
            }
        }
    }
});

/// Encoding what a client sent back out (as the broker does when forwarding) must not panic.
fn reencode(decoder: &Decoder, incoming: Incoming) {
    let Some(version) = decoder.version() else {
        return;
    };
    let packet = match incoming {
        Incoming::Publish(p) => Packet::Publish(p),
        Incoming::PubAck(p) => Packet::PubAck(p),
        Incoming::PubRec(p) => Packet::PubRec(p),
        Incoming::PubRel(p) => Packet::PubRel(p),
        Incoming::PubComp(p) => Packet::PubComp(p),
        Incoming::Disconnect(d) => Packet::Disconnect(d),
        Incoming::Auth(a) => Packet::Auth(a),
        _ => return,
    };
    let mut out = BytesMut::new();
    let _ = encode(&packet, version, Some(1 << 20), &mut out);
}
