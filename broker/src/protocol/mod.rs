//! Server-side MQTT wire layer for 3.1, 3.1.1 and 5.0 on one port.
//!
//! Built on rumqttc's `mqttbytes` codecs. The broker's packet model is rumqttc's **v5** types
//! for everything except CONNECT, which we parse ourselves ([`ConnectPacket`]): rumqttc rejects
//! 3.1 (`MQIsdp`/3) and holds the password as a `String`.
//!
//! * [`Decoder`] frames and validates what a client sends. rumqttc's readers are written for a
//!   client and skip many of the checks a server owes ([`validate`] has them); v3 packets are
//!   converted to the v5 types.
//! * [`encode`] writes server→client packets for the connection's version, converting down to
//!   rumqttc's v4 types for 3.1/3.1.1.
//!
//! Layout: `connect.rs` our CONNECT parser, `validate.rs` the allocation-free raw-bytes rules,
//! `decode.rs` the stateful decoder, `encode.rs` the version-aware encoder, `error.rs` errors.

mod connect;
mod decode;
mod encode;
mod error;
mod validate;

#[cfg(test)]
mod tests;

pub use decode::Decoder;
pub use encode::{auth_reason_code, encode};
pub use error::{EncodeError, ProtocolError};

pub use rumqttc::v5::mqttbytes::v5::{
    Auth, ConnAck, ConnAckProperties, ConnectProperties, ConnectReturnCode, Disconnect,
    DisconnectProperties, DisconnectReasonCode, Filter, LastWillProperties, Packet, PingReq,
    PingResp, PubAck, PubAckProperties, PubAckReason, PubComp, PubCompProperties, PubCompReason,
    PubRec, PubRecProperties, PubRecReason, PubRel, PubRelProperties, PubRelReason, Publish,
    PublishProperties, RetainForwardRule, SubAck, SubAckProperties, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckProperties, UnsubAckReason, Unsubscribe,
    UnsubscribeProperties,
};
/// Client-side CONNECT types, for tests and tools that play the client.
pub use rumqttc::v5::mqttbytes::v5::{Connect, LastWill, Login};
pub use rumqttc::v5::mqttbytes::{matches, valid_filter, valid_topic, QoS};

use bytes::Bytes;

/// The protocol level a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name `MQIsdp`, level 3.
    V3_1,
    /// MQTT 3.1.1: protocol name `MQTT`, level 4.
    V3_1_1,
    /// MQTT 5.0: protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }

    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1 => 3,
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }
}

/// CONNECT, parsed by us: rumqttc rejects 3.1 (`MQIsdp`, level 3) and holds the password as
/// `String` although MQTT defines it as binary data.
#[derive(Debug, Clone)]
pub struct ConnectPacket {
    pub version: ProtocolVersion,
    /// May be empty: v5 and 3.1.1 (with clean session) ask the server to assign one.
    pub client_id: String,
    /// Clean Start in v5, Clean Session in v3.
    pub clean_start: bool,
    pub keep_alive: u16,
    /// `ConnectProperties::new()` (all `None`) for v3 and for a v5 CONNECT without properties.
    pub properties: ConnectProperties,
    pub will: Option<Will>,
    pub username: Option<String>,
    /// Binary data in MQTT.
    pub password: Option<Bytes>,
}

/// The will message of a CONNECT.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// v5 only; `None` for v3 and for a v5 will without properties.
    pub properties: Option<LastWillProperties>,
}

/// What a client can send to a server, after framing and validation.
#[derive(Debug, Clone)]
pub enum Incoming {
    Connect(Box<ConnectPacket>),
    Publish(Publish),
    PubAck(PubAck),
    PubRec(PubRec),
    PubRel(PubRel),
    PubComp(PubComp),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    PingReq,
    Disconnect(Disconnect),
    Auth(Auth),
}
